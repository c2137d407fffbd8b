"""The workspace of each person, in a real browser (as test_browser.py): a referring physician's
referrals and the form without URIs; a nurse's questionnaire that says on the spot when it
raised a safety Flag, the safety inbox where she resolves it, the worklist and the participant's
page; an analyst's downloads. Every page opened is checked with axe-core (WCAG 2.1 AA) and
photographed at desktop and tablet width (``check_page``).

Privacy: the pages read only through the API with the browser session, so a referrer of one
clinic sees none of another clinic's referrals or patients on any page — checked here page by
page with a second clinic's data in the store.
"""

# ruff: noqa: F811 (the shared browser fixtures are imported, then named as test arguments)
from __future__ import annotations

import contextlib
import json
import re
from typing import Any
from urllib.parse import unquote

from flask import Flask

from fhir_kat.artifacts import bc_phn_check_digit
from tests.conftest import client_as
from tests.test_appointments import session_appointment
from tests.web.test_browser import (  # noqa: F401 (fixtures)
    Pages,
    _cohort,
    _expected_rows,
    browser,
    check_page,
    database_url,
    pages,
)

with contextlib.suppress(ImportError):  # test_browser.py fails loudly without playwright
    from playwright.sync_api import Page, expect

STAFF_SYSTEM = "https://fhir-kat.example.org/fhir/sid/organization"
#: BC PHN (DOMAIN.md).
PHN_SYSTEM = "https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-patient-healthcare-id"


def phn(n: int) -> str:
    """A valid synthetic BC PHN (mod 11 check digit) numbered ``n``."""
    for base in range(n, n + 1000):
        first = f"9{base:08d}"
        digit = bc_phn_check_digit(first)
        if digit is not None:
            return first + str(digit)
    raise AssertionError("no PHN")


def referral(number: str, family: str, given: str, phn_: str, clinic: str) -> dict[str, Any]:
    """A native referral artifact of clinic ``clinic`` (CLINIC-7 or CLINIC-8)."""
    return {
        "source_id": f"src-{number}",
        "referral_identifier": {
            "system": f"https://emr.{clinic.lower()}.example/referrals",
            "value": number,
        },
        "authored_on": "2026-11-02T09:30:00-08:00",
        "patient": {
            "family_name": family,
            "given_names": [given],
            "phn": phn_,
            "birth_date": "1980-05-06",
            "sex": "female",
        },
        "referrer": {
            "family_name": "Referrer",
            "given_names": ["Pat"],
            "licence_number": "99002",
            "organization": {
                "name": f"Clinic {clinic}",
                "identifier": {"system": STAFF_SYSTEM, "value": clinic},
            },
        },
        "diagnoses": [{"code": "ptsd"}],
        "prior_treatment_failure": True,
        "ketamine_hypersensitivity": False,
    }


def post_referral(app: Flask, client_id: str, body: dict[str, Any]) -> str:
    r = client_as(app, client_id).post("/api/v1/referrals", json=body)
    assert r.status_code in (200, 201), r.get_data(as_text=True)[:400]
    task = next(
        e["response"]["location"]
        for e in r.get_json()["entry"]
        if e["response"]["location"].startswith("Task/")
    )
    return str(task.split("/")[1])


def fill_referral_form(page: Page, number: str, phn_: str) -> None:
    page.locator("#f-referral-identifier-value").fill(number)
    page.locator("#f-patient-family-name").fill("Formfilled")
    page.locator("#f-patient-given-names").fill("Robin")
    page.locator("#f-patient-phn").fill(phn_)
    page.locator("#f-patient-birth-date").fill("1979-07-08")
    page.locator("#f-patient-sex").select_option("male")
    page.locator("#f-referrer-family-name").fill("Okafor")
    page.locator("#f-referrer-licence-number").fill("99003")
    page.locator("#f-referrer-organization-name").fill("Example Family Practice")
    page.get_by_label("Post-traumatic stress disorder").check()
    page.get_by_role("group", name="Prior treatment failed?").get_by_label("Yes").check()


def assert_form_asks_no_uri(page: Page) -> None:
    assert page.locator("main input[type=url]").count() == 0
    visible = page.locator("main").inner_text()
    assert "URI" not in visible and "http" not in visible
    expect(page.locator("#f-urgency option")).to_have_text(
        ["Choose…", "Routine", "Urgent", "As soon as possible", "Immediately (stat)"]
    )


def test_a_referrer_refers_and_follows_its_clinics_referrals_only(pages: Pages, app: Flask) -> None:
    theirs = post_referral(
        app, "other-referrer", referral("R-OTHER-1", "Otherclinic", "Jamie", phn(11), "CLINIC-8")
    )
    page = pages.open("/app/referrals/new", "referrer")
    assert_form_asks_no_uri(page)
    check_page(page, "referral-form")
    fill_referral_form(page, "R-MINE-1", phn(21))
    page.get_by_role("button", name="Send referral").click()
    page.wait_for_url("**/app/referrals/*?submitted=1")
    # The clinic reads the patient of its own referral (ADR 0027): named with the PHN.
    expect(page.locator("#referral-title")).to_have_text(
        f"Referral R-MINE-1 — Robin Formfilled, PHN {phn(21)}"
    )
    expect(page.locator("#referral-patient")).to_have_text(f"Robin Formfilled, PHN {phn(21)}")
    expect(page.locator("#task-next")).not_to_be_empty()
    check_page(page, "referral-status")
    mine = page.url.split("/app/referrals/")[1].split("?")[0]
    stored = client_as(app, "staff").get(f"/fhir/Task/{mine}").get_json()
    # The numbering system came from the signed-in clinic, not from the physician.
    assert stored["identifier"][0]["system"].endswith("/sid/referral-form/CLINIC-7")

    page.get_by_role("link", name="Back to my referrals").click()
    rows = page.locator("#referrals tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("R-MINE-1")
    expect(rows.first).to_contain_text("Robin Formfilled")
    expect(rows.first).to_contain_text(phn(21))
    expect(rows.first).to_contain_text("Received by the program")
    expect(rows.first).to_contain_text("psychiatric nurse")  # what happens next
    assert "R-OTHER-1" not in page.locator("main").inner_text()
    assert "Otherclinic" not in page.content()
    page.locator("#referral-search").fill("nothing-like-this")
    expect(rows).to_have_count(0)
    page.locator("#referral-search").fill("r-mine")
    expect(rows).to_have_count(1)
    page.locator("#referral-search").fill(phn(21))  # by PHN
    expect(rows).to_have_count(1)
    page.locator("#referral-search").fill("formfilled")  # by name
    expect(rows).to_have_count(1)
    check_page(page, "my-referrals")

    # Clinic B's referral is, for clinic A's pages, never stored: the status page says so.
    page.goto(pages.server.url + f"/app/referrals/{theirs}")
    expect(page.locator("#error-summary")).to_be_visible()
    assert "Otherclinic" not in page.content() and "R-OTHER-1" not in page.content()

    other = pages.open("/app/referrals", "other-referrer")
    expect(other.locator("#referrals tbody tr")).to_have_count(1)
    expect(other.locator("#referrals tbody tr").first).to_contain_text("R-OTHER-1")
    expect(other.locator("#referrals tbody tr").first).to_contain_text("Jamie Otherclinic")
    expect(other.locator("#referrals tbody tr").first).to_contain_text(phn(11))
    assert "R-MINE-1" not in other.locator("main").inner_text()
    assert "Formfilled" not in other.content() and phn(21) not in other.content()
    # Clinic B refers the same person too: it now names them on its own referral, and still
    # sees nothing of clinic A's referral of them.
    same = referral("R-OTHER-3", "Formfilled", "Robin", phn(21), "CLINIC-8")
    same["patient"] |= {"birth_date": "1979-07-08", "sex": "male"}
    shared = post_referral(app, "other-referrer", same)
    other.goto(pages.server.url + f"/app/referrals/{shared}")
    expect(other.locator("#referral-patient")).to_have_text(f"Robin Formfilled, PHN {phn(21)}")
    other.goto(pages.server.url + "/app/referrals")
    expect(other.locator("#referrals tbody tr")).to_have_count(2)
    assert "R-MINE-1" not in other.locator("main").inner_text()
    other.goto(pages.server.url + f"/app/referrals/{mine}")
    expect(other.locator("#error-summary")).to_be_visible()
    assert "R-MINE-1" not in other.content() and "Formfilled" not in other.content()

    # Program staff see every referral with the patient named.
    staff = pages.open("/app/referrals", "staff")
    expect(staff.locator("#referrals tbody tr")).to_have_count(3)
    expect(staff.locator("#referrals")).to_contain_text("Robin Formfilled")
    expect(staff.locator("#referrals")).to_contain_text(phn(21))
    check_page(staff, "referrals-staff")


def test_referrers_are_refused_the_program_teams_pages(pages: Pages, app: Flask) -> None:
    post_referral(
        app, "other-referrer", referral("R-OTHER-2", "Hidden", "Kim", phn(31), "CLINIC-8")
    )
    page = pages.open("/app/", "referrer")
    for path in (
        "/app/safety",
        "/app/worklist",
        "/app/participants/anyone",
        "/app/dashboard",
        "/app/questionnaires/phq-9",
    ):
        page.goto(pages.server.url + path)
        expect(page.locator("h1")).to_have_text("Not allowed")
        assert "Hidden" not in page.content()
    check_page(page, "not-allowed")


def test_a_nurse_is_told_on_the_spot_and_resolves_the_flag_in_the_inbox(
    pages: Pages, app: Flask
) -> None:
    post_referral(
        app, "referrer", referral("R-NURSE-1", "Safetycase", "Morgan", phn(41), "CLINIC-7")
    )
    post_referral(
        app, "other-referrer", referral("R-NURSE-2", "Bystander", "Lee", phn(51), "CLINIC-8")
    )
    # An older Flag of medium priority (SpO2 below the limit): the inbox still shows the
    # high-priority one first — the order is the priority the safety rules give each Flag.
    staff = client_as(app, "staff")
    morgan = staff.get(f"/fhir/Patient?identifier={PHN_SYSTEM}|{phn(41)}").get_json()
    spo2 = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2708-6"}]},
        "subject": {"reference": f"Patient/{morgan['entry'][0]['resource']['id']}"},
        "effectiveDateTime": "2026-11-01T10:00:00-08:00",
        "valueQuantity": {
            "value": 85,
            "unit": "%",
            "system": "http://unitsofmeasure.org",
            "code": "%",
        },
    }
    assert staff.post("/fhir/Observation", json=spo2).status_code == 201
    page = pages.open("/app/questionnaires/phq-9", "staff")
    page.get_by_label("Find by name or PHN").fill(phn(41))
    page.get_by_role("button", name="Find").click()
    expect(page.locator("#participant-chosen")).to_have_text(
        f"Answers are for: Morgan Safetycase, PHN {phn(41)}, born 1980-05-06."
    )
    check_page(page, "questionnaire")
    for i, choice in enumerate([1, 1, 0, 2, 1, 0, 1, 0, 2], start=1):  # item 9 = 2
        page.locator(f"#q-phq9-{i} input[type=radio]").nth(choice).check()
    page.get_by_role("button", name="Submit answers").click()
    alert = page.locator("#safety-alert")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("Safety flag raised")
    expect(alert).to_contain_text(
        "Act now: The participant reported thoughts of being better off dead"
    )
    expect(page.locator("#total-score")).to_have_attribute("data-value", "8")
    check_page(page, "questionnaire-flag-raised")

    alert.get_by_role("link", name="safety inbox").click()
    cards = page.locator("article.flag-card").filter(has_text="Morgan Safetycase")
    expect(cards).to_have_count(2)
    expect(cards.nth(0)).to_contain_text("PHQ-9 item 9")
    expect(cards.nth(0)).to_contain_text("Act now")
    expect(cards.nth(0)).to_contain_text("Priority: High priority")
    expect(cards.nth(1)).to_contain_text("Today")
    expect(cards.nth(1)).to_contain_text(
        "Priority: Medium priority (program decision awaiting clinical review)"
    )
    card = cards.filter(has_text="PHQ-9 item 9")
    expect(card).to_have_count(1)
    expect(card).to_contain_text("PHQ-9 item 9")
    expect(card.get_by_role("link", name="Questionnaire answers")).to_be_visible()
    check_page(page, "safety-inbox")
    card.get_by_label("Note").fill("Called the participant; safety plan reviewed.")
    card.get_by_role("button", name="Acknowledge").click()
    # Signed in with a client (development): the page asks who is acting.
    expect(page.locator("#error-summary")).to_contain_text("Enter your family name")
    page.get_by_label("Your family name").fill("Rivera")
    page.get_by_label("Your given names").fill("Dana")
    page.get_by_label("Your staff number").fill("N-1001")
    card.get_by_role("button", name="Acknowledge").click()
    expect(page.locator("#inbox-status")).to_contain_text("Acknowledged: Morgan Safetycase")
    card = page.locator("article.flag-card").filter(has_text="PHQ-9 item 9")
    expect(card).to_contain_text("Acknowledged")
    card.get_by_label("Note").fill("Seen by the psychiatrist; no immediate risk.")
    card.get_by_role("button", name="Resolve").click()
    expect(page.locator("#inbox-status")).to_contain_text("Resolved: Morgan Safetycase")
    expect(page.locator("article.flag-card").filter(has_text="PHQ-9 item 9")).to_have_count(0)
    flags = client_as(app, "staff").get("/fhir/Flag?status=inactive").get_json()["entry"]
    resolution = [
        x
        for f in flags
        for x in f["resource"].get("extension", [])
        if x["url"].endswith("/flag-resolution")
    ]
    notes = [y.get("valueString") for x in resolution for y in x["extension"] if y["url"] == "note"]
    assert notes == ["Seen by the psychiatrist; no immediate risk."]

    # The participant's page: the timeline names the questionnaire and the flag; the chart
    # draws the PHQ-9 with its bands and cut-off.
    page.goto(pages.server.url + "/app/worklist")
    expect(page.locator("#work-new")).to_contain_text("Morgan Safetycase")
    check_page(page, "worklist")
    page.locator("#work-new").get_by_role("link", name=re.compile("Morgan Safetycase")).click()
    expect(page.locator("h1")).to_have_text("Morgan Safetycase")
    expect(page.locator("#timeline")).to_contain_text("PHQ-9 answered")
    expect(page.locator("#timeline")).to_contain_text("(resolved)")
    chart = page.locator('figure[data-instrument="phq9"] svg')
    expect(chart).to_have_attribute("role", "img")
    expect(chart).to_contain_text("cut-off 10")
    expect(chart).to_contain_text("Moderate depression")
    check_page(page, "participant")
    page.goto(pages.server.url + "/app/dashboard")
    check_page(page, "dashboard-staff")


def test_the_worklist_lists_the_sessions_booked_from_today_on(pages: Pages, app: Flask) -> None:
    """Sessions scheduled come from FHIR Appointments (kat-service#kat-session, booked, from
    today on), soonest first, each naming the patient, the date and time and the session
    number; past, cancelled and non-session bookings are not listed."""
    staff = client_as(app, "staff")
    post_referral(app, "referrer", referral("R-BOOK-1", "Bookedcase", "Sam", phn(61), "CLINIC-7"))
    post_referral(app, "referrer", referral("R-BOOK-2", "Latercase", "Ari", phn(71), "CLINIC-7"))
    ids = {}
    for n in (61, 71):
        found = staff.get(f"/fhir/Patient?identifier={PHN_SYSTEM}|{phn(n)}").get_json()
        ids[n] = found["entry"][0]["resource"]["id"]
    bookings = [
        (ids[71], "2030-05-12T13:00:00-07:00", 3, "booked", "kat-session"),
        (ids[61], "2030-05-05T09:00:00-07:00", 2, "booked", "kat-session"),
        (ids[61], "2020-01-06T09:00:00-08:00", 1, "booked", "kat-session"),  # past
        (ids[61], "2030-05-19T09:00:00-07:00", 3, "cancelled", "kat-session"),
        (ids[71], "2030-05-06T09:00:00-07:00", 1, "booked", "kat-program"),  # not a session
    ]
    for patient, start, number, status, service in bookings:
        appointment = session_appointment(patient, start, number, status)
        appointment["serviceType"][0]["coding"][0]["code"] = service
        r = staff.post("/fhir/Appointment", json=appointment)
        assert r.status_code == 201, r.get_json()
    page = pages.open("/app/worklist", "staff")
    rows = page.locator("#work-scheduled tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text(f"Sam Bookedcase (PHN {phn(61)})")
    expect(rows.nth(0)).to_contain_text("Session 2")
    expect(rows.nth(0)).to_contain_text("2030")
    expect(rows.nth(0)).to_contain_text("R-BOOK-1")
    expect(rows.nth(1)).to_contain_text("Ari Latercase")
    expect(rows.nth(1)).to_contain_text("Session 3")
    check_page(page, "worklist-sessions")


def test_the_analyst_downloads_the_figures_as_evaluate_measure_gives_them(
    pages: Pages, app: Flask
) -> None:
    _cohort(app)
    expected = _expected_rows(app, "All participants") + _expected_rows(
        app, "Cohort A", "Group/cohort-a"
    )
    page = pages.open("/app/dashboard", "ha")
    page.locator("#period-end").fill("2026-12-31")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#dashboard-status")).to_have_text(
        "Figures for 2000-01-01 to 2026-12-31 loaded."
    )
    expect(page.locator("#small-cells")).to_contain_text("fewer than 5 people")
    expect(page.locator("#improved-means")).to_contain_text("5 or more points lower")
    expect(page.locator("#chart svg")).to_contain_text("cut-off 10")
    check_page(page, "dashboard-analyst")
    with page.expect_download() as got:
        page.get_by_role("link", name="Download figures (CSV)").click()
    with open(got.value.path(), encoding="utf-8", newline="") as f:  # keep the CRLFs
        text = f.read()
    lines = [line.split(",") for line in text.strip().split("\r\n")]
    assert lines[0] == [
        "Cohort",
        "Instrument",
        "Screened positive",
        "With post data",
        "Improved",
        "% improved",
    ]
    assert lines[1:] == expected
    with page.expect_download() as got:
        page.get_by_role("link", name="Download MeasureReport (JSON)").click()
    with open(got.value.path(), encoding="utf-8") as f:
        downloaded = json.load(f)
    reports = [e["resource"] for e in downloaded["entry"]]
    assert {r["resourceType"] for r in reports} == {"MeasureReport"}
    direct = (
        client_as(app, "ha")
        .get(
            "/fhir/Measure/kat-program-outcomes/$evaluate-measure"
            "?periodStart=2000-01-01&periodEnd=2026-12-31"
        )
        .get_json()
    )
    assert reports[0]["group"] == direct["group"]
    assert unquote(page.locator("#download-csv").get_attribute("href") or "").startswith(
        "data:text/csv"
    )


def test_home_and_login_pages_have_no_wcag_violations(pages: Pages) -> None:
    page = pages.open("/app/", "staff")
    check_page(page, "home-staff")
    referrer = pages.open("/app/", "referrer")
    check_page(referrer, "home-referrer")
    context = pages.browser.new_context()
    pages.contexts.append(context)
    from tests.web.test_browser import serve_axe

    serve_axe(context, pages.server.url)
    login = context.new_page()
    login.goto(pages.server.url + "/app/login")
    check_page(login, "login")
