"""R4's rules for narrative XHTML (``Narrative.div``): invariants txt-1 and txt-2.

Owns: checking every ``div`` in a resource (``text``, ``contained[*].text``,
``Composition.section[*].text``, nested sections) before it is stored and forwarded to partner
EHRs and referrers' EMRs, where a ``<script>``, an event handler or a ``javascript:`` link would
run in someone else's browser. Must not: rewrite or "clean" a narrative (a narrative is part of
the record: it is accepted as sent or refused with the element's path), or echo its content.

The element and attribute lists are R4's own, from the txt-1 XPath of
``StructureDefinition/Narrative`` (hl7.fhir.r4.core 4.0.1): "only the basic html formatting
elements and attributes described in chapters 7-11 (except section 4 of chapter 9) and 15 of the
HTML 4.0 standard, <a> elements (either name or href), images and internally contained style
attributes"; the narrative page adds that the XHTML "SHALL NOT contain a head, a body, external
stylesheet references, scripts, forms, base/link/xlink, frames, iframes and objects", and the
div is in the XHTML namespace. Beyond the lists, URLs (``href``, ``src``, ``cite``,
``longdesc``) may only use schemes that cannot run script, and ``style`` may not load anything
or run script (``url(``, ``expression(``, ``@import``, ``behavior``, ``-moz-binding``):
"internally contained style" only. The parser is the standard library's expat, with DOCTYPEs
(and so entity definitions) and processing instructions refused before anything expands.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from xml.parsers import expat

from fhir_kat.errors import Issue, issue

XHTML = "http://www.w3.org/1999/xhtml"
XML = "http://www.w3.org/XML/1998/namespace"

#: txt-1's elements (R4 4.0.1, StructureDefinition-Narrative, constraint txt-1 XPath).
ELEMENTS = frozenset(
    [
        "a",
        "abbr",
        "acronym",
        "b",
        "big",
        "blockquote",
        "br",
        "caption",
        "cite",
        "code",
        "col",
        "colgroup",
        "dd",
        "dfn",
        "div",
        "dl",
        "dt",
        "em",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "hr",
        "i",
        "img",
        "li",
        "ol",
        "p",
        "pre",
        "q",
        "samp",
        "small",
        "span",
        "strong",
        "sub",
        "sup",
        "table",
        "tbody",
        "td",
        "tfoot",
        "th",
        "thead",
        "tr",
        "tt",
        "ul",
        "var",
    ]
)
#: txt-1's attributes (the same XPath), plus ``xml:lang`` (the XML form of ``lang``).
ATTRIBUTES = frozenset(
    [
        "abbr",
        "accesskey",
        "align",
        "alt",
        "axis",
        "bgcolor",
        "border",
        "cellhalign",
        "cellpadding",
        "cellspacing",
        "cellvalign",
        "char",
        "charoff",
        "charset",
        "cite",
        "class",
        "colspan",
        "compact",
        "coords",
        "dir",
        "frame",
        "headers",
        "height",
        "href",
        "hreflang",
        "hspace",
        "id",
        "lang",
        "longdesc",
        "name",
        "nowrap",
        "rel",
        "rev",
        "rowspan",
        "rules",
        "scope",
        "shape",
        "span",
        "src",
        "start",
        "style",
        "summary",
        "tabindex",
        "title",
        "type",
        "valign",
        "value",
        "vspace",
        "width",
    ]
) | {"xml:lang"}
URL_ATTRIBUTES = frozenset({"href", "src", "cite", "longdesc"})
#: Schemes a narrative link may use: none of them runs script in a browser.
SAFE_SCHEMES = frozenset({"http", "https", "mailto", "tel", "urn", "ftp"})
#: Inline images only in raster formats (an SVG ``data:`` image can carry script).
SAFE_DATA_IMAGE = re.compile(r"data:image/(png|gif|jpeg|jpg|bmp|webp)[;,]", re.IGNORECASE)
UNSAFE_STYLE = re.compile(
    r"url\s*\(|expression\s*\(|@import|behavior|-moz-binding|javascript:", re.I
)
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*):")
_IGNORED_IN_URLS = re.compile(r"[\x00-\x20\x7f]+")
MAX_PROBLEMS = 5  # per div: enough to act on, not a page of the same mistake


class _Refused(Exception):
    """Stops the parse at the first thing that must not be expanded or interpreted."""


def narrative_issues(resource: Any, where: str) -> list[Issue]:
    """Every txt-1/txt-2 problem in ``resource``'s narratives, each naming the div's path."""
    problems: list[Issue] = []
    for path, div in _divs(resource, where):
        problems.extend(
            issue("invariant", f"narrative: {problem}", path) for problem in div_problems(div)
        )
    return problems


def _divs(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "div" and not isinstance(value, dict | list):
                yield f"{path}.div", value
            elif isinstance(value, dict | list):
                yield from _divs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _divs(item, f"{path}[{i}]")


def div_problems(div: Any) -> list[str]:
    """What breaks txt-1 or txt-2 in one ``div`` (empty: it conforms)."""
    if not isinstance(div, str):
        return ["div must be an XHTML string"]
    checker = _Checker()
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.StartDoctypeDeclHandler = checker.doctype
    parser.EntityDeclHandler = checker.entity
    parser.ProcessingInstructionHandler = checker.instruction
    parser.StartElementHandler = checker.start
    parser.CharacterDataHandler = checker.text
    try:
        parser.Parse(div, True)
    except _Refused as refused:
        return [*checker.problems, str(refused)][:MAX_PROBLEMS]
    except expat.ExpatError as exc:
        where = f"line {exc.lineno} column {exc.offset}"
        return [f"div is not well-formed XHTML ({expat.errors.messages[exc.code]}, {where})"]
    if not checker.problems and not checker.content:
        checker.problems.append("div must have some non-whitespace content or an image (txt-2)")
    return checker.problems[:MAX_PROBLEMS]


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.content = False
        self.depth = 0

    def doctype(self, *_args: Any) -> None:
        raise _Refused("a DOCTYPE (or entity declaration) is not allowed in a narrative")

    def entity(self, *_args: Any) -> None:
        raise _Refused("an entity declaration is not allowed in a narrative")

    def instruction(self, *_args: Any) -> None:
        raise _Refused("a processing instruction is not allowed in a narrative")

    def text(self, data: str) -> None:
        if data.strip():
            self.content = True

    def start(self, name: str, attributes: dict[str, str]) -> None:
        namespace, _, local = name.rpartition(" ")
        first = self.depth == 0
        self.depth += 1
        if first and (local != "div" or namespace != XHTML):
            self._problem(f'the root must be <div xmlns="{XHTML}">')
        elif namespace != XHTML:
            self._problem(f"<{local}> is not in the XHTML namespace")
        elif local not in ELEMENTS:
            self._problem(f"<{local}> is not allowed in a narrative (txt-1)")
        for key, value in attributes.items():
            attr_ns, _, attr = key.rpartition(" ")
            qualified = f"xml:{attr}" if attr_ns == XML else attr if not attr_ns else None
            if qualified is None or qualified not in ATTRIBUTES:
                self._problem(f"attribute {attr} on <{local}> is not allowed (txt-1)")
            elif attr in URL_ATTRIBUTES and not _safe_url(value, local, attr):
                self._problem(f"the {attr} of <{local}> uses a scheme that is not allowed")
            elif attr == "style" and UNSAFE_STYLE.search(value):
                self._problem(f"the style of <{local}> may not load or run anything")
        if local == "img" and attributes.get("src"):
            self.content = True

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)


def _safe_url(value: str, element: str, attribute: str) -> bool:
    # Browsers ignore whitespace and control characters inside a scheme ("java\tscript:").
    url = _IGNORED_IN_URLS.sub("", value)
    scheme = _SCHEME.match(url)
    if scheme is None:
        return True  # relative, or a fragment (#id of a contained resource)
    name = scheme.group(1).lower()
    if name == "data":
        return element == "img" and attribute == "src" and bool(SAFE_DATA_IMAGE.match(url))
    return name in SAFE_SCHEMES
