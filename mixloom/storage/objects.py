"""Bytes in object storage: one interface over a local directory (the embedded default) and
any S3-compatible store, so that the API and the workers share nothing but the database,
the bus and the store.

An object is named by a key (`files/<tenant>/<file>.jsonl`, `jobs/<job>/checkpoints/step-N/
<file>`); a database row holds its location (`ObjectStore.location`): an absolute path for
the local store (rows written before object storage keep working as they are), an
`s3://bucket/prefix/key` URL for S3. `resolve(store, location)` turns a row's location back
into (store, key).

Every write is atomic: a reader sees the whole object or none (the local store writes a
temp file and renames it; S3's PUT and CompleteMultipartUpload are atomic), and a failed
upload leaves nothing (the multipart upload is aborted). A folder of several objects (a
checkpoint) is written with its manifest last: readers treat one without it as absent.

Torch-free: the API process uses it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from mixloom.errors import MixloomError

if TYPE_CHECKING:
    from mixloom.config import Settings

log = logging.getLogger("mixloom.objects")

CHUNK = 1 << 20  # bytes per read while streaming an object in or out
# S3 multipart: parts of this size (S3's minimum is 5 MiB for all but the last part); an
# upload smaller than one part is a single PUT.
PART_BYTES = 8 * CHUNK
TMP_MARK = ".tmp"  # a local write in progress (renamed into place when whole)
S3_SCHEME = "s3://"
# A dead store should answer 503 in seconds, not after boto's default minute of retries.
S3_CONNECT_TIMEOUT_S = 3.0
S3_READ_TIMEOUT_S = 30.0
S3_ATTEMPTS = 2
STORE_RETRY_AFTER_S = 5  # Retry-After of a 503 while the store is unreachable


class StoreUnavailableError(MixloomError):
    """The object store cannot be reached (or answers 5xx) now; retry later."""


class ObjectMissingError(FileNotFoundError):
    """No object under that key (deleted, or never written whole)."""


class ObjectStore(ABC):
    """Bytes under keys. Keys use '/' and never start with it."""

    @abstractmethod
    def location(self, key: str) -> str:
        """What a database row records for the object (or folder) at `key`."""

    @abstractmethod
    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        """Store the file at `path` under `key`, atomically; `move`: the caller no longer
        needs `path` (the local store renames it into place)."""

    @abstractmethod
    def put_stream(self, key: str, source: IO[bytes]) -> None:
        """Store what `source` reads until its end under `key`, atomically, never holding
        more than one part in memory; a failure leaves no object."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A buffered reader of the object (`readline` works); ObjectMissingError."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size in bytes; None when there is none."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys of the objects under `prefix` (a folder: end it with '/'), sorted."""

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Remove the objects (missing ones are no error)."""

    def presign(self, key: str, filename: str, seconds: int) -> str | None:
        """A URL that downloads the object without credentials for `seconds`, saved as
        `filename`; None when the store cannot make one (the local store)."""
        return None

    def get_file(self, key: str, dest: Path) -> None:
        """Copy the object to `dest` (a temp file renamed into place: whole or absent)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}{TMP_MARK}{os.getpid()}.{threading.get_ident()}")
        try:
            with self.open(key) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        """The object in chunks of at most CHUNK bytes (ObjectMissingError on the first)."""
        with self.open(key) as src:
            while block := src.read(CHUNK):
                yield block

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under `prefix` (a folder: end it with '/')."""
        self.delete(self.list(prefix))

    def put_folder(self, folder: Path, prefix: str, *, last: str | None = None) -> None:
        """Store each file of `folder` as `prefix/<name>`, `last` after all the others (a
        manifest: the folder counts as written only once it is there). On a failure the
        objects written are removed, as far as the store allows."""
        files = sorted(p for p in folder.iterdir() if p.is_file())
        files.sort(key=lambda p: p.name == last)
        written: list[str] = []
        try:
            for path in files:
                key = f"{prefix}/{path.name}"
                self.put_file(key, path)
                written.append(key)
        except BaseException:
            try:
                self.delete(written)
            except Exception as exc:  # the store went away: the manifest never came
                log.warning("could not remove a partial upload under %s: %s", prefix, exc)
            raise

    def get_folder(self, prefix: str, dest: Path) -> None:
        """Copy every object under `prefix/` into folder `dest` (written beside it and
        renamed into place: whole or absent)."""
        keys = self.list(prefix + "/")
        if not keys:
            raise ObjectMissingError(f"nothing stored under {prefix}")
        partial = dest.with_name(f"{dest.name}.partial{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(parents=True)
            for key in keys:
                name = key[len(prefix) + 1 :]
                if "/" not in name:
                    self.get_file(key, partial / name)
            shutil.rmtree(dest, ignore_errors=True)
            partial.rename(dest)
        finally:
            shutil.rmtree(partial, ignore_errors=True)


class LocalStore(ObjectStore):
    """A directory: key `a/b` is the file `root/a/b`. A location is the file's path; an
    absolute key is a path outside root (rows written before object storage)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def location(self, key: str) -> str:
        return str(self.path(key))

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        dest = self.path(key)
        if dest.exists() and os.path.samefile(dest, path):
            return  # written in place already (a worker's checkpoint in the data dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(path, dest)
            return
        with open(path, "rb") as src:
            self._write(dest, src)

    def put_stream(self, key: str, source: IO[bytes]) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._write(dest, source)

    def _write(self, dest: Path, source: IO[bytes]) -> None:
        tmp = dest.with_name(f"{dest.name}{TMP_MARK}{os.getpid()}.{threading.get_ident()}")
        try:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(source, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self.path(key), "rb")
        except FileNotFoundError:
            raise ObjectMissingError(f"no object {key}") from None

    def size(self, key: str) -> int | None:
        path = self.path(key)
        return path.stat().st_size if path.is_file() else None

    def list(self, prefix: str) -> list[str]:
        base = self.path(prefix.rstrip("/")) if prefix.endswith("/") else self.path(prefix)
        folder = base if prefix.endswith("/") else base.parent
        if not folder.is_dir():
            return []
        found = []
        for p in folder.rglob("*"):
            if not p.is_file() or TMP_MARK in p.name:
                continue
            key = str(p) if Path(prefix).is_absolute() else p.relative_to(self.root).as_posix()
            if key.startswith(prefix):
                found.append(key)
        return sorted(found)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        if prefix.endswith("/") and self.path(prefix.rstrip("/")).is_dir():
            shutil.rmtree(self.path(prefix.rstrip("/")), ignore_errors=True)
            return
        super().delete_prefix(prefix)

    def get_file(self, key: str, dest: Path) -> None:
        source = self.path(key)
        if dest.exists() and source.exists() and os.path.samefile(dest, source):
            return
        super().get_file(key, dest)


class _Body(io.RawIOBase):
    """An S3 response body as a raw stream, so that io.BufferedReader can give readline."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._body.read(len(buffer))
        except Exception as exc:
            raise _unavailable(exc) or exc from exc
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


def _unavailable(exc: BaseException) -> StoreUnavailableError | None:
    """StoreUnavailableError when `exc` says the store is unreachable or failing now."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ConnectionError | HTTPClientError):
        return StoreUnavailableError(f"object store unreachable: {exc}")
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status >= 500:
            return StoreUnavailableError(f"object store failing (HTTP {status}): {exc}")
    return None


def _missing(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("NoSuchKey", "404", "NotFound")


class S3Store(ObjectStore):
    """A bucket (and a prefix in it) of an S3-compatible store, through boto3."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        part_bytes: int = PART_BYTES,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_bytes = part_bytes
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(
                connect_timeout=S3_CONNECT_TIMEOUT_S,
                read_timeout=S3_READ_TIMEOUT_S,
                retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"},
            ),
        )

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    def location(self, key: str) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self._name(key)}"

    def key_of(self, location: str) -> str | None:
        """The key of an s3:// location in this bucket and prefix; None otherwise."""
        head = self.location("")
        return location[len(head) :] if location.startswith(head) else None

    def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except Exception as exc:
            if _missing(exc):
                raise ObjectMissingError(f"no object {kwargs.get('Key', '')}") from exc
            if (down := _unavailable(exc)) is not None:
                raise down from exc
            raise

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        with open(path, "rb") as src:
            self.put_stream(key, src)

    def put_stream(self, key: str, source: IO[bytes]) -> None:
        name = self._name(key)
        first = _read_full(source, self.part_bytes)
        if len(first) < self.part_bytes:  # one PUT: atomic
            self._call("put_object", Key=name, Body=first)
            return
        upload = self._call("create_multipart_upload", Key=name)["UploadId"]
        try:
            parts = []
            block, number = first, 1
            while block:
                done = self._call(
                    "upload_part", Key=name, UploadId=upload, PartNumber=number, Body=block
                )
                parts.append({"PartNumber": number, "ETag": done["ETag"]})
                block, number = _read_full(source, self.part_bytes), number + 1
            self._call(
                "complete_multipart_upload",
                Key=name,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            try:
                self._call("abort_multipart_upload", Key=name, UploadId=upload)
            except Exception as exc:  # the store's lifecycle rules expire it instead
                log.warning("could not abort the multipart upload of %s: %s", key, exc)
            raise

    def open(self, key: str) -> BinaryIO:
        body = self._call("get_object", Key=self._name(key))["Body"]
        return io.BufferedReader(_Body(body), CHUNK)

    def size(self, key: str) -> int | None:
        try:
            return int(self._call("head_object", Key=self._name(key))["ContentLength"])
        except ObjectMissingError:
            return None

    def list(self, prefix: str) -> list[str]:
        found: list[str] = []
        token: dict[str, Any] = {}
        while True:
            page = self._call("list_objects_v2", Prefix=self._name(prefix), **token)
            found += [self._key(o["Key"]) for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(found)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, keys: Iterable[str]) -> None:
        names = [{"Key": self._name(k)} for k in keys]
        for start in range(0, len(names), 1000):  # S3's most per request
            self._call("delete_objects", Delete={"Objects": names[start : start + 1000]})

    def presign(self, key: str, filename: str, seconds: int) -> str | None:
        params = {
            "Bucket": self.bucket,
            "Key": self._name(key),
            "ResponseContentDisposition": f'attachment; filename="{filename}"',
        }
        return str(
            self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=seconds)
        )


def _read_full(source: IO[bytes], n: int) -> bytes:
    """Up to n bytes, fewer only at the end (a socket's read may return less)."""
    parts, left = [], n
    while left:
        block = source.read(left)
        if not block:
            break
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; ValueError naming the setting otherwise."""
    if not url.startswith(S3_SCHEME) or not url[len(S3_SCHEME) :].split("/")[0]:
        raise ValueError(
            f"MIXLOOM_STORAGE_URL={url!r} is not s3://bucket[/prefix]; unset it for the local "
            "data directory"
        )
    bucket, _, prefix = url[len(S3_SCHEME) :].partition("/")
    return bucket, prefix.strip("/")


_stores: dict[tuple[Any, ...], ObjectStore] = {}
_stores_lock = threading.Lock()


def open_store(settings: Settings) -> ObjectStore:
    """The store the settings name (one per process and configuration): S3 when
    storage_url is set, else the local data directory."""
    identity = (
        settings.storage_url,
        str(settings.data_dir),
        settings.s3_endpoint_url,
        settings.s3_region,
        settings.s3_access_key_id,
    )
    with _stores_lock:
        store = _stores.get(identity)
        if store is None:
            if settings.storage_url:
                bucket, prefix = parse_url(settings.storage_url)
                secret = settings.s3_secret_access_key
                store = S3Store(
                    bucket,
                    prefix,
                    endpoint_url=settings.s3_endpoint_url,
                    region=settings.s3_region,
                    access_key_id=settings.s3_access_key_id,
                    secret_access_key=secret.get_secret_value() if secret else None,
                )
            else:
                store = LocalStore(settings.data_dir)
            _stores[identity] = store
        return store


_ROOT = LocalStore(Path("/"))  # absolute paths: rows written before object storage


def resolve(store: ObjectStore, location: str) -> tuple[ObjectStore, str]:
    """The store and key of a row's location: an s3:// URL in `store`, or a local path
    (the local store's, or one written before object storage)."""
    if location.startswith(S3_SCHEME):
        key = store.key_of(location) if isinstance(store, S3Store) else None
        if key is None:
            raise ObjectMissingError(f"{location} is not in the configured object store")
        return store, key
    if isinstance(store, LocalStore):
        path = Path(location)
        if path.is_relative_to(store.root):
            return store, path.relative_to(store.root).as_posix()
        return store, location  # a path outside root (another data dir): as it is
    return _ROOT, str(Path(location).resolve()).lstrip("/")


def fetch(store: ObjectStore, location: str, cache: Path) -> Path:
    """A local file with the bytes at `location`: the file itself when the store is local,
    else a copy in `cache` (kept: objects under a key never change)."""
    where, key = resolve(store, location)
    if isinstance(where, LocalStore):
        return where.path(key)
    dest = cache / key
    if not dest.exists():
        where.get_file(key, dest)
    return dest


def fetch_folder(store: ObjectStore, location: str, cache: Path) -> Path:
    """fetch's for a folder (an adapter, a checkpoint): every object under it."""
    where, key = resolve(store, location)
    if isinstance(where, LocalStore):
        return where.path(key)
    dest = cache / key
    if not dest.is_dir():
        where.get_folder(key, dest)
    return dest


def remove(store: ObjectStore, location: str, *, only: Iterable[str] | None = None) -> None:
    """Remove what a deleted row stored: the object, or the folder's objects (or just
    the files named in `only` of that folder)."""
    where, key = resolve(store, location)
    if only is not None:
        where.delete(f"{key}/{name}" for name in only)
        return
    if where.size(key) is not None:
        where.delete([key])
        return
    where.delete_prefix(key + "/")
    where.delete(k for k in where.list(key + ".") if k.endswith(".zip"))  # archives.zip_key
    if isinstance(where, LocalStore):
        with contextlib.suppress(OSError):  # not empty: something else lives there
            where.path(key).rmdir()
