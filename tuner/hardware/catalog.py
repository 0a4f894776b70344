"""The GPU catalog: the cards ``profiles/gpus.yaml`` describes, found by the names people and NVML give them.

``--gpu rtx-4090`` / ``--gpu "RTX 3090 x2"`` / ``--gpu rtx-3090,rtx-3060`` plan for catalog cards
(:func:`parse_gpu_list`), and a detected card
whose NVML reports no memory bus width takes its bandwidth from here (:func:`catalog_entry_for_name`). The catalog
is read through :func:`tuner.paths.catalog_dir` and checked field by field (:func:`load_gpu_catalog`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from tuner.errors import TunerError
from tuner.hardware.gpu import GB, Gpu
from tuner.paths import CATALOG_ENV, catalog_dir, load_yaml
from tuner.units import GiB

GENERIC_GPU_BANDWIDTH_BYTES_S = 300 * GB
"""Assumed for a GPU whose bandwidth is neither reported nor in the catalog: below every card in the catalog
except the RTX 4060 Ti (288 GB/s), so GPU speed estimates err slow."""

_CATALOG_FILE = "gpus.yaml"
_MAX_GPU_COUNT = 16


@dataclass(frozen=True)
class CatalogGpu:
    key: str
    name: str
    vram_bytes: int
    mem_bandwidth_bytes_s: int
    pcie_gen: int | None
    pcie_width: int | None
    compute_capability: tuple[int, int] | None
    source_note: str
    aliases: tuple[str, ...] = ()
    nvml_names: tuple[str, ...] = ()
    fp16_tflops: float | None = None  # dense FP16 tensor throughput (prompt-processing roofline)

    def to_gpu(self, index: int = 0) -> Gpu:
        """The card as a planner sees it: nothing else on it, so all its memory is free."""
        return Gpu(
            index=index,
            name=self.name,
            vram_total_bytes=self.vram_bytes,
            vram_free_bytes=self.vram_bytes,
            vram_used_bytes=0,
            mem_bandwidth_bytes_s=self.mem_bandwidth_bytes_s,
            pcie_gen=self.pcie_gen,
            pcie_width=self.pcie_width,
            compute_capability=self.compute_capability,
            source="catalog",
        )


def load_gpu_catalog(path: Path | None = None) -> dict[str, CatalogGpu]:
    """``profiles/gpus.yaml`` (or ``path``), checked: every entry has every field, with sane types."""
    path = path or catalog_dir() / _CATALOG_FILE
    try:
        data = load_yaml(path)
    except OSError as error:
        raise TunerError(
            f"cannot read the GPU catalog {path}: {error.strerror or error}",
            hint=f"{CATALOG_ENV} must name the folder holding gpus.yaml",
        ) from error
    except yaml.YAMLError as error:
        raise TunerError(f"the GPU catalog {path} is not valid YAML: {error}") from error
    entries = data.get("gpus") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise TunerError(f"the GPU catalog {path} has no 'gpus:' mapping")
    return {str(key).lower(): _catalog_entry(str(key).lower(), raw, path) for key, raw in entries.items()}


def _catalog_entry(key: str, raw: object, path: Path) -> CatalogGpu:
    def bad(field: str, want: str) -> TunerError:
        return TunerError(f"the GPU catalog {path}: {key}.{field} must be {want}")

    if not isinstance(raw, dict):
        raise bad("(entry)", "a mapping")

    def number(field: str) -> float:
        value = raw.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise bad(field, "a positive number")
        return value

    def optional_int(field: str) -> int | None:
        value = raw.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad(field, "a positive integer or null")
        return value

    def text(field: str) -> str:
        value = raw.get(field)
        if not isinstance(value, str) or not value.strip():
            raise bad(field, "a non-empty string")
        return value.strip()

    def texts(field: str) -> tuple[str, ...]:
        value = raw.get(field, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(field, "a list of strings")
        return tuple(value)

    vram_bytes = raw.get("vram_bytes")
    if isinstance(vram_bytes, bool) or not isinstance(vram_bytes, int) or vram_bytes < GiB:
        raise bad("vram_bytes", "an integer number of bytes, at least 1 GiB")
    capability = raw.get("compute_capability")
    if capability is not None and not (
        isinstance(capability, list) and len(capability) == 2 and all(isinstance(v, int) for v in capability)
    ):
        raise bad("compute_capability", "[major, minor] or null")
    return CatalogGpu(
        key=key,
        name=text("name"),
        vram_bytes=vram_bytes,
        mem_bandwidth_bytes_s=round(number("mem_bandwidth_gb_s") * GB),
        pcie_gen=optional_int("pcie_gen"),
        pcie_width=optional_int("pcie_width"),
        compute_capability=(capability[0], capability[1]) if capability else None,
        source_note=text("source"),
        aliases=texts("aliases"),
        nvml_names=texts("nvml_names"),
        fp16_tflops=float(number("fp16_tflops")) if raw.get("fp16_tflops") is not None else None,
    )


_IGNORED_TOKENS = frozenset({"nvidia", "geforce"})


def _tokens(text: str) -> tuple[str, ...]:
    """``"NVIDIA GeForce RTX 4060Ti"`` and ``"rtx-4060-ti"`` both → ``("rtx", "4060", "ti")``."""
    return tuple(t for t in re.findall(r"[a-z]+|\d+", text.lower()) if t not in _IGNORED_TOKENS)


def _split_memory(tokens: tuple[str, ...]) -> tuple[tuple[str, ...], int | None]:
    """``("a", "100", "80", "gb")`` → ``(("a", "100"), 80)``."""
    if len(tokens) > 2 and tokens[-1] == "gb" and tokens[-2].isdigit():
        return tokens[:-2], int(tokens[-2])
    return tokens, None


def _spellings(entry: CatalogGpu) -> set[tuple[str, ...]]:
    return {_tokens(s) for s in (entry.key, entry.name, *entry.aliases, *entry.nvml_names)}


def _memory_matches(stated_gb: int, vram_bytes: int) -> bool:
    """A size someone typed (``24gb``) fits a card if within 10% of it in GB or GiB: NVML totals sit between."""
    return any(abs(stated_gb * unit - vram_bytes) <= 0.1 * stated_gb * unit for unit in (GB, GiB))


def _matching_keys(text: str, catalog: Mapping[str, CatalogGpu]) -> list[str]:
    wanted = _tokens(text)
    if not wanted:
        return []
    exact = [key for key, entry in catalog.items() if wanted in _spellings(entry)]
    if exact:
        return exact
    # "rtx" left out ("4090", "5070 ti"), the memory size left out ("h100") or given where the key has none
    # ("rtx 4090 24gb"); a size that does not fit the card ("rtx 3060 8gb") matches nothing.
    family, stated_gb = _split_memory(wanted)
    families = {family, ("rtx", *family)}
    return [
        key
        for key, entry in catalog.items()
        if _split_memory(_tokens(key))[0] in families
        and (stated_gb is None or _memory_matches(stated_gb, entry.vram_bytes))
    ]


def catalog_entry_for_name(name: str, catalog: Mapping[str, CatalogGpu]) -> CatalogGpu | None:
    """The catalog entry for a card NVML names ``name``, if any (exact spellings only, no guessing)."""
    wanted = _tokens(name)
    return next((entry for entry in catalog.values() if wanted in _spellings(entry)), None)


def find_catalog_gpu(text: str, catalog: Mapping[str, CatalogGpu] | None = None) -> CatalogGpu:
    """The catalog card ``text`` names: a key (``rtx-4090``), a name (``RTX 4090``), a model (``4090``),
    or a key without its memory size when that is unambiguous (``h100``). Anything else is a TunerError."""
    catalog = load_gpu_catalog() if catalog is None else catalog
    keys = _matching_keys(text, catalog)
    if len(keys) == 1:
        return catalog[keys[0]]
    if keys:
        raise TunerError(f"GPU {text!r} is ambiguous: it could be {', '.join(keys)}", hint="name one of them")
    raise TunerError(
        f"unknown GPU {text!r}",
        hint=(
            f"known GPUs: {', '.join(sorted(catalog))}; or 'none' for CPU only; "
            "or leave --gpu out to use the GPUs of this machine"
        ),
    )


_COUNT_RE = re.compile(r"^(?P<base>.+?)\s*[x×*]\s*(?P<count>\d{1,2})$", re.IGNORECASE)
_PREFIX_COUNT_RE = re.compile(r"^(?P<count>\d{1,2})\s*[x×*]\s*(?P<base>\D.*)$", re.IGNORECASE)


def parse_gpu_spec(text: str, catalog: Mapping[str, CatalogGpu] | None = None) -> tuple[CatalogGpu, int]:
    """``rtx-3090x2`` / ``2xrtx-3090`` / ``h100 x 4`` / ``4090`` → (catalog card, how many of it)."""
    catalog = load_gpu_catalog() if catalog is None else catalog
    text = text.strip()
    for regex in (_COUNT_RE, _PREFIX_COUNT_RE):
        match = regex.match(text)
        if match and not _matching_keys(text, catalog):
            count = int(match["count"])
            if not 1 <= count <= _MAX_GPU_COUNT:
                raise TunerError(f"GPU count in {text!r} must be between 1 and {_MAX_GPU_COUNT}")
            return find_catalog_gpu(match["base"], catalog), count
    return find_catalog_gpu(text, catalog), 1


def parse_gpu_list(text: str, catalog: Mapping[str, CatalogGpu] | None = None) -> list[CatalogGpu]:
    """``rtx-3090,rtx-3060`` / ``2xrtx-3090,rtx-3060`` / ``rtx-4090x2`` → the cards, one per device, in the order
    given (llama.cpp's device order: ``CUDA0`` first). At most 16 devices in all (llama_max_devices,
    src/llama.cpp:86-88)."""
    catalog = load_gpu_catalog() if catalog is None else catalog
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise TunerError(f"--gpu {text!r}: an empty entry in the list", hint="e.g. --gpu rtx-3090,rtx-3060")
    cards: list[CatalogGpu] = []
    for part in parts:
        entry, count = parse_gpu_spec(part, catalog)
        cards += [entry] * count
    if len(cards) > _MAX_GPU_COUNT:
        raise TunerError(f"--gpu {text!r} names {len(cards)} GPUs; llama.cpp takes at most {_MAX_GPU_COUNT}")
    return cards


def catalog_gpu(key: str, index: int = 0) -> Gpu:
    """The catalog card ``key`` (any spelling :func:`find_catalog_gpu` accepts) as a :class:`Gpu`."""
    return find_catalog_gpu(key).to_gpu(index)
