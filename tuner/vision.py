"""The vision projector (``mmproj-*.gguf``): its weights and the compute buffer its encoder reserves.

llama-server loads the projector after the text model (tools/server/server-context.cpp:1143) on one backend: the
device ``--mmproj-device`` names (tuner does not plan it), else the first ``--device`` entry when ``--device`` is given
(``-dev none``: the CPU; common/arg.cpp:889-893), else the first GPU the backend registry knows, else the CPU;
``--no-mmproj-offload`` keeps it on the CPU (tools/mtmd/clip.cpp:188-208, :func:`tuner.devices.projector_device`).
Two allocations, both on that device (paths in llama.cpp's tree):

* weights: one buffer holding every tensor of the file (clip.cpp:3641-3644), logged as
  ``load_hparams: model size: X MiB`` (the sum of the tensors' bytes, clip.cpp:1236-1245, 2125);
* compute: ggml-alloc's peak over the encoder graph of a warm-up image (clip.cpp:3700-3825), logged as
  ``reserve_compute_meta: <buffer> compute buffer size = X MiB``. Qwen2/2.5/3-VL warm up with 46 x 46 merged tokens,
  (46·2)² = 8464 patches (``set_warmup_n_tokens``, clip.cpp:1668-1685, clip-model.h:210-214), whatever
  ``--image-max-tokens`` says; other projectors with their image size (clip.cpp:1373).

The compute buffer, per warm-up patch, in f32 floats (E = encoder width, F = its MLP width, H = heads, p = patch
size), the largest stage of the graph: the input image and its patch-embedding ``im2col`` (``4.5·p² + E``), an
attention block (``6.5·E``; without flash attention ``7·E`` beside the f32 ``KQ`` matrix of ``patches² · H``
floats, which then dominates) or the MLP (``F + 3·E``). Fitted to the CPU backend's reservations of four
encoders, from 2 blocks of 64 to Qwen3.5's 27 blocks of 1152: within 1 % of each (Qwen3.5's: 248.10 MiB with flash
attention, 4657.81 MiB without; tests/test_vision.py checks small ones against a live llama-server). CUDA's buffers
are not measured.

A real image is encoded into a buffer that ggml-alloc grows to fit, unlogged: up to ``max_image_tokens`` (4096 for
Qwen-VL, 16,384 patches) it is about twice the warm-up's. :attr:`Projector.growth_bytes` is that difference, which
the planner keeps free beside the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuner.errors import TunerError
from tuner.gguf_file import GgufHeader

#: Projector types that warm up with 46 x 46 merged tokens and accept 8..4096 per image (clip.cpp:1668-1685).
QWEN_VL_PROJECTORS = frozenset({"qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger"})  # clip-impl.h:519-521
QWEN_VL_WARMUP_TOKENS = 46 * 46
QWEN_VL_MAX_TOKENS = 4096


@dataclass(frozen=True)
class Projector:
    """A vision projector as the estimate sizes it. The encoder's shape defaults to Qwen3.5/3.6's (27 blocks of
    1152, MLP 4304, 16 heads, 16-pixel patches merged 2 x 2), for a projector known only by its file size."""

    path: str | None
    weights_bytes: int
    projector_type: str = "qwen3vl_merger"
    n_embd: int = 1152
    n_ff: int = 4304
    n_head: int = 16
    n_layer: int = 27
    patch_size: int = 16
    n_merge: int = 2
    image_size: int = 768
    from_header: bool = False  # False: weights are the file's size (its header, a few kB, counted as weights)

    @property
    def warmup_patches(self) -> int:
        if self.projector_type in QWEN_VL_PROJECTORS:
            return QWEN_VL_WARMUP_TOKENS * self.n_merge * self.n_merge
        return (self.image_size // max(self.patch_size, 1)) ** 2

    @property
    def max_patches(self) -> int:
        """Patches of the largest image the encoder takes (larger ones are resized down)."""
        if self.projector_type in QWEN_VL_PROJECTORS:
            return QWEN_VL_MAX_TOKENS * self.n_merge * self.n_merge
        return self.warmup_patches

    def compute_bytes(self, flash_attn: bool = True, patches: int | None = None) -> int:
        """The encoder's compute buffer for an image of ``patches`` (default: the warm-up image, what the load log
        shows); see the module docstring."""
        n = self.warmup_patches if patches is None else patches
        e, p = self.n_embd, self.patch_size
        other = n * 4 * max(4.5 * p * p + e, self.n_ff + 3 * e)
        if flash_attn:
            return int(max(other, n * 4 * 6.5 * e))
        return int(max(other, n * n * self.n_head * 4 + n * 4 * 7.0 * e))

    def growth_bytes(self, flash_attn: bool = True) -> int:
        """How much the compute buffer grows, unlogged, for the largest image beyond the warm-up's."""
        return max(self.compute_bytes(flash_attn, self.max_patches) - self.compute_bytes(flash_attn), 0)

    def total_bytes(self, flash_attn: bool = True) -> int:
        return self.weights_bytes + self.compute_bytes(flash_attn)

    def to_dict(self, flash_attn: bool = True) -> dict[str, Any]:
        return {"file": self.path, "weights_bytes": self.weights_bytes,
                "compute_bytes": self.compute_bytes(flash_attn), "growth_bytes": self.growth_bytes(flash_attn),
                "projector_type": self.projector_type, "warmup_patches": self.warmup_patches,
                "sized_from": "header" if self.from_header else "file size"}


def projector_from_file_size(path: str | None, file_bytes: int) -> Projector:
    """A projector known by its file size only (a card, a listing): Qwen3.5/3.6's encoder shape."""
    return Projector(path, file_bytes)


def _int(meta: dict[str, Any], key: str, default: int, source: str) -> int:
    value = meta.get(key, default)
    if type(value) is not int or not 0 < value < 1 << 20:
        raise TunerError(f"{source}: GGUF key {key} is {value!r}, expected a positive whole number")
    return value


def projector_from_header(header: GgufHeader) -> Projector:
    """A projector read from its GGUF header (``clip.*`` keys, tools/mtmd/clip-impl.h:33-65): its tensors' bytes
    and encoder shape. TunerError when the file is no vision projector."""
    meta, source = header.metadata, header.paths[0]
    if header.arch != "clip":
        raise TunerError(f"{source} is not a vision projector (general.architecture {header.arch!r}, not 'clip')")
    kind = meta.get("clip.projector_type", "")
    if not isinstance(kind, str) or len(kind) > 64:
        raise TunerError(f"{source}: clip.projector_type is {kind!r}, expected a short name")
    return Projector(
        path=source, weights_bytes=header.tensor_bytes, projector_type=kind or "unknown",
        n_embd=_int(meta, "clip.vision.embedding_length", 1152, source),
        n_ff=_int(meta, "clip.vision.feed_forward_length", 4304, source),
        n_head=_int(meta, "clip.vision.attention.head_count", 16, source),
        n_layer=_int(meta, "clip.vision.block_count", 27, source),
        patch_size=_int(meta, "clip.vision.patch_size", 16, source),
        n_merge=_int(meta, "clip.vision.spatial_merge_size", 2, source),
        image_size=_int(meta, "clip.vision.image_size", 768, source),
        from_header=True)


