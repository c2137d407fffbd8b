"""Shares of a py-spy profile (``py-spy record --format raw``, Brendan Gregg's folded stacks):
for every function, the share of the samples under ``--root`` (default: Flask's
``full_dispatch_request``, i.e. inside requests) that had it on the stack, counted once per
sample however deep it recurses. ``--match`` keeps only functions whose frame contains it.

    python -m bench.profile_shares /tmp/obs.txt --top 40
    python -m bench.profile_shares /tmp/obs.txt --match fhir_kat/store
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def shares(path: Path, root: str) -> tuple[Counter[str], int]:
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        at = next((i for i, f in enumerate(frames) if root in f), None)
        if at is None:
            continue
        n = int(count)
        total += n
        for frame in {_LINE.sub(")", f) for f in frames[at:]}:
            inclusive[frame] += n
    return inclusive, total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile", type=Path)
    parser.add_argument("--root", default="full_dispatch_request")
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--match", default="")
    args = parser.parse_args()
    inclusive, total = shares(args.profile, args.root)
    print(f"{total} samples under {args.root}")
    shown = 0
    for frame, n in inclusive.most_common():
        if args.match in frame:
            print(f"{100 * n / total:5.1f} %  {frame}")
            shown += 1
            if shown >= args.top:
                break


if __name__ == "__main__":
    main()
