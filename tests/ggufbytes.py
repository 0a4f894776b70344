"""GGUF headers written byte by byte, for tests of hostile files: every count, type and length is whatever the test
says, including what the gguf package's writer would never produce (a u8 array that claims 2^40 elements, a key
written twice, arrays nested 5000 deep, a tensor with 5 dimensions). Format: ggml's docs/gguf.md (little endian)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# value type ids (gguf.md)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FORMATS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
            U64: "<Q", I64: "<q", F64: "<d"}
F16_TYPE = 1  # ggml type id of f16


def gstr(text: str | bytes, *, claimed: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw


def value(vtype: int, v: Any) -> bytes:
    if vtype == STR:
        return gstr(v)
    return struct.pack(_FORMATS[vtype], v)


def array(etype: int, items: Sequence[Any], *, claimed: int | None = None) -> bytes:
    """An array value (without its leading type id): element type, count, elements."""
    body = b"".join(value(etype, v) for v in items)
    return struct.pack("<IQ", etype, len(items) if claimed is None else claimed) + body


@dataclass(frozen=True)
class KV:
    """One metadata pair; ``raw`` replaces the encoded value (after the type id) when given."""

    key: str | bytes
    vtype: int
    value: Any = None
    raw: bytes | None = None

    def encode(self) -> bytes:
        if self.raw is not None:
            body = self.raw
        elif self.vtype == ARR:
            etype, items = self.value
            body = array(etype, items)
        else:
            body = value(self.vtype, self.value)
        return gstr(self.key) + struct.pack("<I", self.vtype) + body


def tensor_info(name: str | bytes, shape: Sequence[int], type_id: int = F16_TYPE, offset: int = 0) -> bytes:
    return gstr(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape) \
        + struct.pack("<IQ", type_id, offset)


def header(kvs: Iterable[KV | bytes], tensors: Iterable[bytes] = (), *, n_kv: int | None = None,
           n_tensors: int | None = None, magic: bytes = b"GGUF", version: int = 3, pad: bool = True) -> bytes:
    """A whole header; ``pad`` aligns its end to 32 bytes (where the data section of the tensors would start)."""
    kv_bytes = [kv.encode() if isinstance(kv, KV) else kv for kv in kvs]
    tensor_bytes = list(tensors)
    out = magic + struct.pack("<IQQ", version, len(tensor_bytes) if n_tensors is None else n_tensors,
                              len(kv_bytes) if n_kv is None else n_kv) + b"".join(kv_bytes) + b"".join(tensor_bytes)
    return out + b"\0" * (-len(out) % 32 if pad else 0)


# A small qwen35moe that passes every check up to the tensors (it has none): the base that one hostile key changes.
BASE_KVS: tuple[KV, ...] = (
    KV("general.architecture", STR, "qwen35moe"),
    KV("general.name", STR, "hostile"),
    KV("qwen35moe.block_count", U32, 4),
    KV("qwen35moe.context_length", U32, 4096),
    KV("qwen35moe.embedding_length", U32, 256),
    KV("qwen35moe.attention.head_count", U32, 4),
    KV("qwen35moe.attention.head_count_kv", U32, 2),
    KV("qwen35moe.expert_count", U32, 8),
    KV("qwen35moe.expert_used_count", U32, 2),
)


def with_kv(*changes: KV, base: Sequence[KV] = BASE_KVS) -> list[KV]:
    """``base`` with each change replacing the pair of the same key, or appended."""
    out = list(base)
    for change in changes:
        at = next((i for i, kv in enumerate(out) if kv.key == change.key), None)
        if at is None:
            out.append(change)
        else:
            out[at] = change
    return out


def write(path: Path, data: bytes, *, size: int | None = None) -> Path:
    """Write ``data``, then extend the file to ``size`` bytes (a sparse tail: no disk used) when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        if size is not None and size > len(data):
            fh.truncate(size)
    return path


def write_sparse(path: Path, parts: Iterable[bytes | int], *, size: int | None = None) -> Path:
    """Write ``parts`` one after the other, an int being that many zero bytes left as a hole (a 64 MB header of
    empty strings costs no disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for part in parts:
            if isinstance(part, int):
                fh.seek(part, 1)
            else:
                fh.write(part)
        fh.truncate(max(fh.tell(), size or 0))
    return path
