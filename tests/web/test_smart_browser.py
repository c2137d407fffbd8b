"""The referral form launched from the EHR, in a real browser: chromium (Playwright, as
test_browser.py) on the test EHR's chart page (tests/smart/ehr.py: SEKMET holding the synthetic
chart, oidc-provider issuing SMART launch context), the physician signs in at the EHR, the form
opens prefilled (the patient's name, a condition from the problem list, the latest PHQ-9
total), the physician adds what is missing and sends it, and the referral is in the store,
triaged. axe-core checks the launch pages against WCAG 2.1 A and AA.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.exchange.conftest import sekmet_bin  # noqa: F401  (the SEKMET install fixture)
from tests.smart.ehr import PATIENT
from tests.smart.site import SmartSite, smart_site
from tests.web.test_browser import STEP_MS, browser  # noqa: F401 (the shared browser fixture)
from tools.hl7_packages import ensure

with contextlib.suppress(ImportError):  # test_browser.py fails loudly without playwright
    from playwright.sync_api import Browser, Page, expect

WCAG_21_AA = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


@pytest.fixture
def site(
    tmp_path: Path,
    sekmet_bin: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[SmartSite]:
    with smart_site(tmp_path, sekmet_bin, monkeypatch) as opened:
        yield opened


def _axe(page: Page) -> list[dict[str, Any]]:
    page.add_script_tag(path=str(ensure("axe-core") / "axe.min.js"))
    result: dict[str, Any] = page.evaluate(
        "tags => axe.run(document, {runOnly: {type: 'tag', values: tags}})", WCAG_21_AA
    )
    return [
        {"id": v["id"], "nodes": [n["target"] for n in v["nodes"]]} for v in result["violations"]
    ]


def test_a_physician_launches_the_form_from_the_ehr_sees_it_prefilled_and_refers(
    site: SmartSite,
    browser: Browser,  # noqa: F811
) -> None:
    errors: list[str] = []
    # axe is injected as a script: the pages' CSP (no inline script) is bypassed for it alone.
    context = browser.new_context(bypass_csp=True)
    context.set_default_timeout(STEP_MS)
    try:
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{site.ehr.root}/ehr/chart?patient={PATIENT}")
        page.get_by_role("link", name="Refer to the KaT program").click()
        # At the EHR's own sign-in page (the app never sees the password).
        page.get_by_label("Username").fill("okafor")
        page.get_by_label("Password").fill(site.ehr.users["okafor"]["password"])
        page.get_by_role("button", name="Sign in at the EHR").click()
        page.wait_for_url(site.url + "/smart/referral")
        expect(page.locator("h1")).to_have_text("Refer Avery Testcase to the KaT program")
        expect(page.locator("form.signout")).to_contain_text("Dr Sam Okafor")
        # Prefilled from the chart.
        expect(page.locator("#f-patient-family-name")).to_have_value("Testcase")
        expect(page.locator("#f-patient-given-names")).to_have_value("Avery")
        expect(page.locator("#f-patient-phn")).to_have_value("9999999998")
        expect(page.locator("#f-referrer-family-name")).to_have_value("Okafor")
        condition = page.get_by_label(re.compile("Posttraumatic stress disorder"))
        expect(condition).to_be_checked()
        expect(page.locator("#emr-scores")).to_contain_text("PHQ-9: 17 (2026-11-20)")
        expect(page.locator("#emr-medications")).to_contain_text("Sertraline 100 mg tablet")
        assert _axe(page) == []
        # The physician adds what the chart does not hold, and sends.
        page.locator("#f-referral-identifier-value").fill("EMR-B-1")
        page.locator("#f-patient-sex").select_option("female")
        page.locator("#f-referrer-organization-name").fill("Example Family Practice")
        page.get_by_role("group", name="Prior treatment failed?").get_by_label("Yes").check()
        page.get_by_role("button", name="Send referral").click()
        page.wait_for_url("**/app/referrals/*?submitted=1")
        # The launched physician's own referral names its patient, from the EHR's chart
        # (ADR 0027: a clinic reads the Patients of its own referrals).
        expect(page.locator("#referral-title")).to_have_text(
            "Referral EMR-B-1 — Avery Testcase, PHN 9999999998"
        )
        task_id = page.url.split("/app/referrals/")[1].split("?")[0]
        task = site.api("GET", f"/fhir/Task/{task_id}").get_json()
        # Triaged by the program's rules from the EMR's PTSD and the physician's answer.
        assert task["status"] == "received", task.get("statusReason")
        found = site.api("GET", "/fhir/Condition?code=http://snomed.info/sct|47505003").get_json()
        assert found["total"] == 1
        # The launch is over once sent: the form does not open again with the old token.
        page.goto(site.url + "/smart/referral")
        expect(page.locator("h1")).to_have_text("This launch has ended")
        assert _axe(page) == []
        # An unregistered EHR's launch: a refusal page, checked for accessibility too.
        page.goto(site.url + "/smart/launch?iss=https%3A%2F%2Fevil.example.org%2Ffhir")
        expect(page.locator("h1")).to_have_text("This EMR is not registered")
        assert _axe(page) == []
    finally:
        context.close()
    assert not errors, f"script errors on the pages: {errors}"


def test_the_interstitial_after_the_launch_has_no_wcag_violations(
    site: SmartSite,
    browser: Browser,  # noqa: F811
) -> None:
    context = browser.new_context(bypass_csp=True)
    context.set_default_timeout(STEP_MS)
    try:
        page = context.new_page()
        # The same-site navigation it starts answers 204 here, so the page stays to be checked.
        page.route(
            re.compile("^" + re.escape(site.url) + "/smart/referral"),
            lambda route: route.fulfill(status=204),
        )
        page.goto(f"{site.ehr.root}/ehr/chart?patient={PATIENT}")
        page.get_by_role("link", name="Refer to the KaT program").click()
        page.get_by_label("Username").fill("okafor")
        page.get_by_label("Password").fill(site.ehr.users["okafor"]["password"])
        page.get_by_role("button", name="Sign in at the EHR").click()
        expect(page.locator("h1")).to_have_text("Opening the referral form")
        assert _axe(page) == []
    finally:
        context.close()
