"""Reading a GGUF file's header: metadata and the tensor table, never the tensor data.

A model reference is a ``.gguf`` path or the first shard of a split model (``*-00001-of-0000N.gguf``): every shard's
header is read and the tensor tables are joined. The parser works on a byte prefix of the file, so the same code reads
a local file (a few reads from the start) and a remote one (HTTP range requests, :mod:`tuner.remote`): when the
prefix is too short it raises :class:`NeedMoreBytes` and the caller fetches more.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (magic ``GGUF``, version 2 or 3, little endian).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, NoReturn

from tuner import records as rec
from tuner.errors import TunerError
from tuner.ggml import GGML_TYPES, GgmlType, ggml_type, tensor_bytes
from tuner.paths import cache_dir, write_atomic
from tuner.records import read_json_file
from tuner.untrusted import shown

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
# Arrays longer than this (tokenizer vocabularies, merges, token types and scores) are counted, not decoded.
MAX_DECODED_ARRAY = 4096
# A local read starts with this many bytes: real Qwen3.5 headers (tokenizer + merges) are 10-13 MB.
LOCAL_FIRST_READ = 16 << 20
# Bounds from the format (gguf.md, llama.cpp's ggml/src/gguf.cpp and src/llama-hparams.h), each far above any real
# model: the family's largest, Qwen3.5-397B-A17B, has 60 blocks, about 1,100 tensors, ~50 keys and a 10-13 MB header
# (248,320 tokens and 247,587 merges). A header that claims more is refused with one line naming the key and the limit
# before anything of the claimed size is allocated or requested.
MAX_HEADER_BYTES = 64 << 20  # metadata + tensor table: 5x the largest real header
MAX_KV = 16384  # metadata keys (real: ~50)
MAX_TENSORS = 65536  # 512 layers (LLAMA_MAX_LAYERS, src/llama-hparams.h:11) x 128 tensors (real: < 2,000)
MAX_ARRAY = 1 << 22  # elements of one array: 16x the real 248,320 tokens
MAX_STRING = 16 << 20  # bytes of one string value (real: a chat template of ~10-20 kB)
MAX_KEY_BYTES = (1 << 16) - 1  # gguf.md: "It must be at most 2^16-1 (65535) bytes long"
MAX_TENSOR_NAME = 63  # GGML_MAX_NAME (ggml/include/ggml.h:229) counts the NUL; gguf.cpp:653 refuses longer names
MAX_SHARDS = 1024  # files of one split model (real: at most a few dozen)
_MAX_DIMS = 4  # GGML_MAX_DIMS: gguf.cpp:679
_INT64_MAX = (1 << 63) - 1

SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# GGUF value types (gguf.md): id -> struct format (scalars)
_SCALAR_FORMATS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                                   10: "<Q", 11: "<q", 12: "<d"}
_TYPE_STRING = 8
_U64 = struct.Struct("<Q")
_TYPE_ARRAY = 9


class NeedMoreBytes(Exception):
    """The byte prefix ended inside the header; at least ``needed`` bytes are required."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


@dataclass(frozen=True)
class ArraySummary:
    """A long array (``tokenizer.ggml.tokens``, ``.merges``, ``.token_type`` …) kept as its length only."""

    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. ``shape[0]`` is the row length (ggml ``ne[0]``)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GgmlType
    offset: int  # relative to the data section of its shard
    nbytes: int
    shard: int = 0

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GgufHeader:
    """What one GGUF file (or all shards of a split model) says about itself."""

    paths: tuple[str, ...]  # one per shard: local paths or URLs
    version: int
    metadata: dict[str, Any] = field(repr=False)
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    file_bytes: int  # all shards together
    header_bytes: int  # all shards' headers (metadata + tensor table + alignment padding)

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


class _Cursor:
    """Little-endian reads from a byte prefix; running off its end raises NeedMoreBytes, running past
    MAX_HEADER_BYTES a TunerError naming the key being read (``where``)."""

    def __init__(self, buf: bytes | memoryview, *, grow_hint: int, source: str) -> None:
        self.raw = bytes(buf) if isinstance(buf, memoryview) else buf
        self.buf = memoryview(self.raw)
        self.pos = 0
        self.grow_hint = grow_hint
        self.source = source
        self.where = "the header"

    def fail(self, problem: str) -> TunerError:
        return TunerError(f"{self.source}: GGUF {self.where}: {problem}")

    def grow(self, end: int) -> NoReturn:
        """Ask for a prefix of at least ``end`` bytes (more, to save round trips), never past MAX_HEADER_BYTES."""
        if end > MAX_HEADER_BYTES:
            raise self.fail(f"the header would be larger than the limit of {MAX_HEADER_BYTES} bytes "
                            f"({MAX_HEADER_BYTES >> 20} MiB; real headers are 10-13 MB)")
        raise NeedMoreBytes(min(max(end, len(self.buf) + self.grow_hint), MAX_HEADER_BYTES))

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            self.grow(end)
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size))[0]

    def u32(self) -> int:
        return self.unpack("<I")

    def u64(self) -> int:
        return self.unpack("<Q")

    def string(self, limit: int = MAX_STRING) -> str:
        n = self.u64()
        if n > limit:
            raise self.fail(f"a string of {n} bytes, more than the limit of {limit}")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Skip ``count`` length-prefixed strings (a vocabulary of 250k tokens in a few tens of ms). Each string
        takes at least its 8-byte length, so an array that cannot fit in MAX_HEADER_BYTES is refused unread."""
        if self.pos + 8 * count > MAX_HEADER_BYTES:
            raise self.fail(f"{count} strings take at least {8 * count} bytes: the header would be larger than the "
                            f"limit of {MAX_HEADER_BYTES} bytes")
        buf, pos = self.raw, self.pos
        unpack_from = _U64.unpack_from
        try:
            for _ in repeat(None, count):
                pos += 8 + unpack_from(buf, pos)[0]
        except (struct.error, OverflowError):  # ran off the prefix, or a huge length jumped far past it
            self.grow(pos + 8)
        if pos > len(buf):
            self.grow(pos)
        self.pos = pos


def _read_array(cur: _Cursor) -> Any:
    etype = cur.u32()
    count = cur.u64()
    if count > MAX_ARRAY:
        raise cur.fail(f"an array of {count} elements, more than the limit of {MAX_ARRAY}")
    efmt = _SCALAR_FORMATS.get(etype)
    if efmt is not None:
        size = struct.calcsize(efmt)
        raw = cur.take(size * count)
        if count > MAX_DECODED_ARRAY:  # per-token types or scores: nothing tuner sizes depends on them
            return ArraySummary(count)
        return list(struct.unpack(f"<{count}{efmt[1]}", raw))
    if etype == _TYPE_STRING:
        if count > MAX_DECODED_ARRAY:
            cur.skip_strings(count)
            return ArraySummary(count)
        return [cur.string() for _ in range(count)]
    if etype == _TYPE_ARRAY:  # gguf.cpp:606-611 refuses them too: nothing can nest
        raise cur.fail("an array of arrays (llama.cpp reads no nested arrays)")
    raise cur.fail(f"unknown array element type {etype}")


def _read_value(cur: _Cursor, vtype: int) -> Any:
    fmt = _SCALAR_FORMATS.get(vtype)
    if fmt is not None:
        return cur.unpack(fmt)
    if vtype == _TYPE_STRING:
        return cur.string()
    if vtype == _TYPE_ARRAY:
        return _read_array(cur)
    raise cur.fail(f"unknown value type {vtype}")


@dataclass(frozen=True)
class ParsedShard:
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int  # where the tensor data section starts


def parse_header(buf: bytes | memoryview, *, shard: int = 0, source: str = "GGUF file") -> ParsedShard:
    """Parse a GGUF header from a prefix of the file. Raises NeedMoreBytes when the prefix is too short, and a
    TunerError naming the key and the limit when the header breaks one of the bounds above (it never asks for more
    than MAX_HEADER_BYTES)."""
    cur = _Cursor(buf, grow_hint=max(1 << 20, len(buf)), source=source)
    magic = bytes(cur.take(4))
    if magic != GGUF_MAGIC:
        raise TunerError(f"{source} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = cur.u32()
    if version not in (2, 3):
        raise TunerError(f"{source}: unsupported GGUF version {version} (tuner reads versions 2 and 3)")
    n_tensors = cur.u64()
    n_kv = cur.u64()
    if n_tensors > MAX_TENSORS:
        raise cur.fail(f"{n_tensors} tensors, more than the limit of {MAX_TENSORS}")
    if n_kv > MAX_KV:
        raise cur.fail(f"{n_kv} metadata keys, more than the limit of {MAX_KV}")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        cur.where = f"key #{i}"
        key = cur.string(MAX_KEY_BYTES)
        cur.where = f"key {shown(key)}"
        if not key:
            raise cur.fail("an empty key name")
        if key in metadata:  # gguf.cpp:575-578 refuses them: which value would llama.cpp use?
            raise cur.fail("the key appears twice")
        metadata[key] = _read_value(cur, cur.u32())
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):  # gguf.cpp:614-629
        cur.where = "key 'general.alignment'"
        raise cur.fail(f"{shown(alignment)} is not a power of 2")
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        cur.where = f"tensor #{i}"
        name = cur.string(MAX_TENSOR_NAME)
        cur.where = f"tensor {name!r}"
        if name in names:  # gguf.cpp:664-667
            raise cur.fail("the tensor name appears twice")
        names.add(name)
        n_dims = cur.u32()
        if n_dims > _MAX_DIMS:
            raise cur.fail(f"{n_dims} dimensions, more than ggml's {_MAX_DIMS}")
        shape = tuple(cur.u64() for _ in range(n_dims))
        n_elements = 1
        for d in shape:
            n_elements *= d
        if any(d > _INT64_MAX for d in shape) or n_elements > _INT64_MAX:  # gguf.cpp:685-718
            raise cur.fail(f"shape {list(shape)} overflows a 64-bit element count")
        type_id = cur.u32()
        offset = cur.u64()
        gtype = GGML_TYPES.get(type_id)
        if gtype is None:
            raise TunerError(f"{source}: tensor {name!r} has unknown ggml type {type_id}")
        try:
            nbytes = tensor_bytes(gtype, shape)
        except TunerError as exc:
            raise TunerError(f"{source}: tensor {name!r}: {exc}") from None
        tensors.append(TensorInfo(name, shape, gtype, offset, nbytes, shard))
    data_offset = -(-cur.pos // alignment) * alignment
    return ParsedShard(version, metadata, tuple(tensors), data_offset)


def parse_growing(read_prefix: Callable[[int], bytes], size_bytes: int, *, shard: int, source: str,
                  first_read: int = 1 << 20) -> ParsedShard:
    """Parse with a reader of file prefixes, asking for more bytes until the header is complete."""
    want = min(first_read, size_bytes)
    while True:
        buf = read_prefix(want)
        try:
            return parse_header(buf, shard=shard, source=source)
        except NeedMoreBytes as more:
            if len(buf) >= size_bytes:
                raise TunerError(f"{source} is truncated: the header ends at byte {size_bytes}"
                                 " before the tensor table is complete") from None
            want = min(max(more.needed, want * 4), size_bytes, MAX_HEADER_BYTES)


def check_data_fits(parsed: ParsedShard, size_bytes: int, source: str) -> None:
    """Every tensor's data must lie inside the file: a short file is a truncated download."""
    if not parsed.tensors:  # no data section to pad to (gguf.cpp:781 seeks to it only when there are tensors)
        return
    end = max((t.offset + t.nbytes for t in parsed.tensors), default=0) + parsed.data_offset
    if end > size_bytes:
        missing = end - size_bytes
        raise TunerError(f"{source} is truncated: tensor data needs {end} bytes but the file has {size_bytes}"
                         f" ({missing} bytes missing; re-download it)")


def split_name(name: str) -> tuple[str, int, int] | None:
    """``(prefix, shard number, shard count)`` of a split file name (``…-00002-of-00003.gguf``), None for a file
    that is not split; a TunerError naming the file when its numbers cannot be (``-00000-of-``, ``-00003-of-00002``,
    more than MAX_SHARDS)."""
    m = SPLIT_RE.match(name)
    if not m:
        return None
    no, count = int(m.group("no")), int(m.group("count"))
    if not 1 <= no <= count or count > MAX_SHARDS:
        raise TunerError(f"{name!r} is no split model file: shard {no} of {count} (a split has 1 to {MAX_SHARDS} "
                         "files, numbered from 1)")
    return m.group("prefix"), no, count


def shard_paths(first: str) -> list[str]:
    """All shard names of a split model given the first (``…-00001-of-00003.gguf``); else ``[first]``."""
    split = split_name(first)
    if split is None:
        return [first]
    prefix, no, count = split
    if no != 1:
        raise TunerError(f"{first} is shard {no} of {count}: give the first shard (-00001-of-…)")
    return [f"{prefix}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def _split_key(meta: dict[str, Any], key: str, path: str, limit: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= limit:
        raise TunerError(f"{path}: GGUF key {key!r} is {shown(value)}, expected a whole number 0..{limit}")
    return value


def join_shards(paths: list[str], parsed: list[ParsedShard], sizes: list[int]) -> GgufHeader:
    """One header for a (possibly split) model: metadata of the first shard, all tensors."""
    first = parsed[0]
    split_count = _split_key(first.metadata, "split.count", paths[0], MAX_SHARDS)
    if split_count is not None and split_count != len(paths):
        raise TunerError(f"{paths[0]} says it is split into {split_count} files, found {len(paths)}")
    tensors = tuple(t for p in parsed for t in p.tensors)
    expected = _split_key(first.metadata, "split.tensors.count", paths[0], MAX_TENSORS * MAX_SHARDS)
    if expected is not None and expected != len(tensors):
        raise TunerError(f"split model {paths[0]}: shards hold {len(tensors)} tensors, expected {expected}")
    return GgufHeader(
        paths=tuple(paths),
        version=first.version,
        metadata=first.metadata,
        tensors=tensors,
        file_bytes=sum(sizes),
        header_bytes=sum(p.data_offset for p in parsed),
    )


# --- a parsed header as plain JSON (the header caches of local files and Hub files) ---------------------------------

# 3: written only by a parser that enforces the bounds above (an entry of format 2 may hold a header they refuse)
HEADER_CACHE_FORMAT = 3


def _encode(value: Any) -> Any:
    if isinstance(value, ArraySummary):
        return {"array": value.count}
    if isinstance(value, list) and value and isinstance(value[0], list | ArraySummary):
        return [_encode(v) for v in value]  # GGUF arrays are homogeneous: only nested ones need a walk
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return ArraySummary(value["array"])
    if isinstance(value, list) and value and isinstance(value[0], list | dict):
        return [_decode(v) for v in value]
    return value


def shard_to_dict(parsed: ParsedShard, size_bytes: int) -> dict[str, Any]:
    """A parsed shard as JSON-ready data, with the size of the file it was read from."""
    return {
        "format": HEADER_CACHE_FORMAT, "size": size_bytes, "version": parsed.version,
        "data_offset": parsed.data_offset,
        "metadata": {k: _encode(v) for k, v in parsed.metadata.items()},
        "tensors": [[t.name, list(t.shape), t.ggml_type.type_id, t.offset] for t in parsed.tensors],
    }


# What a cache entry may hold (tuner.records): the bounds of the parser above, so an entry it could not have written is
# a miss, never a header it would have refused. A metadata value is a scalar, a decoded array of at most
# MAX_DECODED_ARRAY scalars or strings, or a long array's length (``{"array": n}``); GGUF arrays do not nest.
_SCALAR = (int, float, bool, str)
_ARRAY_SUMMARY = rec.record(array=rec.integer(0, MAX_ARRAY))
_CACHED_STRING = rec.string(MAX_STRING, control=True)


def _cached_value(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return _ARRAY_SUMMARY(value, where)
    if isinstance(value, list):
        if len(value) > MAX_DECODED_ARRAY or not all(isinstance(v, _SCALAR) for v in value):
            raise rec.RecordError(where, f"expected at most {MAX_DECODED_ARRAY} scalars")
        return [_CACHED_STRING(v, where) if isinstance(v, str) else v for v in value]
    if isinstance(value, str):
        return _CACHED_STRING(value, where)
    if not isinstance(value, _SCALAR):
        raise rec.RecordError(where, "expected a GGUF value")
    return value


_DIM = rec.integer(0, _INT64_MAX)
CACHED_SHARD = rec.record(
    format=rec.integer(HEADER_CACHE_FORMAT, HEADER_CACHE_FORMAT), size=rec.integer(1, _INT64_MAX),
    version=rec.integer(2, 3), data_offset=rec.integer(0, MAX_HEADER_BYTES),
    metadata=rec.map_of(_cached_value, MAX_KV, key_chars=MAX_KEY_BYTES),
    tensors=rec.seq_of(rec.tuple_of(rec.string(MAX_TENSOR_NAME, control=True), rec.seq_of(_DIM, _MAX_DIMS),
                                    rec.integer(0, (1 << 32) - 1), _DIM), MAX_TENSORS))


def shard_from_dict(data: Any, shard: int) -> tuple[ParsedShard, int] | None:
    """A shard from :func:`shard_to_dict`'s data, or None when it is of another format or fails
    :data:`CACHED_SHARD` (a cache file is only as trustworthy as the folder it sits in: a bad entry is a miss)."""
    try:
        data = rec.validate(CACHED_SHARD, data)
        tensors = []
        for name, shape, type_id, offset in data["tensors"]:
            t = ggml_type(type_id)
            info = TensorInfo(name, shape, t, offset, tensor_bytes(t, shape), shard)
            if info.n_elements > _INT64_MAX:
                return None
            tensors.append(info)
        if len({t.name for t in tensors}) != len(tensors):
            return None
        metadata = {k: _decode(v) for k, v in data["metadata"].items()}
    except (rec.RecordError, TunerError):
        return None
    return ParsedShard(data["version"], metadata, tuple(tensors), data["data_offset"]), data["size"]


def _local_cache_path(path: Path, stat: os.stat_result) -> Path:
    """Where the parsed header of a local file is kept: keyed by its absolute path, size and modification time, so
    a changed, truncated or replaced file is read again."""
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}"
    return cache_dir() / "gguf-headers" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _read_shard(shard_path: str, index: int, *, use_cache: bool) -> tuple[ParsedShard, int]:
    p = Path(shard_path)
    try:
        stat = p.stat()
        if stat.st_size == 0:
            raise TunerError(f"{shard_path} is empty (0 bytes)")
        cache_file = _local_cache_path(p, stat) if use_cache else None
        if cache_file is not None and cache_file.is_file():
            with contextlib.suppress(OSError, ValueError, RecursionError):
                hit = shard_from_dict(read_json_file(cache_file), index)  # bounded: a cache is only a cache
                if hit is not None and hit[1] == stat.st_size:
                    return hit
        with open(shard_path, "rb") as fh:

            def read_prefix(n: int) -> bytes:
                fh.seek(0)
                return fh.read(n)

            shard = parse_growing(read_prefix, stat.st_size, shard=index, source=shard_path,
                                  first_read=LOCAL_FIRST_READ)
    except OSError as exc:  # permissions, I/O errors, a file that vanished: still one line
        raise TunerError(f"cannot read {shard_path}: {exc.strerror or exc}") from None
    check_data_fits(shard, stat.st_size, shard_path)
    if cache_file is not None:
        with contextlib.suppress(OSError):  # a read-only cache only costs speed
            write_atomic(cache_file, json.dumps(shard_to_dict(shard, stat.st_size), separators=(",", ":")),
                         durable=False)
    return shard, stat.st_size


def read_gguf(path: str | os.PathLike[str], *, use_cache: bool = True) -> GgufHeader:
    """Read the header of a local GGUF file or split model. Reads only the header bytes of each shard, and keeps
    what it parsed in the user cache (a Qwen3.5 header holds ~500k tokenizer strings: parsing it is most of a
    ``tuner estimate``), so the next read of an unchanged file parses nothing."""
    first = str(path)
    p = Path(first)
    if p.is_dir():
        raise TunerError(f"{first} is a directory, not a GGUF file")
    if not p.exists():
        raise TunerError(f"no such file: {first}")
    if not p.is_file():  # a FIFO would block the read, a device has no size
        raise TunerError(f"{first} is not a regular file (a pipe or a device?), not a GGUF file")
    paths = shard_paths(first)
    missing = [q for q in paths if not Path(q).is_file()]
    if missing:
        raise TunerError(f"split model is missing {len(missing)} of {len(paths)} shards: {Path(missing[0]).name}"
                         + (" …" if len(missing) > 1 else ""))
    shards = [_read_shard(q, i, use_cache=use_cache) for i, q in enumerate(paths)]
    return join_shards(paths, [parsed for parsed, _ in shards], [size for _, size in shards])
