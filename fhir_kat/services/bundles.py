"""Building Bundles whose entries embed stored JSON text without re-parsing it.

Owns: ``RawBundle`` (a Bundle skeleton plus entries holding stored JSON text) and its
serialisation. Stored resources are already valid JSON; parsing them only to dump them again is
the dominant cost of a large search page or history, so entries carry the text as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawEntry:
    fields: dict[str, Any]  # fullUrl, request, response, search ... (everything but resource)
    resource_json: str | None = None  # stored JSON text, embedded verbatim
    resource: dict[str, Any] | None = None  # or a resource built in memory


@dataclass
class RawBundle:
    head: dict[str, Any]
    entries: list[RawEntry] = field(default_factory=list)
    #: What the bundle discloses, for the audit trail: "Type/id" and patient ids.
    disclosed: list[str] = field(default_factory=list)
    patients: set[str] = field(default_factory=set)

    def to_json(self) -> str:
        head = json.dumps(self.head, separators=(",", ":"), ensure_ascii=False)
        if not self.entries:
            return head
        parts = []
        for entry in self.entries:
            fields = dict(entry.fields)
            resource_text = entry.resource_json
            if resource_text is None and entry.resource is not None:
                resource_text = json.dumps(
                    entry.resource, separators=(",", ":"), ensure_ascii=False
                )
            if resource_text is None:
                parts.append(json.dumps(fields, separators=(",", ":"), ensure_ascii=False))
                continue
            full_url = fields.pop("fullUrl", None)
            prefix = "{"
            if full_url is not None:
                prefix += '"fullUrl":' + json.dumps(full_url, ensure_ascii=False) + ","
            rest = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
            body = prefix + '"resource":' + resource_text
            body += ("," + rest[1:]) if rest != "{}" else "}"
            parts.append(body)
        return head[:-1] + ',"entry":[' + ",".join(parts) + "]}"

    def to_dict(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.to_json())
        return loaded
