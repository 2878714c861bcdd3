"""Convert LLaMA-Factory's dpo_en_demo.json into mixloom's (OpenAI's) preference JSONL.

    pip download --no-deps --no-binary :all: llamafactory==0.9.5 -d /tmp/lf
    python scripts/convert_dpo_demo.py /tmp/lf/llamafactory-0.9.5.tar.gz examples/data/dpo_demo.jsonl

SOURCE is the sdist (its data/dpo_en_demo.json is read) or that JSON file itself: a list
of ShareGPT rows, {"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...],
"chosen": {"from": "gpt", "value"}, "rejected": {"from": "gpt", "value"}}. Each becomes
{"input": {"messages": [...]}, "preferred_output": [chosen], "non_preferred_output":
[rejected]} with system/human/gpt as system/user/assistant and the text unchanged, in the
original order.

A row that would not pass mixloom.data.formats (identical chosen and rejected, an empty
message, a conversation that does not end with the human turn, a role other than those
three) is skipped, and so is a repeat of an earlier row; the skips are counted by reason.
The LAST 30 surviving pairs go to OUT's sibling `<stem>_valid.jsonl`
(dpo_demo_valid.jsonl), a held-out split; the rest go to OUT. Both files are validated
whole before the script reports success.
"""

from __future__ import annotations

import json
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from mixloom.data.formats import validate_jsonl_bytes, validate_jsonl_file
from mixloom.errors import Problem

MEMBER = "data/dpo_en_demo.json"
HELD_OUT = 30
ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
# dpo_en_demo.json holds 5 pairs twice; one copy of one of them falls in the last 30 rows
REPEAT = "the same pair as an earlier row (it would train twice, or be held out and trained on)"


def read_rows(source: Path) -> list[dict[str, Any]]:
    if source.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(source) as tar:
            name = next((n for n in tar.getnames() if n.endswith(f"/{MEMBER}")), None)
            member = tar.extractfile(name) if name else None
            if member is None:
                sys.exit(f"{source} has no {MEMBER}")
            rows = json.load(member)
    else:
        rows = json.loads(source.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        sys.exit(f"{source}: expected a JSON list of rows, got {type(rows).__name__}")
    return rows


def _message(turn: Any) -> dict[str, Any]:
    """A ShareGPT turn as a chat message; an unknown speaker keeps its name as the role,
    which validation then reports."""
    if not isinstance(turn, dict):
        return {"role": None, "content": turn}
    speaker = turn.get("from")
    role = ROLES.get(speaker, speaker) if isinstance(speaker, str) else speaker
    return {"role": role, "content": turn.get("value")}


def convert(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "input": {"messages": [_message(t) for t in row.get("conversations") or []]},
        "preferred_output": [_message(row.get("chosen"))],
        "non_preferred_output": [_message(row.get("rejected"))],
    }


def main(source: Path, out: Path) -> None:
    rows = read_rows(source)
    kept: list[str] = []
    seen: dict[str, int] = {}  # line -> the row it came from
    skipped: Counter[str] = Counter()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            problems = [Problem("", f"expected an object, got {type(row).__name__}")]
        else:
            line = json.dumps(convert(row), ensure_ascii=False)
            _, problems = validate_jsonl_bytes(line.encode() + b"\n", filename="row")
        if problems:
            first = problems[0]
            field = first.where.removeprefix("row:1").removeprefix(": ")
            reason = f"{field}: {first.message}" if field else first.message
            print(f"skipped {source.name} row {i}: {reason}")
            skipped[reason] += 1
            continue
        if line in seen:
            print(f"skipped {source.name} row {i}: the same pair as row {seen[line]}")
            skipped[REPEAT] += 1
            continue
        seen[line] = i
        kept.append(line)
    if len(kept) <= HELD_OUT:
        sys.exit(f"only {len(kept)} rows survive; need more than {HELD_OUT} to hold some out")
    out.parent.mkdir(parents=True, exist_ok=True)
    valid = out.with_name(f"{out.stem}_valid{out.suffix}")
    for path, part in ((out, kept[:-HELD_OUT]), (valid, kept[-HELD_OUT:])):
        path.write_text("".join(f"{line}\n" for line in part), encoding="utf-8")
        n, problems = validate_jsonl_file(path, filename=path.name)
        if problems:
            sys.exit("\n".join(str(p) for p in problems))
        print(f"wrote {n} pairs to {path}")
    print(f"{len(kept)} of {len(rows)} rows converted, {sum(skipped.values())} skipped")
    for reason, count in skipped.most_common():
        print(f"  {count} x {reason}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
