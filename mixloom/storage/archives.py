"""Adapter downloads, built when they are asked for: a stored adapter (or checkpoint) is a
folder holding its files once; its zip archive is written as it streams out, and the
`mixlora` package's `adapter_model.bin` is made from the safetensors file on the way.

Torch-free on purpose: the API process builds archives and never imports torch. The .bin is
what `torch.save(dict_of_tensors)` writes (a zip of a protocol-2 pickle and one raw record
per tensor), written here byte for byte from the safetensors file, so `torch.load(...,
weights_only=True)` reads it; each record holds exactly its tensor's bytes.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mixloom.storage.objects import ObjectStore

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
META_FILE = "mixloom_adapter.json"
# What an adapter download holds, in this order (a folder may also hold a checkpoint's
# trainer state, which is never downloaded).
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, BIN_FILE, META_FILE)
Format = Literal["safetensors", "mixlora"]
FORMATS: tuple[str, ...] = ("safetensors", "mixlora")
_BLOCK = 1 << 20
# Weights barely compress (~10%); level 1 takes most of that at a fraction of the CPU.
_COMPRESSLEVEL = 1

# safetensors dtype -> (torch storage class, bytes per element)
_STORAGES = {
    "F64": ("DoubleStorage", 8),
    "F32": ("FloatStorage", 4),
    "F16": ("HalfStorage", 2),
    "BF16": ("BFloat16Storage", 2),
    "I64": ("LongStorage", 8),
    "I32": ("IntStorage", 4),
    "I16": ("ShortStorage", 2),
    "I8": ("CharStorage", 1),
    "U8": ("ByteStorage", 1),
    "BOOL": ("BoolStorage", 1),
}


class ArchiveError(Exception):
    """A stored adapter cannot be turned into the asked format (the message says why)."""


def adapter_files(folder: str | Path) -> list[Path]:
    """The files of the adapter stored in `folder` that a download holds."""
    root = Path(folder)
    return [root / name for name in ADAPTER_FILES if (root / name).is_file()]


def adapter_bytes(folder: str | Path) -> int:
    """Bytes of the adapter's own files in `folder` (what the adapter counts in a quota)."""
    return sum(p.stat().st_size for p in adapter_files(folder))


def is_mixlora(folder: str | Path) -> bool:
    try:
        return _is_mixlora_config((Path(folder) / CONFIG_FILE).read_bytes())
    except OSError:
        return False


def _is_mixlora_config(data: bytes) -> bool:
    try:
        config = json.loads(data)
    except ValueError:
        return False
    return str(config.get("peft_type", "")).upper() == "MIXLORA"


def public_metadata(data: bytes) -> bytes:
    """mixloom_adapter.json as a tenant downloads it: without the folder the base model was
    loaded from on the server (its public identity stays)."""
    try:
        meta = json.loads(data)
    except ValueError:
        return data
    base = meta.get("base_model")
    if isinstance(base, dict) and "path" in base:
        meta["base_model"] = {k: v for k, v in base.items() if k != "path"}
        return json.dumps(meta, indent=2).encode()
    return data


def zip_key(folder: str, format: Format) -> str:
    """Where a redirected download's zip of the adapter in `folder` is kept (beside the
    folder: objects.remove deletes it with the folder)."""
    return f"{folder}.{format}.zip"


class ChunkReader(io.RawIOBase):
    """A readable stream over an iterator of byte chunks (a zip as it is written)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            self._left = next(self._chunks, b"")
            if not self._left:
                return 0
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


class _Chunks:
    """A write-only, unseekable sink whose bytes are taken out as they come (zipfile then
    writes sizes after each member, in a data descriptor)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def drain(self) -> Iterator[bytes]:
        if self._parts:
            out = b"".join(self._parts)
            self._parts.clear()
            yield out


def stream_adapter_zip(
    store: ObjectStore, folder: str, format: Format = "safetensors"
) -> Iterator[bytes]:
    """The zip of the adapter stored in `folder` (a key of `store`: a local folder or S3
    objects, each streamed into the zip as it goes out), in chunks as it is written.
    `format`: "safetensors" (its files as stored) or "mixlora" (adapter_model.bin in place
    of the safetensors file: the `mixlora` package reads only that; MixLoRA adapters only).
    FileNotFoundError when the folder holds no adapter."""
    stored = {k[len(folder) + 1 :] for k in store.list(folder + "/")}
    if CONFIG_FILE not in stored:
        raise FileNotFoundError(f"no adapter under {folder}")
    names = [n for n in ADAPTER_FILES if n in stored]
    if WEIGHTS_FILE in stored:  # a folder from before one copy: its .bin stays home
        names = [n for n in names if n != BIN_FILE]
    if format == "mixlora":
        with store.open(f"{folder}/{CONFIG_FILE}") as f:
            mixlora = _is_mixlora_config(f.read())
        if not mixlora:
            raise ArchiveError(
                "format=mixlora is for MixLoRA adapters; a LoRA adapter loads in PEFT from the "
                "default download"
            )
        if WEIGHTS_FILE not in stored:
            raise ArchiveError(f"the stored adapter has no {WEIGHTS_FILE}")
        names = [n for n in names if n not in (WEIGHTS_FILE, BIN_FILE)]
    sink = _Chunks()
    with zipfile.ZipFile(
        sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_COMPRESSLEVEL
    ) as zf:
        for name in names:
            if name == META_FILE:
                with store.open(f"{folder}/{name}") as f:
                    zf.writestr(META_FILE, public_metadata(f.read()))
                continue
            with zf.open(name, "w", force_zip64=True) as out:
                for block in store.iter_bytes(f"{folder}/{name}"):
                    out.write(block)
                    yield from sink.drain()
        if format == "mixlora":
            with (
                store.open(f"{folder}/{WEIGHTS_FILE}") as weights,
                zf.open(BIN_FILE, "w", force_zip64=True) as out,
            ):
                for _ in write_torch_bin(weights, out):
                    yield from sink.drain()
    yield from sink.drain()


def _safetensors_header(f: IO[bytes]) -> tuple[dict[str, Any], int]:
    """The header of a safetensors file and where its data starts."""
    raw = f.read(8)
    if len(raw) != 8:
        raise ArchiveError("not a safetensors file (shorter than its header)")
    (size,) = struct.unpack("<Q", raw)
    if size > 100 * _BLOCK:
        raise ArchiveError("not a safetensors file (header too large)")
    header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _pickle_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])  # BININT1
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)  # BININT
    body = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(body)]) + body  # LONG1


def _pickle_str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _pickle_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def _state_dict_pickle(entries: list[tuple[str, str, list[int]]]) -> bytes:
    """The protocol-2 pickle torch.save writes for {name: tensor}: each tensor rebuilt by
    torch._utils._rebuild_tensor_v2 from storage record `i` (persistent id), offset 0,
    its shape and contiguous strides. `entries`: (name, storage class, shape)."""
    out = [b"\x80\x02", b"}", b"("]  # PROTO 2, EMPTY_DICT, MARK
    for i, (name, storage, shape) in enumerate(entries):
        numel = 1
        for d in shape:
            numel *= d
        strides, step = [], 1
        for d in reversed(shape):
            strides.append(step)
            step *= d
        strides.reverse()
        persistent = _pickle_tuple(
            [
                _pickle_str("storage"),
                _global("torch", storage),
                _pickle_str(str(i)),
                _pickle_str("cpu"),
                _pickle_int(numel),
            ]
        )
        args = _pickle_tuple(
            [
                persistent + b"Q",  # BINPERSID
                _pickle_int(0),
                _pickle_tuple([_pickle_int(d) for d in shape]),
                _pickle_tuple([_pickle_int(s) for s in strides]),
                b"\x89",  # NEWFALSE: requires_grad
                _global("collections", "OrderedDict") + b")R",  # backward hooks: OrderedDict()
            ]
        )
        out += [_pickle_str(name), _global("torch._utils", "_rebuild_tensor_v2"), args, b"R"]
    out += [b"u", b"."]  # SETITEMS, STOP
    return b"".join(out)


def write_torch_bin(weights: str | Path | IO[bytes], out: IO[bytes]) -> Iterator[None]:
    """Write to `out` the file torch.save would write for the tensors of the safetensors
    file `weights` (same names, dtypes, shapes and values), one tensor at a time; yields
    after each block so that a caller can pass the bytes on. `weights` may be a stream (an
    object store's): it is read once, front to back."""
    if isinstance(weights, str | Path):
        with open(weights, "rb") as src:
            yield from write_torch_bin(src, out)
        return
    f = weights
    header, _ = _safetensors_header(f)  # f is now at the data section
    names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    entries = []
    for name in names:
        info = header[name]
        if info["dtype"] not in _STORAGES:
            raise ArchiveError(f"tensor {name!r} has dtype {info['dtype']}, not convertible")
        entries.append((name, _STORAGES[info["dtype"]][0], list(info["shape"])))
    archive = "adapter_model"
    at = 0  # bytes of the data section read so far
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", _state_dict_pickle(entries))
        zf.writestr(f"{archive}/.format_version", "1")
        zf.writestr(f"{archive}/byteorder", "little")
        for i, name in enumerate(names):
            begin, end = header[name]["data_offsets"]
            if begin < at:
                raise ArchiveError(f"tensor {name!r} overlaps the one before it")
            _skip(f, begin - at, name)
            left = end - begin
            with zf.open(f"{archive}/data/{i}", "w", force_zip64=True) as record:
                while left:
                    block = f.read(min(_BLOCK, left))
                    if not block:
                        raise ArchiveError(f"the weights end inside tensor {name!r}")
                    record.write(block)
                    left -= len(block)
                    yield
            at = end
        zf.writestr(f"{archive}/version", "3\n")
    yield


def _skip(f: IO[bytes], n: int, name: str) -> None:
    """Read past n bytes (a gap between tensors) of a stream that may not seek."""
    while n:
        block = f.read(min(_BLOCK, n))
        if not block:
            raise ArchiveError(f"the weights end before tensor {name!r}")
        n -= len(block)
