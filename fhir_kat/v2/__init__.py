"""HL7 v2 referrals: REF^I12 / REF^I13 read into the v2 referral artifact, and the original-mode
acknowledgements answering them (pure: no store, no network, no clock of its own).

``referral`` reads a message (python-hl7 parses the ER7) and says where every value came from;
``ack`` writes the ACK. The MLLP listener (``fhir_kat.api.mllp``) and the receiving service
(``fhir_kat.services.v2_referrals``) sit above; the FHIR it becomes is ``mappings/v2/*.yaml``.
"""

from fhir_kat.v2.ack import build_ack
from fhir_kat.v2.referral import (
    Header,
    Location,
    Problem,
    Read,
    Refused,
    SenderContext,
    locate,
    parse,
    read_header,
    read_referral,
    rules,
)

__all__ = [
    "Header",
    "Location",
    "Problem",
    "Read",
    "Refused",
    "SenderContext",
    "build_ack",
    "locate",
    "parse",
    "read_header",
    "read_referral",
    "rules",
]
