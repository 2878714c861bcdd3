"""The object store interface against both backends: a local directory and a real S3 server
(`moto_server` on loopback): put/get/stream/list/delete, atomic writes, a failed upload
leaves nothing, a folder counts only once its manifest is there, and a dead store is
StoreUnavailableError (never a hang, never a half-written object)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3 import Moto, free_port, moto_server

from mixloom.config import Settings
from mixloom.storage import objects
from mixloom.storage.objects import (
    LocalStore,
    ObjectMissingError,
    ObjectStore,
    S3Store,
    StoreUnavailableError,
)


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


def _s3(moto: Moto, bucket: str, **kwargs: object) -> S3Store:
    moto.settings(bucket)  # makes the bucket
    return S3Store(
        bucket,
        "some/prefix",
        endpoint_url=moto.url,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    moto: Moto = request.getfixturevalue("moto")
    return _s3(moto, f"b-{abs(hash(str(tmp_path))) % 10**8}")


class Failing(io.RawIOBase):
    """Reads `good` bytes, then raises (a client that hangs up mid-upload)."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: object) -> int:
        assert isinstance(buffer, memoryview)
        if self.left <= 0:
            raise ConnectionResetError("the client went away")
        n = min(len(buffer), self.left)
        buffer[:n] = b"x" * n
        self.left -= n
        return n


def test_put_get_stream_list_delete(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = os.urandom(3 * objects.CHUNK + 17)
    src.write_bytes(data)
    store.put_file("files/t1/a.bin", src)
    store.put_stream("files/t1/b.txt", io.BytesIO(b"line one\nline two\n"))
    store.put_stream("files/t2/c.txt", io.BytesIO(b""))

    assert store.size("files/t1/a.bin") == len(data)
    assert store.size("files/t1/none") is None
    chunks = list(store.iter_bytes("files/t1/a.bin"))
    assert b"".join(chunks) == data and max(map(len, chunks)) <= objects.CHUNK
    with store.open("files/t1/b.txt") as f:
        assert f.readline() == b"line one\n"
        assert f.read() == b"line two\n"
    store.get_file("files/t1/a.bin", tmp_path / "out" / "a.bin")
    assert (tmp_path / "out" / "a.bin").read_bytes() == data
    assert store.list("files/t1/") == ["files/t1/a.bin", "files/t1/b.txt"]
    assert store.list("files/") == ["files/t1/a.bin", "files/t1/b.txt", "files/t2/c.txt"]

    store.delete(["files/t1/a.bin", "files/t1/never-there"])
    assert store.list("files/t1/") == ["files/t1/b.txt"]
    with pytest.raises(ObjectMissingError):
        store.open("files/t1/a.bin")
    store.delete_prefix("files/")
    assert store.list("files/") == []


def test_rows_locations_resolve_back_to_the_store(store: ObjectStore, tmp_path: Path) -> None:
    store.put_stream("jobs/j/checkpoints/step-2/x.json", io.BytesIO(b"{}"))
    location = store.location("jobs/j/checkpoints/step-2")
    where, key = objects.resolve(store, location)
    assert where is store and key == "jobs/j/checkpoints/step-2"
    got = objects.fetch_folder(store, location, tmp_path / "cache")
    assert (got / "x.json").read_bytes() == b"{}"
    objects.remove(store, location)
    assert store.list("jobs/") == []
    # a row written before object storage: an absolute local path stays readable
    old = tmp_path / "old" / "f.jsonl"
    old.parent.mkdir()
    old.write_bytes(b"{}\n")
    assert objects.fetch(store, str(old), tmp_path / "cache").read_bytes() == b"{}\n"


def test_overwrite_is_atomic_and_a_failed_upload_leaves_nothing(
    store: ObjectStore, tmp_path: Path
) -> None:
    store.put_stream("k/obj", io.BytesIO(b"first version"))
    if isinstance(store, S3Store):
        store.part_bytes = 5 * objects.CHUNK  # S3's smallest part: a multipart upload
    good = 12 * objects.CHUNK  # two whole parts sent before the failure
    with pytest.raises(ConnectionResetError):
        store.put_stream("k/obj", io.BufferedReader(Failing(good)))
    with pytest.raises(ConnectionResetError):
        store.put_stream("k/new", io.BufferedReader(Failing(good)))
    # readers see the old object whole, the new one not at all
    assert b"".join(store.iter_bytes("k/obj")) == b"first version"
    assert store.list("k/") == ["k/obj"]
    if isinstance(store, S3Store):
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket)
        assert uploads.get("Uploads", []) == []  # aborted: no parts left billed
    else:
        assert sorted(p.name for p in (tmp_path / "store" / "k").iterdir()) == ["obj"]


def test_a_multipart_upload_round_trips(moto: Moto, tmp_path: Path) -> None:
    store = _s3(moto, "multipart", part_bytes=5 * objects.CHUNK)
    data = os.urandom(11 * objects.CHUNK + 3)  # three parts, the last short
    store.put_stream("big", io.BytesIO(data))
    assert store.size("big") == len(data)
    assert b"".join(store.iter_bytes("big")) == data


def test_a_folder_is_written_manifest_last_and_a_failure_removes_its_objects(
    store: ObjectStore, tmp_path: Path
) -> None:
    folder = tmp_path / "step-4"
    folder.mkdir()
    for name in ("a.safetensors", "manifest.json", "z_state.pt"):
        (folder / name).write_bytes(name.encode())
    order: list[str] = []
    put = store.put_file

    def recording(key: str, path: Path) -> None:
        order.append(key.rsplit("/", 1)[1])
        put(key, path)

    store.put_file = recording  # type: ignore[method-assign]
    store.put_folder(folder, "jobs/j/step-4", last="manifest.json")
    assert order == ["a.safetensors", "z_state.pt", "manifest.json"]
    store.get_folder("jobs/j/step-4", tmp_path / "back")
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == sorted(order)

    def failing(key: str, path: Path) -> None:
        if key.endswith("z_state.pt"):
            raise StoreUnavailableError("object store unreachable")
        put(key, path)

    store.put_file = failing  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailableError):
        store.put_folder(folder, "jobs/j/step-8", last="manifest.json")
    assert store.list("jobs/j/step-8/") == []
    with pytest.raises(ObjectMissingError):
        store.get_folder("jobs/j/step-8", tmp_path / "none")


def test_an_unreachable_store_is_unavailable_not_a_hang(tmp_path: Path) -> None:
    dead = S3Store(
        "bucket",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    )
    for call in (
        lambda: dead.put_stream("k", io.BytesIO(b"x")),
        lambda: dead.open("k"),
        lambda: dead.list(""),
        lambda: dead.delete(["k"]),
    ):
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            call()


def test_settings_choose_the_store(moto: Moto, tmp_path: Path) -> None:
    local = objects.open_store(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalStore) and local.root == tmp_path
    s3 = objects.open_store(Settings(data_dir=tmp_path, **moto.settings("chosen")))
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("chosen", "mixloom")
    assert s3.location("files/x") == "s3://chosen/mixloom/files/x"
    url = s3.presign("files/x", "x.jsonl", 60)
    assert url is not None and url.startswith(moto.url) and "Signature" in url
    with pytest.raises(ValueError, match="MIXLOOM_STORAGE_URL"):
        objects.parse_url("https://bucket")
