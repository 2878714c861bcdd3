"""Bad inputs against the API: schemathesis over every operation of the OpenAPI document
(more examples than tests/server/test_api_fuzz.py), the malformed JSONL corpus
(tests/malformed_jsonl.py) through POST /v1/files, and malformed JSON bodies on every JSON
route. Prints one table: route, cases, 2xx, 4xx, 5xx, and `wrong` (a corpus file answered
otherwise than expected: not 400 naming its bad line, or not 200 when valid).

    python bench/bad_inputs.py                          # in-process app on a temp SQLite
    python bench/bad_inputs.py --examples 200 --postgres --redis

The app runs in process (the same `create_app` as `mixloom api`), so an exception that
would be a 500 is counted as one instead of stopping the run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from malformed_jsonl import FILENAME, cases, check  # noqa: E402

from mixloom.config import Settings  # noqa: E402
from mixloom.server.app import create_app  # noqa: E402
from mixloom.storage import migrate, tenants  # noqa: E402
from mixloom.storage.testing import fresh_postgres_database  # noqa: E402

GOOD = b'{"prompt": "2+2=", "completion": "4"}\n'
BAD_JSON_BODIES = [
    b"[" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"seed": ' + b"9" * 5000 + b"}",
    b'{"model": "\xff\xfe"}',
    b'{"model": "\\ud800"}',
    b'{"model": "a\\u0000"}',
    b'{"seed": NaN}',
    b'{"seed": -Infinity}',
    b'{"seed": 1e999}',
    b'{"model": ',
    b"\x00",
    '{"model": "x"}'.encode("utf-16"),
]


class Tally:
    def __init__(self) -> None:
        self.rows: dict[str, Counter[str]] = defaultdict(Counter)

    def add(self, route: str, status: int, wrong: bool = False) -> None:
        row = self.rows[route]
        row["cases"] += 1
        row[f"{status // 100}xx"] += 1
        row["wrong"] += wrong

    def print(self) -> None:
        width = max(len(r) for r in self.rows)
        cols = ("cases", "2xx", "4xx", "5xx", "wrong")
        print(f"{'route':<{width}}  " + "  ".join(f"{c:>5}" for c in cols))
        total: Counter[str] = Counter()
        for route in sorted(self.rows):
            row = self.rows[route]
            total.update(row)
            print(f"{route:<{width}}  " + "  ".join(f"{row[c]:>5}" for c in cols))
        print(f"{'total':<{width}}  " + "  ".join(f"{total[c]:>5}" for c in cols))


@contextmanager
def database(postgres: bool, folder: Path) -> Iterator[str]:
    if postgres:
        with fresh_postgres_database() as url:
            migrate.upgrade(url)
            yield url
    else:
        url = f"sqlite:///{folder / 'mixloom.db'}"
        migrate.upgrade(url)
        yield url


def fuzz(app: Any, auth: dict[str, str], examples: int, tally: Tally) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            case.headers = {**(case.headers or {}), **auth}
            try:
                status = case.call().status_code
            except Exception:  # an exception out of the app: what a server answers as 500
                status = 500
            tally.add(case.operation.label, status)

        run()


def corpus(client: TestClient, auth: dict[str, str], tally: Tally) -> list[str]:
    wrong = []
    for case in cases():
        r = client.post(
            "/v1/files",
            headers=auth,
            files={"file": (FILENAME, case.data)},
            data={"purpose": "fine-tune"},
        )
        why = check(case, r.status_code, r.json() if r.status_code < 500 else {})
        tally.add("POST /v1/files (malformed JSONL corpus)", r.status_code, why is not None)
        if why:
            wrong.append(why)
    return wrong


def json_bodies(client: TestClient, auth: dict[str, str], job_id: str, tally: Tally) -> None:
    routes = [
        ("/v1/fine_tuning/jobs", auth),
        (f"/v1/fine_tuning/jobs/{job_id}/cancel", auth),
        ("/dashboard/session", {}),
    ]
    for url, headers in routes:
        for body in BAD_JSON_BODIES:
            r = client.post(
                url, headers={**headers, "Content-Type": "application/json"}, content=body
            )
            tally.add(f"POST {url.replace(job_id, '{job_id}')} (bad JSON bodies)", r.status_code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100, help="schemathesis cases per route")
    parser.add_argument("--postgres", action="store_true", help="a fresh Postgres database")
    parser.add_argument("--redis", action="store_true", help="the Redis bus (MIXLOOM_TEST_*)")
    args = parser.parse_args()
    started = time.perf_counter()
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp, database(args.postgres, Path(tmp)) as url:
        config = Settings(
            data_dir=Path(tmp) / "data",
            database_url=url,
            redis_url=Settings().test_redis_url if args.redis else None,
        )
        app = create_app(config)
        with TestClient(app, raise_server_exceptions=False) as client:
            with app.state.ctx.db.transaction() as s:
                tenant = tenants.create_tenant(session=s, name="bad-inputs")
                _, key = tenants.create_api_key(session=s, tenant_id=tenant.id)
            auth = {"Authorization": f"Bearer {key}"}
            file_id = client.post(
                "/v1/files",
                headers=auth,
                files={"file": ("good.jsonl", GOOD)},
                data={"purpose": "fine-tune"},
            ).json()["id"]
            job = {
                "model": config.base_model,
                "training_file": file_id,
                "method": {"type": "lora"},
            }
            job_id = client.post("/v1/fine_tuning/jobs", headers=auth, json=job).json()["id"]
            fuzz(app, auth, args.examples, tally)
            wrong = corpus(client, auth, tally)
            json_bodies(client, auth, job_id, tally)
    backend = "postgres" if args.postgres else "sqlite"
    print(
        f"schemathesis {schemathesis.__version__}, {args.examples} examples per route, "
        f"{backend}{' + redis' if args.redis else ''}, {time.perf_counter() - started:.0f} s\n"
    )
    tally.print()
    for why in wrong:
        print("wrong:", why)


if __name__ == "__main__":
    main()
