"""``validate_resource`` remembers content it found valid: a repeat is answered from the cache,
and nothing that differs (content, URL type, Bundle prefix) is ever taken for valid."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from fhir_kat.validation import resource as validation
from fhir_kat.validation.resource import validate_resource


def task(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Task", "id": "t1", "status": "requested", "intent": "order", **extra}


def test_a_repeat_is_answered_from_the_cache_and_a_change_is_checked_again() -> None:
    valid = task(description="cached")
    assert validate_resource(valid, "Task") == []
    key = validation._valid_key(valid, "Task", None)
    assert key is not None and key in validation._valid
    # Same content, keys in another order: the same digest, still valid.
    assert validate_resource(dict(reversed(list(valid.items()))), "Task") == []
    # Any change is checked from scratch: a wrong code, a wrong type for the URL, a bad prefix.
    bad = task(description="cached", status="bogus")
    assert [e for i in validate_resource(bad, "Task") for e in i.expression] == ["Task.status"]
    assert validate_resource(valid, "Patient")[0].code == "invalid"
    assert validation._valid_key(bad, "Task", None) not in validation._valid


def test_problems_are_never_cached_and_non_json_content_is_not_cached() -> None:
    bad = task(description="never cached", intent="bogus")
    first = validate_resource(bad, "Task")
    assert first and validate_resource(bad, "Task") == first
    assert validation._valid_key(bad, "Task", None) not in validation._valid
    odd = task(description=float("nan"))
    assert validation._valid_key(odd, "Task", None) is None


def test_the_cache_is_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(validation, "_valid", OrderedDict({(b"x", None, None): None}))
    monkeypatch.setattr(validation, "_VALID_CACHE_SIZE", 3)
    for n in range(6):
        assert validate_resource(task(description=f"bounded {n}"), "Task") == []
    assert len(validation._valid) == 3  # the oldest entries went first
    assert (b"x", None, None) not in validation._valid
    assert validation._valid_key(task(description="bounded 5"), "Task", None) in validation._valid
