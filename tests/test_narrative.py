"""R4 narrative rules (txt-1, txt-2) on every write path: nothing that could run in a reader's
browser is stored or forwarded, every refusal names the div's path, and conforming narratives
(HL7's own examples: tests/test_hl7_examples.py) still pass."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_kat.validation.narrative import ATTRIBUTES, ELEMENTS, div_problems
from tests.conftest import client_as
from tests.test_messaging import as_message, process, referral, transform

FHIR = "application/fhir+json"
NS = 'xmlns="http://www.w3.org/1999/xhtml"'


def div(inner: str, attrs: str = "") -> str:
    return f"<div {NS}{attrs}>{inner}</div>"


REFUSED = {
    "script": div("<p>hi</p><script>alert(1)</script>"),
    "event handler": div('<p onclick="alert(1)">hi</p>'),
    "event handler on the root": div("<p>hi</p>", ' onmouseover="alert(1)"'),
    "javascript link": div('<a href="javascript:alert(1)">hi</a>'),
    "javascript link, disguised": div('<a href=" JaVa&#9;ScRiPt:alert(1)">hi</a>'),
    "vbscript link": div('<a href="vbscript:msgbox(1)">hi</a>'),
    "html data link": div('<a href="data:text/html;base64,PHNjcmlwdD4=">hi</a>'),
    "svg data image": div('<img src="data:image/svg+xml;base64,PHN2Zz4=" alt="x"/>'),
    "javascript image": div('<img src="javascript:alert(1)" alt="x"/>'),
    "iframe": div('<iframe src="https://evil.example/"></iframe><p>hi</p>'),
    "form": div('<form action="https://evil.example/"><p>hi</p></form>'),
    "object": div('<object data="x.swf"></object><p>hi</p>'),
    "style loading a url": div('<p style="background:url(https://evil.example/x)">hi</p>'),
    "style expression": div('<p style="width:expression(alert(1))">hi</p>'),
    "svg element": div('<svg xmlns="http://www.w3.org/2000/svg"><a href="#">x</a></svg>'),
    "xlink attribute": div(
        '<a xmlns:xlink="http://www.w3.org/1999/xlink" xlink:href="javascript:x()">hi</a>'
    ),
    "no XHTML namespace": "<div><p>hi</p></div>",
    "not a div": f"<p {NS}>hi</p>",
    "doctype with entities": (
        '<!DOCTYPE div [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        + div("&b;")
    ),
    "processing instruction": div('<?xml-stylesheet href="https://evil.example/x.css"?><p>x</p>'),
    "malformed": div("<p>hi</div>"),
    "html entity": div("<p>a&nbsp;b</p>"),
    "whitespace only (txt-2)": div("<p>   </p>\n<pre>\n</pre>"),
    "empty (txt-2)": div(""),
}

ACCEPTED = {
    "text": div("<p>Referral accepted.</p>"),
    "table": div(
        '<table border="1" cellpadding="2"><thead><tr><th scope="col">Item</th></tr></thead>'
        '<tbody><tr><td colspan="1" style="color: red; font-weight: bold">PHQ-9 12</td></tr>'
        "</tbody></table>"
    ),
    "links": div(
        '<p><a href="https://example.org/x?a=1&amp;b=2">web</a> <a href="#p1">here</a> '
        '<a href="Patient/123">rel</a> <a href="mailto:intake@example.org">mail</a> '
        '<a name="anchor">name</a></p>'
    ),
    "image only": div('<img src="data:image/png;base64,iVBORw0KGgo=" alt=""/>'),
    "contained image": div('<img src="#img1" alt="chart"/>'),
    "language": div('<p xml:lang="fr" lang="fr" dir="ltr">Oui &lt;3 &#233;</p>'),
    "nested namespace declaration": div(f"<p {NS}><b>bold</b> <i>i</i> <br/> x</p>"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_could_run_or_load_is_refused(name: str) -> None:
    assert div_problems(REFUSED[name]), name


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_conforming_narratives_pass(name: str) -> None:
    assert div_problems(ACCEPTED[name]) == []


def test_problems_name_no_content() -> None:
    problems = div_problems(div('<p title="Bartholomew" onclick="steal(\'9123456782\')">x</p>'))
    assert problems and not any("Bartholomew" in p or "9123456782" in p for p in problems)


# ------------------------------------------------------------------ properties

FORBIDDEN_ELEMENTS = [
    "script",
    "iframe",
    "object",
    "embed",
    "form",
    "input",
    "style",
    "link",
    "meta",
    "base",
    "frame",
    "body",
    "head",
    "svg",
    "math",
    "button",
    "textarea",
]
FORBIDDEN_ATTRIBUTES = [
    "onclick",
    "onload",
    "onerror",
    "onmouseover",
    "formaction",
    "srcdoc",
    "xmlns:foo",
    "background",
    "data-x",
    "action",
]
INLINE = sorted(ELEMENTS - {"div", "img", "br", "hr", "col"})
SAFE_ATTRIBUTES = sorted(ATTRIBUTES - {"href", "src", "cite", "longdesc", "style", "xml:lang"})
text_st = st.text(alphabet="abc xyz<>&\"'", min_size=1, max_size=8).filter(lambda s: s.strip())


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _attribute_value(text: str) -> str:
    return _escape(text).replace('"', "&quot;")


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> str:
    element = draw(st.sampled_from(INLINE))
    attrs = draw(st.lists(st.sampled_from(SAFE_ATTRIBUTES), max_size=3, unique=True))
    attr_text = "".join(f' {a}="{_attribute_value(draw(text_st))}"' for a in attrs)
    children = [_escape(draw(text_st))]
    if depth < 2:
        children += draw(st.lists(trees(depth + 1), max_size=2))
    return f"<{element}{attr_text}>{''.join(children)}</{element}>"


@settings(max_examples=150, deadline=None)
@given(body=st.lists(trees(), min_size=1, max_size=3))
def test_any_tree_of_the_allowed_elements_and_attributes_passes(body: list[str]) -> None:
    assert div_problems(div("".join(body))) == []


@settings(max_examples=150, deadline=None)
@given(
    body=st.lists(trees(), min_size=1, max_size=3),
    where=st.integers(0, 3),
    bad=st.one_of(
        st.sampled_from(FORBIDDEN_ELEMENTS).map(lambda e: ("element", e)),
        st.sampled_from(FORBIDDEN_ATTRIBUTES).map(lambda a: ("attribute", a)),
        st.sampled_from(
            ["javascript:x()", "JAVASCRIPT:x()", "java\tscript:x()", " vbscript:x", "data:,x"]
        ).map(lambda u: ("url", u)),
    ),
)
def test_one_forbidden_thing_anywhere_refuses_the_div(
    body: list[str], where: int, bad: tuple[str, str]
) -> None:
    kind, value = bad
    if kind == "element":
        snippet = f"<{value}>x</{value}>"
    elif kind == "attribute":
        prefix = ' xmlns:foo="urn:x"' if value.startswith("xmlns:") else ""
        attr = "foo:x" if value.startswith("xmlns:") else value
        snippet = f'<span{prefix} {attr}="x">x</span>'
    else:
        snippet = f'<a href="{_attribute_value(value)}">x</a>'
    body.insert(min(where, len(body)), snippet)
    assert div_problems(div("".join(body)))


# ------------------------------------------------------------------ every write path


def _patient(narrative: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "text": {"status": "generated", "div": narrative},
        "gender": "female",
    }


def _refused(r: Any, expression: str) -> None:
    assert r.status_code in (400, 422), r.get_json()
    issues = r.get_json()["issue"]
    assert any(expression in i.get("expression", []) for i in issues), issues
    assert all("alert" not in json.dumps(i) for i in issues)


@pytest.fixture
def staff(app: Flask) -> FlaskClient:
    return client_as(app, "staff")


def _count(c: FlaskClient, rtype: str) -> int:
    total: int = c.get(f"/fhir/{rtype}?_summary=count").get_json()["total"]
    return total


BAD = REFUSED["javascript link, disguised"]


def test_create_and_update_refuse_a_bad_narrative(staff: FlaskClient) -> None:
    r = staff.post("/fhir/Patient", data=json.dumps(_patient(BAD)), content_type=FHIR)
    _refused(r, "Patient.text.div")
    put = staff.put(
        "/fhir/Patient/p-narr",
        data=json.dumps({**_patient(BAD), "id": "p-narr"}),
        content_type=FHIR,
    )
    _refused(put, "Patient.text.div")
    contained = {
        **_patient(ACCEPTED["text"]),
        "contained": [
            {"resourceType": "Organization", "id": "o1", **{"text": _patient(BAD)["text"]}}
        ],
    }
    r = staff.post("/fhir/Patient", data=json.dumps(contained), content_type=FHIR)
    _refused(r, "Patient.contained[0].text.div")
    assert _count(staff, "Patient") == 0
    ok = staff.post(
        "/fhir/Patient", data=json.dumps(_patient(ACCEPTED["table"])), content_type=FHIR
    )
    assert ok.status_code == 201
    assert ok.get_json()["text"]["div"] == ACCEPTED["table"]  # stored as sent


def test_composition_sections_are_checked(staff: FlaskClient) -> None:
    composition = {
        "resourceType": "Composition",
        "status": "final",
        "type": {"text": "note"},
        "date": "2026-01-05",
        "author": [{"display": "Program"}],
        "title": "Note",
        "section": [
            {"title": "ok", "text": {"status": "generated", "div": ACCEPTED["text"]}},
            {"title": "bad", "text": {"status": "generated", "div": REFUSED["script"]}},
        ],
    }
    r = staff.post("/fhir/Composition", data=json.dumps(composition), content_type=FHIR)
    _refused(r, "Composition.section[1].text.div")


def test_transactions_store_nothing_and_batches_refuse_only_that_entry(staff: FlaskClient) -> None:
    entries = [
        {"resource": _patient(ACCEPTED["text"]), "request": {"method": "POST", "url": "Patient"}},
        {"resource": _patient(REFUSED["iframe"]), "request": {"method": "POST", "url": "Patient"}},
    ]
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    r = staff.post("/fhir", data=json.dumps(tx), content_type=FHIR)
    _refused(r, "Bundle.entry[1].resource.text.div")
    assert _count(staff, "Patient") == 0
    batch = staff.post("/fhir", data=json.dumps({**tx, "type": "batch"}), content_type=FHIR)
    assert batch.status_code == 200
    statuses = [e["response"]["status"] for e in batch.get_json()["entry"]]
    assert statuses[0].startswith("201") and statuses[1][:3] in ("400", "422")
    assert _count(staff, "Patient") == 1


def test_process_message_refuses_a_bad_narrative(app: Flask) -> None:
    referrer = client_as(app, "referrer")
    message = as_message(transform(referrer, referral()))
    patient = next(
        e["resource"] for e in message["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    patient["text"] = {"status": "generated", "div": REFUSED["event handler"]}
    answer = process(referrer, message).get_json()
    header, details = (e["resource"] for e in answer["entry"])
    assert header["response"]["code"] == "fatal-error"
    (problem,) = details["issue"]
    assert problem["code"] == "invariant" and problem["expression"] == ["Patient.text.div"]
    assert _count(client_as(app, "staff"), "ServiceRequest") == 0
