"""The GGUF metadata keys tuner reads, with their types and ranges: one table, checked in one place
(:func:`check_metadata`, called by :func:`tuner.layout.layout_from_metadata`) before any of them becomes a number.

A header from anyone's upload can hold a ``block_count`` that is a string, an array or thirty million, a negative
``nextn_predict_layers`` or a per-layer array longer than the model: each is refused here with one line that names
the file, the key, what it holds and what was expected. The ranges are llama.cpp's own where it has one
(``LLAMA_MAX_LAYERS`` = 512 and ``LLAMA_MAX_EXPERTS`` = 1024, src/llama-hparams.h:11-12), else far above any real
model (the family's largest, Qwen3.5-397B-A17B: 60 blocks, 512 experts, a 262,144-token context).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuner.errors import TunerError
from tuner.gguf_file import ArraySummary
from tuner.untrusted import has_control, shown

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS, src/llama-hparams.h:11
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS, src/llama-hparams.h:12
MAX_CONTEXT = 1 << 30  # tokens (real: 262,144; the longest trained contexts are ~10 M)
MAX_WIDTH = 1 << 20  # embedding / feed-forward / state widths (real: at most a few tens of thousands)
MAX_HEADS = 1 << 16  # heads and head sizes (real: at most a few hundred)
MAX_VOCAB = 1 << 24  # tokens (real: 248,320)
MAX_NAME_CHARS = 1024  # general.name (real: a few dozen characters)
MAX_ARCH_CHARS = 64  # general.architecture (real: "qwen35moe")


@dataclass(frozen=True)
class KeySpec:
    """A whole number in ``lo..hi``; ``per_layer``: or an array of them, one per block (``block_count`` long);
    ``flags``: an array of one boolean (or 0/1) per block."""

    lo: int
    hi: int
    per_layer: bool = False
    flags: bool = False


# Keys after the "<arch>." prefix, as tuner.layout reads them.
ARCH_KEYS: dict[str, KeySpec] = {
    "block_count": KeySpec(1, MAX_LAYERS),
    "nextn_predict_layers": KeySpec(0, MAX_LAYERS - 1),
    "embedding_length": KeySpec(1, MAX_WIDTH),
    "context_length": KeySpec(1, MAX_CONTEXT),
    "vocab_size": KeySpec(0, MAX_VOCAB),
    "attention.head_count": KeySpec(0, MAX_HEADS, per_layer=True),
    "attention.head_count_kv": KeySpec(0, MAX_HEADS, per_layer=True),
    "attention.key_length": KeySpec(0, MAX_HEADS),
    "attention.value_length": KeySpec(0, MAX_HEADS),
    "attention.sliding_window": KeySpec(0, MAX_CONTEXT),
    "attention.recurrent_layers": KeySpec(0, 1, flags=True),
    "full_attention_interval": KeySpec(1, MAX_LAYERS),
    "feed_forward_length": KeySpec(0, MAX_WIDTH, per_layer=True),
    "expert_feed_forward_length": KeySpec(0, MAX_WIDTH, per_layer=True),
    "expert_shared_feed_forward_length": KeySpec(0, MAX_WIDTH),
    "expert_count": KeySpec(0, MAX_EXPERTS),
    "expert_used_count": KeySpec(0, MAX_EXPERTS, per_layer=True),
    "ssm.conv_kernel": KeySpec(0, 1 << 10),
    "ssm.inner_size": KeySpec(0, MAX_WIDTH),
    "ssm.state_size": KeySpec(0, MAX_HEADS),
    "ssm.group_count": KeySpec(0, MAX_HEADS),
    "ssm.time_step_rank": KeySpec(0, MAX_HEADS),
}


def _whole(value: Any) -> bool:
    return type(value) is int  # a GGUF bool is a Python bool: not a count


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"an array of {len(value)} entries"
    if isinstance(value, ArraySummary):
        return f"an array of {value.count} entries"
    if isinstance(value, str):
        return f"the string {shown(value, 40)}"
    return shown(value, 40)


def _check_key(full: str, value: Any, spec: KeySpec, n_layers: int | None, source: str) -> None:
    def refuse(expected: str) -> TunerError:
        return TunerError(f"{source}: GGUF key {full} is {_describe(value)}, expected {expected}")

    def wrong_length() -> TunerError:
        return TunerError(f"{source}: GGUF key {full} has {len(value)} entries for {n_layers} layers")

    if isinstance(value, ArraySummary):  # an array too long to decode: longer than any per-layer array
        raise wrong_length() if (spec.per_layer or spec.flags) and n_layers is not None else refuse(
            f"a whole number {spec.lo}..{spec.hi}")
    if spec.flags:
        if not isinstance(value, list) or not all(type(v) is bool or v in (0, 1) for v in value):
            raise refuse(f"an array of one boolean per layer ({n_layers or '?'} layers)")
        if n_layers is not None and len(value) != n_layers:
            raise wrong_length()
        return
    if spec.per_layer and isinstance(value, list):
        if n_layers is not None and len(value) != n_layers:
            raise wrong_length()
        bad = next((v for v in value if not _whole(v) or not spec.lo <= v <= spec.hi), None)
        if bad is not None or not value:
            raise refuse(f"whole numbers {spec.lo}..{spec.hi} (found {shown(bad, 40)})")
        return
    if not _whole(value) or not spec.lo <= value <= spec.hi:
        raise refuse(f"a whole number {spec.lo}..{spec.hi}" + (", or one per layer" if spec.per_layer else ""))


def check_metadata(metadata: Mapping[str, Any], source: str) -> None:
    """Refuse, with one line naming ``source`` and the key, any key tuner reads whose type or range is wrong
    (a missing key is the reader's to report: some have defaults)."""
    arch = metadata.get("general.architecture")
    if arch is None:
        return
    if not isinstance(arch, str) or len(arch) > MAX_ARCH_CHARS or has_control(arch):
        raise TunerError(f"{source}: GGUF key general.architecture is {_describe(arch)}, expected a short name")
    arch = arch.strip()
    name = metadata.get("general.name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_CHARS):
        raise TunerError(f"{source}: GGUF key general.name is {_describe(name)}, expected a string of at most "
                         f"{MAX_NAME_CHARS} characters")
    n_layers: int | None = None
    for key, spec in ARCH_KEYS.items():  # block_count first: the per-layer keys are measured against it
        full = f"{arch}.{key}"
        if full in metadata:
            _check_key(full, metadata[full], spec, n_layers, source)
            if key == "block_count":
                n_layers = metadata[full]
    nextn = metadata.get(f"{arch}.nextn_predict_layers", 0)
    if n_layers is not None and nextn >= n_layers:
        raise TunerError(f"{source}: GGUF key {arch}.nextn_predict_layers is {nextn}, expected fewer than the "
                         f"{n_layers} blocks ({arch}.block_count)")
    n_expert = metadata.get(f"{arch}.expert_count", 0)
    used = metadata.get(f"{arch}.expert_used_count", 0)
    if (max(used) if isinstance(used, list) else used) > n_expert:
        raise TunerError(f"{source}: GGUF key {arch}.expert_used_count is {_describe(used)}, expected at most the "
                         f"{n_expert} experts ({arch}.expert_count)")
