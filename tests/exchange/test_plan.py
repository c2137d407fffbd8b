"""Partner configuration checked at start-up: what each partner will receive and how (the
listing the service and worker log and ``fhir-kat partners`` prints), configurations that can
never deliver (refused), and those that deliver less than meant (warned about)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fhir_kat.exchange.partners import load_partners, parse_partners
from fhir_kat.exchange.plan import (
    describe_partners,
    kind_types,
    partner_problems,
    partner_warnings,
)
from fhir_kat.settings import SettingsError, load_settings

from .conftest import BASE

HA = "https://fhir-kat.example.org/fhir/sid/organization|HA-ISLAND"


def test_the_listing_names_kinds_types_wire_form_and_consent() -> None:
    partners = parse_partners(
        {
            "ha": {"base_url": BASE, "organization": HA},
            "team": {"base_url": BASE, "artifact_kinds": ["safety-flags"], "care_team": True},
            "registry": {"base_url": BASE, "write_mode": "put", "organization": HA},
        }
    )
    lines = describe_partners(partners)
    ha, registry, team, flags = lines
    assert "kinds adverse-events, consents, medication-administrations" in ha
    assert "a resource without one: PUT <Type>/<our id>" in ha
    assert f"sharing consent naming {HA}" in ha and "safety-flags TREAT" in ha
    assert "screenings HOPERAT" in ha
    assert "transaction of PUT <Type>/<our id>" in registry
    assert "kinds safety-flags; types Flag, Patient" in team
    assert "the program's own care team: treatment (TREAT), no sharing consent asked" in team
    assert flags == "safety Flags go to: ha, registry, team"
    assert describe_partners({})[-1].startswith("safety Flags go to no partner")


def test_a_safety_flags_partner_must_say_whether_it_is_the_care_team() -> None:
    with pytest.raises(SettingsError, match="care_team: a partner that asks for safety-flags"):
        parse_partners({"team": {"base_url": BASE, "artifact_kinds": ["safety-flags"]}})
    with pytest.raises(SettingsError, match="a referral-status partner is a referrer"):
        parse_partners(
            {
                "emr": {
                    "base_url": BASE,
                    "organization": HA,
                    "artifact_kinds": ["referral-status"],
                    "care_team": True,
                }
            }
        )
    with pytest.raises(SettingsError, match="without_identifier: must be one of"):
        parse_partners({"x": {"base_url": BASE, "without_identifier": "drop"}})


def test_configurations_that_can_never_deliver_stop_start_up() -> None:
    never = parse_partners(
        {
            "strict": {"base_url": BASE, "without_identifier": "dead-letter"},
            "nothing": {
                "base_url": BASE,
                "artifact_kinds": ["consents"],
                "resource_types": ["Flag"],
            },
        }
    )
    problems = partner_problems(never)
    assert any("[partners.nothing].resource_types: leaves out every" in p for p in problems)
    assert any(
        "[partners.strict].without_identifier: every referrals delivery carries Provenance" in p
        for p in problems
    )
    base = load_settings({})
    settings = replace(
        base,
        extra={"partners": {"strict": {"base_url": BASE, "without_identifier": "dead-letter"}}},
    )
    with pytest.raises(SettingsError, match="cannot be conditionally created"):
        load_partners(settings)
    # Leaving the Provenance out makes the same partner deliverable.
    ok = {
        "strict": {
            "base_url": BASE,
            "without_identifier": "dead-letter",
            "artifact_kinds": ["consents"],
            "resource_types": sorted(kind_types("consents") - {"Provenance"}),
        }
    }
    assert load_partners(replace(base, extra={"partners": ok}))


def test_warnings_name_what_will_not_arrive() -> None:
    partners = parse_partners(
        {
            "anonymous": {"base_url": BASE},
            "narrow": {
                "base_url": BASE,
                "organization": HA,
                "artifact_kinds": ["screenings"],
                "resource_types": ["Observation"],
            },
        }
    )
    warnings = partner_warnings(partners)
    assert any(
        "partner anonymous: outside the program and names no organization" in w for w in warnings
    )
    assert any("partner narrow: receives Observation of screenings" in w for w in warnings)
    assert any("left-out Practitioner" in w for w in warnings)


def test_cli_prints_the_listing(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from fhir_kat.cli import main

    config = tmp_path / "kat.toml"
    config.write_text(
        "[partners.team]\n"
        f'base_url = "{BASE}"\n'
        'artifact_kinds = ["safety-flags"]\n'
        "care_team = true\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("FHIR_KAT_CONFIG", str(config))
    assert main(["partners"]) == 0
    out = capsys.readouterr().out
    assert "partner team" in out and "safety Flags go to: team" in out
