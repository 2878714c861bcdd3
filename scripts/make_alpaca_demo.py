"""Regenerate examples/data/alpaca_demo_200.jsonl from the llamafactory 0.9.5 sdist.

    pip download --no-deps --no-binary :all: llamafactory==0.9.5 -d /tmp/lf
    python scripts/make_alpaca_demo.py /tmp/lf/llamafactory-0.9.5.tar.gz

Takes the first 200 rows of data/alpaca_en_demo.json and writes them as JSONL, keys
instruction/input/output, in their original order and text.
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

MEMBER = "llamafactory-0.9.5/data/alpaca_en_demo.json"
OUT = Path(__file__).resolve().parent.parent / "examples" / "data" / "alpaca_demo_200.jsonl"
ROWS = 200


def main(sdist: str) -> None:
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(MEMBER)
        if member is None:
            sys.exit(f"{sdist} has no {MEMBER}")
        rows = json.load(member)[:ROWS]
    with OUT.open("w", encoding="utf-8") as f:
        for r in rows:
            row = {"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
