#!/usr/bin/env bash
# mixloom at another revision against the working tree, end to end, alternating in one run so
# that drift of the machine hits both alike:
#   bash bench/ab.sh REV [ROUNDS] [bench_e2e.py options...]
# e.g. bash bench/ab.sh 180bbe1 3 --config cpu --jobs 4 16
# Each round runs REV, then the working tree; the tables go to bench/results/ab-<REV>/.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: bench/ab.sh REV [ROUNDS] [bench_e2e.py options]}
rounds=${2:-3}
shift $(($# >= 2 ? 2 : 1))
opts=("$@")
((${#opts[@]})) || opts=(--config cpu --jobs 4 16)
before=$(mktemp -d)
trap 'git worktree remove --force "$before" >/dev/null 2>&1 || true' EXIT
git worktree add --detach -f "$before" "$rev" >/dev/null
out=bench/results/ab-$rev
mkdir -p "$out"
for round in $(seq "$rounds"); do
  for side in before after; do
    tree=$PWD
    [ "$side" = before ] && tree=$before
    echo "round $round: $side ($([ "$side" = before ] && echo "$rev" || echo working tree))"
    PYTHONPATH=$tree python "$tree/bench/bench_e2e.py" --systems mixloom "${opts[@]}" \
      --json "$out/$side-$round.json" | tee "$out/$side-$round.md" | grep '^| mixloom'
  done
done
python - "$out" "$rounds" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rates = {}
for side in ("before", "after"):
    for r in range(1, rounds + 1):
        for row in json.load(open(f"{out}/{side}-{r}.json"))["rows"]:
            if "tokens_per_s" in row:
                rates.setdefault((row["jobs"], side), []).append(row["tokens_per_s"])
print("\n| jobs | before tok/s (each round) | after tok/s (each round) | after / before (medians) |")
print("| ---: | --- | --- | ---: |")
for jobs in sorted({j for j, _ in rates}):
    b, a = rates.get((jobs, "before"), []), rates.get((jobs, "after"), [])
    ratio = statistics.median(a) / statistics.median(b) if a and b else float("nan")
    fmt = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)
    print(f"| {jobs} | {fmt(b)} | {fmt(a)} | {ratio:.3f} |")
EOF
