"""The pages in a real browser: Debian's chromium, headless, driven by Playwright against a live
server on loopback. Few and quick: fill and submit the referral form and follow its status,
check the dashboard's figures against ``$evaluate-measure``, complete a PHQ-9 — and the round
trip through a real SDC renderer (NLM LHC-Forms from npm, pinned in tools/hl7_packages.py):
each served Questionnaire rendered, answered by clicking, its exported QuestionnaireResponse
stored with the service's own total and Flags.

Chromium is required: without it these tests fail (CI installs it, see .ci/run). Only an
explicit FHIR_KAT_TEST_BROWSER=off skips them, for a machine without a browser.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from fhir_kat.instruments.scoring import check_response, score
from fhir_kat.mapping.functions import INSTRUMENT_FILES, questionnaire
from tests.conftest import LiveServer, client_as
from tests.support.questionnaire_responses import (
    CAT,
    NA,
    TOTAL_LINK,
    Values,
    chosen,
    oracle_total,
    random_values,
    response,
)
from tools.hl7_packages import ensure

try:  # imported lazily so the failure below names the missing piece
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the dev dependencies include playwright
    sync_playwright = None

STEP_MS = 15_000  # upper bound for one page step; nothing here should come near it
RENDERER_PAGE = Path(__file__).with_name("sdc_renderer.html")
WCAG_21_AA = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
#: Screenshots for a reviewer (gitignored): FHIR_KAT_SCREENSHOTS or <repo>/.screenshots.
SCREENSHOTS = Path(
    os.environ.get("FHIR_KAT_SCREENSHOTS") or Path(__file__).resolve().parents[2] / ".screenshots"
)
#: Test clients whose secret is not "<id>-secret" (tests/conftest.py).
SECRETS = {"other-referrer": "other-secret"}
#: Desktop and tablet widths the screenshots are taken at.
WIDTHS = {"desktop": (1280, 900), "tablet": (768, 1024)}


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The pages are what is tested here: one backend (SQLite) keeps the browser tests fast."""
    return f"sqlite:///{tmp_path / 'web.sqlite3'}"


def chromium_path() -> str:
    path = os.environ.get("FHIR_KAT_CHROMIUM") or shutil.which("chromium") or ""
    return path if path and Path(path).exists() else ""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if os.environ.get("FHIR_KAT_TEST_BROWSER", "").lower() == "off":
        pytest.skip("FHIR_KAT_TEST_BROWSER=off")
    if sync_playwright is None:
        pytest.fail("the playwright package is missing: ./run.sh installs the dev dependencies")
    path = chromium_path()
    if not path:
        pytest.fail("chromium not found (apt-get install chromium, or set FHIR_KAT_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=path,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        yield b
        b.close()


class Pages:
    """Opens pages signed in as a client, each in its own browser context; any script error
    on any of them fails the test at teardown."""

    def __init__(self, browser: Browser, server: LiveServer) -> None:
        self.browser, self.server = browser, server
        self.errors: list[str] = []
        self.contexts: list[Any] = []

    def open(self, path: str, client_id: str) -> Page:
        context = self.browser.new_context()
        self.contexts.append(context)
        context.set_default_timeout(STEP_MS)
        serve_axe(context, self.server.url)
        page = context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.goto(self.server.url + path)
        assert "/app/login" in page.url
        page.get_by_label("Client id").fill(client_id)
        page.get_by_label("Secret").fill(SECRETS.get(client_id, f"{client_id}-secret"))
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(self.server.url + path.split("?")[0] + "*")
        return page

    def open_renderer(self) -> Page:
        """tests/web/sdc_renderer.html with LHC-Forms from the npm cache, served on the
        service's own origin (so that it calls /fhir as an EMR app would, with a bearer token).
        Only files of the pinned package are served (the page loads the sha256-pinned ones; the
        stylesheet's images come from the same verified tarball), and a console error (say, an
        expression the renderer cannot evaluate) fails the test like a script error."""
        dist = (ensure("lforms") / "dist" / "lforms").resolve()
        types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
        context = self.browser.new_context()
        self.contexts.append(context)
        context.set_default_timeout(STEP_MS)

        def serve(route: Any) -> None:
            name = route.request.url.split("/__sdc__/", 1)[1].split("?")[0]
            path = (
                RENDERER_PAGE
                if name == "renderer.html"
                else (dist / name.removeprefix("lforms/")).resolve()
            )
            if not path.is_file() or (path != RENDERER_PAGE and dist not in path.parents):
                route.fulfill(status=404, body="not in the pinned package")
                return
            kind = types.get(path.suffix, "application/octet-stream")
            if path.suffix == ".png":
                kind = "image/png"
            route.fulfill(status=200, body=path.read_bytes(), content_type=kind)

        context.route(f"{self.server.url}/__sdc__/**", serve)
        page = context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on(
            "console",
            lambda m: self.errors.append(m.text[:300]) if m.type == "error" else None,
        )
        page.goto(f"{self.server.url}/__sdc__/renderer.html")
        page.wait_for_function("window.LForms && window.sdc")
        return page


@pytest.fixture
def pages(browser: Browser, app: Flask) -> Iterator[Pages]:
    expect.set_options(timeout=STEP_MS)
    with LiveServer(app) as server:
        opened = Pages(browser, server)
        yield opened
        for context in opened.contexts:
            context.close()
    assert not opened.errors, f"script errors on the pages: {opened.errors}"


def serve_axe(context: Any, origin: str) -> None:
    """axe-core (pinned npm package) served on the page's own origin, so that the pages' CSP
    (script-src 'self') stays in force while axe runs."""
    script = (ensure("axe-core") / "axe.min.js").read_bytes()
    context.route(
        f"{origin}/__axe__/axe.min.js",
        lambda route: route.fulfill(status=200, body=script, content_type="text/javascript"),
    )


def check_page(page: Page, name: str) -> None:
    """Every page the tests open: zero axe-core WCAG 2.1 A/AA violations once its data has
    loaded, and a screenshot at desktop and tablet width for a reviewer."""
    # Checked as a person sees it: after the page's own data has loaded.
    page.wait_for_function(
        "() => document.readyState === 'complete' && !document.body.innerText.includes('Loading…')"
    )
    if not page.evaluate("() => !!window.axe"):
        origin = "/".join(page.url.split("/")[:3])
        page.add_script_tag(url=f"{origin}/__axe__/axe.min.js")
    result: dict[str, Any] = page.evaluate(
        "tags => axe.run(document, {runOnly: {type: 'tag', values: tags}})", WCAG_21_AA
    )
    violations = [
        {"id": v["id"], "nodes": [n["target"] for n in v["nodes"]]} for v in result["violations"]
    ]
    assert violations == [], (name, violations)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    for label, (width, height) in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": height})
        page.screenshot(path=str(SCREENSHOTS / f"{name}-{label}.png"), full_page=True)
    if size:
        page.set_viewport_size(size)


def assert_every_control_labelled(page: Page) -> None:
    controls = page.locator("main input:not([type=hidden]), main select, main textarea")
    assert controls.count() > 5
    for i in range(controls.count()):
        expect(controls.nth(i)).to_have_accessible_name(re.compile(r"\S"))


def test_referral_form_submits_and_follows_the_status(pages: Pages, app: Flask) -> None:
    page = pages.open("/app/referrals/new", "referrer")
    assert_every_control_labelled(page)
    # Inline validation from the JSON Schema before anything is sent.
    page.locator("#f-patient-phn").fill("12345")
    page.locator("#f-patient-phn").blur()
    expect(page.locator("#f-patient-phn-error")).to_have_text(
        "Personal Health Number (PHN) is not in the expected format"
    )
    expect(page.locator("#f-patient-phn")).to_have_attribute("aria-invalid", "true")
    page.get_by_role("button", name="Send referral").click()
    summary = page.locator("#error-summary")
    expect(summary).to_contain_text("Please correct")
    expect(summary).to_contain_text("Date of birth is required")

    page.locator("#f-referral-identifier-value").fill("R-BROWSER-1")
    page.locator("#f-patient-family-name").fill("Testcase")
    page.locator("#f-patient-given-names").fill("Avery Jo")
    page.locator("#f-patient-phn").fill("9999999999")  # right shape, wrong check digit
    page.locator("#f-patient-birth-date").fill("1984-03-02")
    page.locator("#f-patient-sex").select_option("female")
    page.locator("#f-referrer-family-name").fill("Example")
    page.locator("#f-referrer-licence-number").fill("99001")
    page.locator("#f-referrer-organization-name").fill("Example Family Practice")
    page.get_by_label("Post-traumatic stress disorder").check()
    page.get_by_role("group", name="Prior treatment failed?").get_by_label("Yes").check()
    page.get_by_role("button", name="Send referral").click()
    # The service's OperationOutcome, shown next to the field it names.
    expect(summary).to_contain_text("The service did not accept the referral")
    expect(page.locator("#f-patient-phn-error")).to_contain_text("check digit")

    page.locator("#f-patient-phn").fill("9999999998")
    page.get_by_role("button", name="Send referral").click()
    page.wait_for_url("**/app/referrals/*?submitted=1")
    expect(page.locator("#status-live")).to_have_text(
        "Referral status: Received by the program (intake under way) — Eligible - intake can start"
    )
    task_id = page.url.split("/app/referrals/")[1].split("?")[0]
    # The status page names the patient of the clinic's own referral (ADR 0027).
    expect(page.locator("#referral-patient")).to_have_text("Avery Jo Testcase, PHN 9999999998")

    # Staff move the referral on and attach a feedback document: the open page follows.
    staff = client_as(app, "staff")
    composition = staff.post(
        "/fhir/Composition",
        json={
            "resourceType": "Composition",
            "status": "final",
            "type": {"text": "Referral feedback"},
            "date": "2026-02-01",
            "author": [{"display": "KaT program"}],
            "title": "Feedback on your referral",
            "section": [
                {
                    "title": "Intake",
                    "text": {
                        "status": "generated",
                        "div": '<div xmlns="http://www.w3.org/1999/xhtml">Intake completed.</div>',
                    },
                }
            ],
        },
    ).get_json()
    task = staff.get(f"/fhir/Task/{task_id}").get_json()
    # Accepted for dosing before the intake is on record: only as an explicit staff override.
    task["status"] = "accepted"
    task["businessStatus"] = {
        "coding": [
            {
                "system": "https://fhir-kat.example.org/fhir/CodeSystem/kat-referral-status",
                "code": "intake-override",
            }
        ]
    }
    task["statusReason"] = {"text": "Intake records on paper"}
    r = staff.put(f"/fhir/Task/{task_id}", json=task)
    assert r.status_code == 200, r.data[:300]
    task = staff.get(f"/fhir/Task/{task_id}").get_json()
    task["status"] = "in-progress"
    task["output"] = [
        {
            "type": {"text": "feedback"},
            "valueReference": {"reference": f"Composition/{composition['id']}"},
        }
    ]
    r = staff.put(f"/fhir/Task/{task_id}", json=task)
    assert r.status_code == 200, r.data[:300]
    expect(page.locator("#task-status")).to_have_text("In progress")
    # A referrer may not read Compositions here: the page says so instead of failing.
    expect(page.locator("#task-outputs")).to_contain_text("is not available to you")

    staff_page = pages.open(f"/app/referrals/{task_id}", "staff")
    expect(staff_page.locator("#task-outputs h3")).to_have_text("Feedback on your referral")
    expect(staff_page.locator("#task-outputs")).to_contain_text("Intake completed.")


def test_a_referrer_reads_its_feedback_document_when_consent_permits(
    pages: Pages, app: Flask
) -> None:
    from tests.test_feedback import attest, complete, participating, share_with_referrer

    staff = client_as(app, "staff")
    task = participating(staff)
    share_with_referrer(staff)
    done = complete(staff, task)
    assert attest(staff).status_code == 200  # a clinician attests: linked and readable
    page = pages.open(f"/app/referrals/{done['id']}", "referrer")
    expect(page.locator("#task-status")).to_have_text("Completed")
    expect(page.locator("#task-outputs h3")).to_have_count(1)
    expect(page.locator("#task-outputs")).not_to_contain_text("is not available to you")
    expect(page.locator("#task-outputs h4").first).to_be_visible()


def _cohort(app: Flask) -> None:
    """Six participants with PHQ-9 and GAD-7 totals at baseline and follow-up; four in a
    cohort Group. Scores are chosen so some improve, some do not, one has no post value."""
    scores = {  # pid: {instrument total LOINC: (baseline, post or None)}
        "p1": {"44261-6": (20, 8), "70274-6": (15, 5)},
        "p2": {"44261-6": (14, 13), "70274-6": (12, 11)},
        "p3": {"44261-6": (18, None), "70274-6": (4, 2)},
        "p4": {"44261-6": (11, 4), "70274-6": (16, 6)},
        "p5": {"44261-6": (3, 2), "70274-6": (11, 10)},
        "p6": {"44261-6": (25, 9), "70274-6": (20, 19)},
    }
    entries: list[dict[str, Any]] = []
    for pid, per in scores.items():
        entries.append(
            {
                "resource": {"resourceType": "Patient", "id": pid},
                "request": {"method": "PUT", "url": f"Patient/{pid}"},
            }
        )
        for code, (baseline, post) in per.items():
            for when, value in (("2026-01-10", baseline), ("2026-04-20", post)):
                if value is None:
                    continue
                entries.append(
                    {
                        "resource": {
                            "resourceType": "Observation",
                            "status": "final",
                            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                            "subject": {"reference": f"Patient/{pid}"},
                            "effectiveDateTime": when,
                            "valueQuantity": {"value": value, "unit": "{score}"},
                            "derivedFrom": [
                                {"reference": f"QuestionnaireResponse/{pid}-{code}-{when}"}
                            ],
                        },
                        "request": {"method": "POST", "url": "Observation"},
                    }
                )
    # Everyone's program (cohort A's in its Group, the others' on their referral Task):
    # baselines (01-10) within a month before its start, posts (04-20) within two weeks after.
    program = {"start": "2026-01-20", "end": "2026-04-10"}
    for pid in ("p5", "p6"):
        entries.append(
            {
                "resource": {
                    "resourceType": "Task",
                    "id": f"referral-{pid}",
                    "status": "completed",
                    "intent": "order",
                    "code": {
                        "coding": [
                            {
                                "system": "http://hl7.org/fhir/CodeSystem/task-code",
                                "code": "fulfill",
                            }
                        ]
                    },
                    "for": {"reference": f"Patient/{pid}"},
                    "businessStatus": {
                        "coding": [
                            {
                                "system": "https://fhir-kat.example.org/fhir/CodeSystem/kat-referral-status",
                                "code": "intake-override",
                            }
                        ]
                    },
                    "statusReason": {"text": "seeded"},
                    "executionPeriod": program,
                },
                "request": {"method": "PUT", "url": f"Task/referral-{pid}"},
            }
        )
    entries.append(
        {
            "resource": {
                "resourceType": "Group",
                "id": "cohort-a",
                "name": "Cohort A",
                "type": "person",
                "actual": True,
                "member": [
                    {"entity": {"reference": f"Patient/p{i}"}, "period": program}
                    for i in (1, 2, 3, 4)
                ],
            },
            "request": {"method": "PUT", "url": "Group/cohort-a"},
        }
    )
    r = client_as(app, "staff").post(
        "/fhir",
        data=json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        content_type="application/fhir+json",
    )
    assert r.status_code == 200, r.data[:500]


def _expected_rows(app: Flask, cohort: str, subject: str = "") -> list[list[str]]:
    query = "periodStart=2000-01-01&periodEnd=2026-12-31" + (
        f"&subject={subject}" if subject else ""
    )
    report = (
        client_as(app, "ha")
        .get(f"/fhir/Measure/kat-program-outcomes/$evaluate-measure?{query}")
        .get_json()
    )
    titles = {
        i.panel["code"]: i.title
        for i in app.extensions["fhir_kat"].outcomes.catalogue.instruments.values()
    }
    rows = []
    for g in report["group"]:
        counts = {
            p["code"]["coding"][0]["code"]: p.get("count", "withheld") for p in g["population"]
        }
        score = g.get("measureScore", {}).get("value")
        rows.append(
            [
                cohort,
                titles[g["code"]["coding"][0]["code"]],
                str(counts["initial-population"]),
                str(counts["denominator"]),
                str(counts["numerator"]),
                "—" if score is None else f"{round(score * 1000) / 10:.1f} %",
            ]
        )
    return rows


def test_dashboard_figures_match_evaluate_measure(pages: Pages, app: Flask) -> None:
    _cohort(app)
    expected = _expected_rows(app, "All participants") + _expected_rows(
        app, "Cohort A", "Group/cohort-a"
    )
    assert any(row[3] != "0" for row in expected)  # the seeded data really yields figures
    page = pages.open("/app/dashboard", "ha")
    page.locator("#period-end").fill("2026-12-31")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#dashboard-status")).to_have_text(
        "Figures for 2000-01-01 to 2026-12-31 loaded."
    )
    rows = page.locator("#outcomes tbody tr")
    shown = [
        [c.strip() for c in rows.nth(i).locator("th, td").all_inner_texts()]
        for i in range(rows.count())
    ]
    assert shown == expected
    chart = page.locator("#chart svg")
    expect(chart).to_have_attribute("role", "img")
    assert chart.locator("rect").count() > 2  # bars besides the legend
    expect(page.locator('#funnel td[data-stage="received"]')).to_have_text("0")
    assert page.locator("#flags").count() == 0  # open safety Flags are for staff only


def test_phq9_completed_in_the_browser_is_stored_with_its_score(pages: Pages, app: Flask) -> None:
    staff = client_as(app, "staff")
    patient = staff.post("/fhir/Patient", json={"resourceType": "Patient"}).get_json()["id"]
    page = pages.open(f"/app/questionnaires/phq-9?patient={patient}", "staff")
    assert_every_control_labelled(page)
    page.get_by_role("button", name="Submit answers").click()
    expect(page.locator("#error-summary")).to_contain_text(
        "Please complete the form: 9 answers are missing"
    )
    answers = [1, 2, 0, 3, 1, 0, 2, 1, 0]  # item 9 = 0: no safety flag
    # Keyboard only for the first question: Tab into the radio group, arrow to the answer.
    expect(page.locator("#participant-chosen")).to_contain_text("Answers are for:")
    page.locator("#participant-find").focus()
    page.keyboard.press("Tab")
    expect(page.locator("#q-phq9-1 input[type=radio]").first).to_be_focused()
    page.keyboard.press("ArrowDown")
    expect(page.locator("#q-phq9-1 input[type=radio]").nth(1)).to_be_checked()
    for i, choice in enumerate(answers[1:], start=2):
        page.locator(f"#q-phq9-{i} input[type=radio]").nth(choice).check()
    page.get_by_role("group", name="If you checked off any problems").get_by_label(
        "Somewhat difficult"
    ).check()
    page.get_by_role("button", name="Submit answers").click()
    expect(page.locator("#total-score")).to_have_attribute("data-value", str(sum(answers)))
    qr_id = page.locator("#saved-as").get_attribute("data-id")

    stored = staff.get(f"/fhir/QuestionnaireResponse/{qr_id}").get_json()
    assert stored["status"] == "completed"
    assert stored["subject"] == {"reference": f"Patient/{patient}"}
    assert stored["questionnaire"].startswith(
        "https://fhir-kat.example.org/fhir/Questionnaire/phq-9"
    )
    assert [i["linkId"] for i in stored["item"]] == [f"phq9-{n}" for n in range(1, 10)] + [
        "phq9-difficulty"
    ]
    totals = staff.get(
        f"/fhir/Observation?derived-from=QuestionnaireResponse/{qr_id}&code=http://loinc.org|44261-6"
    ).get_json()
    assert [e["resource"]["valueQuantity"]["value"] for e in totals["entry"]] == [sum(answers)]


# ---------------------------------------------------------------------------- SDC renderer

#: What a person clicks per instrument (each item's score; NA = "not applicable"), chosen so
#: that PHQ-9 item 9 is above 0 (a safety Flag) and B-IPF has a total the renderer rounds.
CLICKED: dict[str, Values] = {
    "phq9": [1, 2, 0, 3, 1, 0, 2, 1, 2],
    "gad7": [3, 2, 2, 1, 0, 3, 2],
    "pcl5": [2, 3, 1, 4, 0, 2, 2, 1, 3, 2, 4, 1, 0, 2, 3, 1, 2, 2, 1, 0],
    "bipf": [6, NA, 6, 6, 0, 0, 1],
}


def answer_by_clicking(page: Page, q: dict[str, Any], instrument: str, values: Values) -> None:
    """As a person does it in LHC-Forms: click the question's field, then the answer in the list
    that opens (the list shows each option's text, with its score after a dash)."""
    for item, option in chosen(q, instrument, values):
        label = re.compile("^" + re.escape(item["text"]) + r"( \*)?$")
        field = page.get_by_role("combobox", name=label)
        field.click()
        display = option["valueCoding"]["display"]
        page.locator("#completionOptions li").filter(
            has_text=re.compile(rf"^(\d+:\s+)?{re.escape(display)}( - [0-9.]+)?$")
        ).click()
        expect(field).to_have_value(re.compile("^" + re.escape(display)))  # what the person sees


def shown_total(page: Page, instrument: str) -> Any:
    return page.locator(f'[id="{TOTAL_LINK[instrument]}/1"]')


def total_observations(app: Flask, instrument: str, qr_id: str) -> list[float]:
    code = CAT.instruments[instrument].total
    bundle = (
        client_as(app, "staff")
        .get(
            f"/fhir/Observation?derived-from=QuestionnaireResponse/{qr_id}"
            f"&code={code['system']}|{code['code']}"
        )
        .get_json()
    )
    return [e["resource"]["valueQuantity"]["value"] for e in bundle.get("entry", [])]


@pytest.mark.parametrize("instrument", list(INSTRUMENT_FILES))
def test_an_sdc_renderer_round_trip_is_stored_with_the_services_own_score(
    pages: Pages, app: Flask, instrument: str
) -> None:
    """Render the served Questionnaire in LHC-Forms, answer it by clicking, POST what the
    renderer exports: stored, with the total the renderer showed, the service computes and the
    oracle gives, and the Flags of the service's rules. Then the same answers left one short:
    neither side shows a total (B-IPF scores the answered domains, on both sides). And the
    hand-built shape of the same answers (no total, no copied scores) scores alike."""
    staff = client_as(app, "staff")
    token = pages.server.token
    page = pages.open_renderer()
    values = CLICKED[instrument]
    expected = oracle_total(instrument, values)
    for attempt, answers in (("complete", values), ("one short", [None, *values[1:]])):
        pid = staff.post("/fhir/Patient", json={"resourceType": "Patient"}).get_json()["id"]
        patient = {"resourceType": "Patient", "id": pid}
        q = page.evaluate("([t, id]) => sdc.render(t, id)", [token, INSTRUMENT_FILES[instrument]])
        answer_by_clicking(page, q, instrument, answers)
        own = oracle_total(instrument, answers)
        links = [f"{instrument}-{n}" for n, v in enumerate(answers, start=1) if v is not None]
        page.wait_for_function(
            "([links, total]) => sdc.answered().filter(l => l !== total).join() === links.join()",
            arg=[links, TOTAL_LINK[instrument]],
        )
        expect(shown_total(page, instrument)).to_have_value("" if own is None else f"{own:g}")
        exported = page.evaluate("p => sdc.exported(p)", patient)
        assert exported["questionnaire"] == f"{q['url']}|{q['version']}"
        sent = [i for i in exported["item"] if i["linkId"] == TOTAL_LINK[instrument]]
        assert [next(iter(i["answer"][0].values())) for i in sent] == ([] if own is None else [own])

        stored = page.evaluate("([t, r]) => sdc.submit(t, r)", [token, exported])
        assert stored["status"] == 201, (attempt, stored["body"])
        qr = stored["body"]
        assert check_response(qr, q, CAT.instruments[instrument]) == []
        service = score(qr, q, CAT.instruments[instrument]).total
        assert service == own and total_observations(app, instrument, qr["id"]) == (
            [] if own is None else [own]
        ), attempt
        flags = staff.get(f"/fhir/Flag?patient={pid}").get_json().get("entry", [])
        raised = [f["resource"]["code"]["coding"][0]["code"] for f in flags]
        item9 = instrument == "phq9" and isinstance(answers[8], int) and answers[8] > 0
        assert raised == (["phq9-item9-positive"] if item9 else []), attempt  # partial or not

        hand_built = response(instrument, answers, pid, renderer=False)
        r = staff.post("/fhir/QuestionnaireResponse", json=hand_built)
        assert r.status_code == 201, r.get_json()
        assert total_observations(app, instrument, r.get_json()["id"]) == (
            [] if own is None else [own]
        )
    assert expected is not None


def test_the_renderer_computes_every_total_as_the_service_does(pages: Pages) -> None:
    """Property, in the renderer itself: random responses (complete, partial, "not applicable")
    loaded into LHC-Forms; the total it computes from each Questionnaire's calculatedExpression
    is the service's (and the oracle's), and the service accepts what it exports."""
    page = pages.open_renderer()
    for instrument in INSTRUMENT_FILES:
        rng = random.Random(f"renderer-{instrument}")
        q, definition = questionnaire(instrument), CAT.instruments[instrument]
        n = len(CLICKED[instrument])
        values = [random_values(rng, instrument, s) for s in [0.0] * 15 + [0.1] * 15 + [0.6] * 10]
        values += [[None] * n, [NA] * n] if instrument == "bipf" else [[None] * n]
        cases = [response(instrument, v, "p1", renderer=False) for v in values]
        exported = page.evaluate(
            "([q, rs, p]) => sdc.recomputed(q, rs, p)",
            [q, cases, {"resourceType": "Patient", "id": "p1"}],
        )
        for case, out in zip(cases, exported, strict=True):
            sent = [i for i in out.get("item", []) if i["linkId"] == TOTAL_LINK[instrument]]
            renderer = next(iter(sent[0]["answer"][0].values())) if sent else None
            service = score(case, q, definition).total
            assert renderer == service, (instrument, case["item"], renderer, service)
            assert check_response(out, q, definition) == [], out
        assert any(score(c, q, definition).total is None for c in cases)
        assert any(score(c, q, definition).total is not None for c in cases)


def test_the_referral_form_prefills_in_lhc_forms_as_populate_does_and_refers(
    pages: Pages, app: Flask
) -> None:
    """``Questionnaire/kat-referral`` in a real SDC renderer launched with a patient and user
    in context (LHC-Forms evaluates the initialExpressions itself, and runs the %conditions
    x-fhir-query against a real FHIR server: the service's own /fhir holding the chart): it
    prefills exactly what the service's ``$populate`` gives for the same context. Completed
    and exported by the renderer, the response is the same referral as the native route."""
    from tests.test_sdc_referral import CONDITIONS, KS, PATIENT, USER, _answers, _unclocked

    staff = client_as(app, "staff")
    pid = staff.post("/fhir/Patient", json={k: v for k, v in PATIENT.items() if k != "id"})
    assert pid.status_code == 201, pid.get_json()
    patient = pid.get_json()
    for entry in CONDITIONS["entry"]:
        condition = {**entry["resource"], "subject": {"reference": f"Patient/{patient['id']}"}}
        assert staff.post("/fhir/Condition", json=condition).status_code == 201
    chart = staff.get(f"/fhir/Condition?patient={patient['id']}").get_json()
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "subject", "valueReference": {"reference": f"Patient/{patient['id']}"}},
            *[
                {
                    "name": "context",
                    "part": [
                        {"name": "name", "valueString": name},
                        {"name": "content", "resource": content},
                    ],
                }
                for name, content in (("patient", patient), ("user", USER), ("conditions", chart))
            ],
        ],
    }
    populated = staff.post("/fhir/Questionnaire/kat-referral/$populate", json=params).get_json()
    by_service = _answers(populated["parameter"][0]["resource"])

    page = pages.open_renderer()
    q = staff.get("/fhir/Questionnaire/kat-referral").get_json()
    page.evaluate(
        "([t, vars]) => sdc.setContext(t, vars)",
        [pages.server.token, {"patient": patient, "user": USER}],
    )
    exported = page.evaluate(
        "([q, p]) => sdc.prefilled(q, p)", [q, {"reference": f"Patient/{patient['id']}"}]
    )
    by_renderer = _answers(exported)
    assert _comparable(by_renderer) == _comparable(by_service)
    expect(page.get_by_role("textbox", name="Family name *").first).to_have_value("Testcase")

    # The physician completes what the chart cannot say; the renderer's export is the referral.
    [referrer] = [g for g in exported["item"] if g["linkId"] == "referrer"]
    referrer["item"] += [
        {
            "linkId": "referrer.organization.name",
            "answer": [{"valueString": "Example Family Practice"}],
        },
        {
            "linkId": "referrer.organization.identifier.system",
            "answer": [{"valueUri": "https://fhir-kat.example.org/fhir/sid/organization"}],
        },
        {
            "linkId": "referrer.organization.identifier.value",
            "answer": [{"valueString": "CLINIC-7"}],
        },
    ]
    [referral] = [g for g in exported["item"] if g["linkId"] == "referral"]
    referral["item"] += [
        {
            "linkId": "diagnoses[].code",
            "answer": [{"valueCoding": {"system": KS + "kat-diagnosis", "code": "ptsd"}}],
        },
        {"linkId": "prior_treatment_failure", "answer": [{"valueBoolean": True}]},
    ]
    [patient_group] = [g for g in exported["item"] if g["linkId"] == "patient"]
    patient_group["item"].append(
        {
            "linkId": "patient.sex",
            "answer": [{"valueCoding": {"system": KS + "kat-sex", "code": "female"}}],
        }
    )
    exported.update(
        status="completed",
        authored="2026-12-01T10:00:00Z",
        identifier={"system": "https://emr.example-clinic.ca/referrals", "value": "R-LHC-1"},
    )
    via_renderer = staff.post("/api/v1/referrals/$transform", json=exported)
    assert via_renderer.status_code == 200, via_renderer.get_json()
    native = {
        "source_id": "R-LHC-1",
        "referral_identifier": {
            "system": "https://emr.example-clinic.ca/referrals",
            "value": "R-LHC-1",
        },
        "authored_on": "2026-12-01T10:00:00Z",
        "patient": {
            "phn": "9999999998",
            "family_name": "Testcase",
            "given_names": ["Avery", "Q"],
            "birth_date": "1984-03-02",
            "sex": "female",
            "contact": {"phone": "250-555-0100"},
        },
        "referrer": {
            "family_name": "Example",
            "given_names": ["Jordan"],
            "licence_number": "99001",
            "organization": {
                "name": "Example Family Practice",
                "identifier": {
                    "system": "https://fhir-kat.example.org/fhir/sid/organization",
                    "value": "CLINIC-7",
                },
            },
        },
        "diagnoses": [{"code": "ptsd"}],
        "prior_treatment_failure": True,
        "conditions": [
            {
                "system": "http://snomed.info/sct",
                "code": "47505003",
                "display": "Posttraumatic stress disorder",
            },
            {
                "system": "http://hl7.org/fhir/sid/icd-10-ca",
                "code": "F17.2",
                "display": "Nicotine dependence",
            },
        ],
    }
    expected = staff.post("/api/v1/referrals/$transform", json=native).get_json()
    assert _unclocked(via_renderer.get_json()) == _unclocked(expected)
    stored = staff.post("/api/v1/referrals", json=exported)
    assert stored.status_code == 201, stored.get_json()


def _comparable(answers: dict[str, list[dict[str, Any]]]) -> dict[str, list[Any]]:
    """Answers by linkId as values (a Coding as system|code: renderers add the display)."""
    out: dict[str, list[Any]] = {}
    for link, values in answers.items():
        out[link] = [
            f"{v['valueCoding'].get('system')}|{v['valueCoding']['code']}"
            if "valueCoding" in v
            else next(iter(v.values()))
            for v in values
        ]
    return out
