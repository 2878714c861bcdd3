"""Faults survived (issue 14): real `mixloom api` and `mixloom worker` processes train three
tenants' jobs (LoRA, MixLoRA, LoRA r=8) on a tiny model through a fault, then every adapter
is compared with an uninterrupted `mixloom train` run of the same jobs (the peer).

    python bench/reliability.py kill9 --n 20        # SIGKILL the worker at 20 random steps
    python bench/reliability.py postgres-restart    # pg_ctl stop/restart -m fast|immediate
    python bench/reliability.py redis-outage        # redis-server killed for 10 s
    python bench/reliability.py datadir-unavailable # data dir read-only, then full (root)
    python bench/reliability.py all                 # all four; one table for RELIABILITY.md

Each scenario starts its own PostgreSQL and redis-server on free ports (never the machine's)
and stops them at the end; the harness is tests/scheduler/faults.py, shared with
tests/scheduler/test_faults_services.py. Columns: runs = faults injected; seen = final job
statuses, API GETs polled during the run that failed, warning/error events by kind; lost =
jobs that did not succeed or whose adapter differs from the uninterrupted run (max |diff| >
1e-5); metrics = steps with duplicate / missing metrics rows, and runs of a job's steps by
two workers interleaved.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "scheduler")]

import faults  # noqa: E402  (tests/scheduler/faults.py)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


HEADER = (
    "| fault | runs | jobs | what tenants saw | lost | metrics (dup / missing / overlap) | time |\n"
    "| --- | ---: | ---: | --- | ---: | --- | ---: |"
)


def row(r: faults.Report) -> str:
    lost = str(len(r.lost)) + (f" ({'; '.join(r.lost)})" if r.lost else "")
    metrics = f"{r.metrics_duplicates} / {r.metrics_missing} / {r.overlaps}"
    return (
        f"| {r.fault} | {r.runs} | {r.jobs} | {r.seen} | {lost} | {metrics} | {r.seconds:.0f} s |"
    )


def notes(r: faults.Report) -> str:
    return "\n".join(f"- {r.fault}: {n}" for n in [*r.notes, *r.crashes, *r.events_detail()])


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tmp", type=Path, help="keep the run's folders (logs) here")
    sub = p.add_subparsers(dest="fault", required=True)
    k = sub.add_parser("kill9", help="SIGKILL the training worker at N random steps")
    k.add_argument("--n", type=int, default=20)
    k.add_argument("--seed", type=int, help="default: random (printed)")
    k.add_argument("--steps", type=int, help="steps per job (default: fits N kills)")
    k.add_argument("--checkpoint-every", type=int, default=2)
    k.add_argument("--lease-seconds", type=float, default=2.0)
    pg = sub.add_parser("postgres-restart", help="restart our PostgreSQL mid-run")
    pg.add_argument("--steps", type=int, default=60)
    pg.add_argument("--lease-seconds", type=float, default=3.0)
    rd = sub.add_parser("redis-outage", help="kill our redis-server mid-run")
    rd.add_argument("--steps", type=int, default=80)
    rd.add_argument("--down-seconds", type=float, default=10.0)
    dd = sub.add_parser("datadir-unavailable", help="data directory read-only, then full")
    dd.add_argument("--steps", type=int, default=60)
    dd.add_argument("--down-seconds", type=float, default=5.0)
    a = sub.add_parser("all", help="every fault in turn, one table")
    a.add_argument("--n", type=int, default=20, help="kill9's kills")
    args = p.parse_args()

    problem = faults.services_problem()
    if problem:
        print(f"cannot run: {problem}", file=sys.stderr)
        return 2
    root = args.tmp or Path(tempfile.mkdtemp(prefix="mixloom-reliability-"))
    root.mkdir(parents=True, exist_ok=True)
    log(f"working under {root}")

    def run(name: str, scenario: object, **kw: object) -> faults.Report:
        folder = root / name
        folder.mkdir(exist_ok=True)
        log(f"{name} ...")
        report = scenario(folder, log=log, **kw)  # type: ignore[operator]
        log(f"{name}: done in {report.seconds:.0f} s, lost {len(report.lost)}")
        return report

    reports = []
    if args.fault in ("kill9", "all"):
        kw = {"n": args.n}
        if args.fault == "kill9":
            kw.update(
                seed=args.seed,
                steps=args.steps,
                checkpoint_every=args.checkpoint_every,
                lease_seconds=args.lease_seconds,
            )
        reports.append(run("kill9", faults.kill9, **kw))
    if args.fault in ("postgres-restart", "all"):
        kw = (
            {}
            if args.fault == "all"
            else {"steps": args.steps, "lease_seconds": args.lease_seconds}
        )
        reports.append(run("postgres-restart", faults.postgres_restart, **kw))
    if args.fault in ("redis-outage", "all"):
        kw = {} if args.fault == "all" else {"steps": args.steps, "down_seconds": args.down_seconds}
        reports.append(run("redis-outage", faults.redis_outage, **kw))
    if args.fault == "datadir-unavailable" and faults.mount_problem():
        print(f"cannot run: {faults.mount_problem()}", file=sys.stderr)
        return 2
    if args.fault == "all" and faults.mount_problem():
        log(f"datadir-unavailable left out: {faults.mount_problem()}")
    elif args.fault in ("datadir-unavailable", "all"):
        kw = {} if args.fault == "all" else {"steps": args.steps, "down_seconds": args.down_seconds}
        reports.append(run("datadir-unavailable", faults.datadir_unavailable, **kw))

    print(HEADER)
    for r in reports:
        print(row(r))
    print()
    for r in reports:
        print(notes(r))
    return 0 if all(not r.lost for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
