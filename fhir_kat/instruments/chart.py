"""An SVG chart of mean baseline vs post score per instrument (the paper's Figure 2), written by
hand: a dozen rectangles need no plotting library, and the output is deterministic text."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from fhir_kat.instruments.outcomes import GroupResult

WIDTH, HEIGHT, MARGIN, BAR = 640, 320, 48, 36
COLOURS = {"baseline": "#7f8fa6", "post": "#2e86de"}


def outcome_chart_svg(results: Sequence[GroupResult], title: str) -> str:
    """Bars are scaled to each instrument's maximum score, labelled with the mean itself."""
    plot_h = HEIGHT - 2 * MARGIN
    slot = (WIDTH - 2 * MARGIN) / max(len(results), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" font-family="sans-serif" '
        f'font-size="15">{escape(title)}</text>',
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" '
        f'y2="{HEIGHT - MARGIN}" stroke="#333"/>',
    ]
    for i, r in enumerate(results):
        x0 = MARGIN + i * slot + (slot - 2 * BAR) / 2
        for j, (label, value) in enumerate((("baseline", r.mean_baseline), ("post", r.mean_post))):
            if value is None:
                continue
            h = plot_h * value / r.instrument.max
            x = x0 + j * BAR
            y = HEIGHT - MARGIN - h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{BAR - 4}" height="{h:.1f}" '
                f'fill="{COLOURS[label]}"><title>{label} mean {value:g}</title></rect>'
            )
            parts.append(
                f'<text x="{x + (BAR - 4) / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle" '
                f'font-family="sans-serif" font-size="11">{value:g}</text>'
            )
        parts.append(
            f'<text x="{MARGIN + i * slot + slot / 2:.1f}" y="{HEIGHT - MARGIN + 18}" '
            f'text-anchor="middle" font-family="sans-serif" font-size="12">'
            f"{escape(r.instrument.title)} (n={r.denominator})</text>"
        )
    for k, (label, colour) in enumerate(COLOURS.items()):
        parts.append(
            f'<rect x="{WIDTH - MARGIN - 150 + k * 80}" y="36" width="12" height="12" '
            f'fill="{colour}"/><text x="{WIDTH - MARGIN - 134 + k * 80}" y="46" '
            f'font-family="sans-serif" font-size="11">{label}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def outcome_table(results: Sequence[GroupResult]) -> str:
    rows = [
        f"{'instrument':<10} {'positive at baseline':>21} {'with post':>10} {'improved':>9} "
        f"{'%':>6} {'mean pre':>9} {'mean post':>10}"
    ]
    for r in results:
        pct = f"{100 * r.score:.0f}" if r.score is not None else "-"
        pre = f"{r.mean_baseline:g}" if r.mean_baseline is not None else "-"
        post = f"{r.mean_post:g}" if r.mean_post is not None else "-"
        rows.append(
            f"{r.instrument.title:<10} {r.initial_population:>21} {r.denominator:>10} "
            f"{r.numerator:>9} {pct:>6} {pre:>9} {post:>10}"
        )
    return "\n".join(rows)
