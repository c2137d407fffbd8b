"""The value of a generated total-score Observation, for the tests that compare the measure's
readings with the stored JSON: mostly ``valueQuantity.value`` near ``score``, and every odd
case those readings must agree on (``valueInteger``, no value, a coded value, both value[x])."""

from __future__ import annotations

import random
from typing import Any


def set_score_value(
    obs: dict[str, Any],
    score: int,
    rng: random.Random,
    *,
    none_above: float,
    offsets: tuple[float, ...],
) -> None:
    """Give ``obs`` a value (or none) for ``score``: above ``none_above`` none at all; else,
    mostly, ``valueQuantity.value`` = ``score`` plus one of ``offsets`` (``-score`` included
    gives 0)."""
    kind = rng.random()
    if kind < 0.1:
        obs["valueInteger"] = score
    elif kind < 0.12:
        obs["valueQuantity"] = {"unit": "{score}"}  # no value
    elif kind < 0.14:
        obs["valueCodeableConcept"] = {"text": "declined"}
    elif kind < 0.15:  # not valid FHIR (one value[x]), but the reading is defined
        obs["valueQuantity"] = {"value": score}
        obs["valueInteger"] = score + 1
    elif kind < 0.16:
        obs["valueQuantity"] = {"unit": "{score}"}
        obs["valueInteger"] = score
    elif kind > none_above:
        pass  # no value
    else:
        obs["valueQuantity"] = {"value": score + rng.choice(offsets)}
