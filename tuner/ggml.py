"""ggml constants in one table: tensor types with their block sizes, the KV cache types llama.cpp accepts.

The ids, block sizes and bytes per block are ggml's (ggml/src/ggml-common.h; the same figures as gguf-py's
``GGML_QUANT_SIZES``, which a test checks this table against). They are written out here rather than imported so
that reading a header does not pay for importing numpy. Everything that turns element counts into bytes goes
through :func:`row_bytes` / :func:`tensor_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from tuner.errors import TunerError


@dataclass(frozen=True)
class GgmlType:
    """One ggml tensor type: ``block_size`` elements take ``type_bytes`` bytes."""

    type_id: int
    name: str  # lower case, as llama.cpp prints it: "q8_0", "f16", "q4_K"
    block_size: int
    type_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_bytes / self.block_size


# (type id as stored in GGUF, name as llama.cpp prints it, elements per block, bytes per block)
_TABLE: tuple[GgmlType, ...] = (
    GgmlType(0, "f32", 1, 4),
    GgmlType(1, "f16", 1, 2),
    GgmlType(2, "q4_0", 32, 18),
    GgmlType(3, "q4_1", 32, 20),
    GgmlType(6, "q5_0", 32, 22),
    GgmlType(7, "q5_1", 32, 24),
    GgmlType(8, "q8_0", 32, 34),
    GgmlType(9, "q8_1", 32, 40),
    GgmlType(10, "q2_K", 256, 84),
    GgmlType(11, "q3_K", 256, 110),
    GgmlType(12, "q4_K", 256, 144),
    GgmlType(13, "q5_K", 256, 176),
    GgmlType(14, "q6_K", 256, 210),
    GgmlType(15, "q8_K", 256, 292),
    GgmlType(16, "iq2_xxs", 256, 66),
    GgmlType(17, "iq2_xs", 256, 74),
    GgmlType(18, "iq3_xxs", 256, 98),
    GgmlType(19, "iq1_s", 256, 50),
    GgmlType(20, "iq4_nl", 32, 18),
    GgmlType(21, "iq3_s", 256, 110),
    GgmlType(22, "iq2_s", 256, 82),
    GgmlType(23, "iq4_xs", 256, 136),
    GgmlType(24, "i8", 1, 1),
    GgmlType(25, "i16", 1, 2),
    GgmlType(26, "i32", 1, 4),
    GgmlType(27, "i64", 1, 8),
    GgmlType(28, "f64", 1, 8),
    GgmlType(29, "iq1_m", 256, 56),
    GgmlType(30, "bf16", 1, 2),
    GgmlType(34, "tq1_0", 256, 54),
    GgmlType(35, "tq2_0", 256, 66),
    GgmlType(39, "mxfp4", 32, 17),
    GgmlType(40, "nvfp4", 64, 36),
    GgmlType(41, "q1_0", 128, 18),
)
GGML_TYPES: dict[int, GgmlType] = {t.type_id: t for t in _TABLE}
_BY_NAME: dict[str, GgmlType] = {t.name.lower(): t for t in GGML_TYPES.values()}

# --cache-type-k / --cache-type-v values llama.cpp accepts (common/arg.cpp:304-314).
KV_CACHE_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

# CUDA pads each quantized tensor by up to one row of this many elements (ggml-cuda.cu MATRIX_ROW_PADDING).
CUDA_MATRIX_ROW_PADDING = 512


def ggml_type(key: int | str) -> GgmlType:
    """Look a type up by id (as stored in GGUF) or by name (``q8_0``, ``Q4_K``, ``bf16``)."""
    found = GGML_TYPES.get(key) if isinstance(key, int) else _BY_NAME.get(str(key).lower())
    if found is None:
        raise TunerError(f"unknown ggml tensor type {key!r}")
    return found


def kv_cache_type(name: str) -> GgmlType:
    """A ``--cache-type-k/v`` value, validated against the list llama.cpp accepts."""
    if str(name).lower() not in KV_CACHE_TYPES:
        raise TunerError(f"unknown cache type {name!r} (llama.cpp accepts: {', '.join(KV_CACHE_TYPES)})")
    return ggml_type(name)


def is_quantized(t: GgmlType) -> bool:
    """Block-quantized (q8_0, q4_K, iq4_nl …); f32/f16/bf16 and integer types are not."""
    return t.block_size > 1


def row_bytes(t: GgmlType, n_elements: int) -> int:
    """Bytes of one row of ``n_elements`` (``ggml_row_size``). The row must hold whole blocks."""
    if n_elements % t.block_size:
        raise TunerError(f"a row of {n_elements} elements is not a whole number of {t.name} blocks")
    return n_elements // t.block_size * t.type_bytes


def tensor_bytes(t: GgmlType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor (``ggml_nbytes`` for a contiguous tensor); ``shape[0]`` is the row length."""
    if not shape:
        return t.type_bytes
    return row_bytes(t, shape[0]) * prod(shape[1:])
