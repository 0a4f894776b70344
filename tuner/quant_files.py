"""GGUF files grouped into quants by their names, and the quant candidates their headers make.

A Hub repo's listing and a local folder are read alike: split shards (``-00001-of-00003.gguf``) go together, the quant
label comes from the file name, ``mmproj`` vision projectors and imatrix files are set apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from tuner.candidate import QuantCandidate
from tuner.cards import match_card, rank_by_quality
from tuner.errors import TunerError
from tuner.gguf_file import SPLIT_RE, GgufHeader, split_name
from tuner.layout import layout_from_header

# Quant label in a file name: Q4_K_M, UD-Q4_K_XL, IQ4_XS, Q8_0, BF16, MXFP4_MOE, TQ1_0 ... (last match wins).
_QUANT_RE = re.compile(
    r"(?:^|[-_.])((?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32|FP16|FP32|MXFP4(?:_MOE)?|TQ\d_\d))(?=$|[-_.])",
    re.IGNORECASE)
_MMPROJ_PREFERENCE = ("f16", "bf16", "q8_0", "f32")


def quant_label(path: str) -> str:
    """The quant label of a GGUF file name: ``Qwen3.5-35B-A3B-UD-Q4_K_XL.gguf`` -> ``UD-Q4_K_XL``,
    ``BF16/x-BF16-00001-of-00002.gguf`` -> ``BF16``; the file's stem when it names none."""
    name = PurePosixPath(path).name
    m = SPLIT_RE.match(name)
    stem = m.group("prefix") if m else re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    found = list(_QUANT_RE.finditer(stem))
    return found[-1].group(1).upper() if found else stem


def is_mmproj(path: str) -> bool:
    return "mmproj" in PurePosixPath(path).name.lower()


@dataclass(frozen=True)
class FileGroup:
    """One quant: its file(s) (all shards, in order) and their sizes."""

    label: str
    files: tuple[str, ...]
    sizes: tuple[int, ...]
    missing: int = 0  # shards the split names but the listing lacks

    @property
    def file_bytes(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class GroupedFiles:
    quants: tuple[FileGroup, ...]  # complete and incomplete
    mmproj: tuple[tuple[str, int], ...]  # (path, size)

    @property
    def complete(self) -> tuple[FileGroup, ...]:
        return tuple(g for g in self.quants if not g.missing)

    def pick_mmproj(self) -> tuple[str, int] | None:
        """The vision projector to offer: F16 if present, else BF16, Q8_0, F32, else the first."""
        if not self.mmproj:
            return None
        for kind in _MMPROJ_PREFERENCE:
            for path, size in self.mmproj:
                if quant_label(path).lower() == kind:
                    return path, size
        return sorted(self.mmproj)[0]

    def find(self, quant: str, where: str) -> FileGroup:
        want = quant.strip().lower()
        for g in self.quants:
            if g.label.lower() == want:
                if g.missing:
                    raise TunerError(f"{where}: {g.label} is split into {len(g.files) + g.missing} files but "
                                     f"{g.missing} are missing")
                return g
        raise TunerError(f"{where} has no {quant} GGUF (it has: {', '.join(g.label for g in self.complete) or 'none'})")


def group_gguf_files(entries: Iterable[tuple[str, int]]) -> GroupedFiles:
    """Group ``(path, size)`` entries into quants: split shards together, mmproj and imatrix files apart."""
    singles: list[tuple[str, int]] = []
    splits: dict[tuple[str, int], dict[int, tuple[str, int]]] = {}
    mmproj: list[tuple[str, int]] = []
    for path, size in entries:
        name = PurePosixPath(path).name.lower()
        if not name.endswith(".gguf") or "imatrix" in name:
            continue
        if is_mmproj(path):
            mmproj.append((path, size))
            continue
        split = split_name(path)  # TunerError for impossible numbers (-00001-of-00000)
        if split:
            splits.setdefault((split[0], split[2]), {})[split[1]] = (path, size)
        else:
            singles.append((path, size))
    groups: list[tuple[str, str, FileGroup]] = []  # (folder, base label, group)
    for path, size in singles:
        groups.append((str(PurePosixPath(path).parent), quant_label(path), FileGroup(quant_label(path), (path,),
                                                                                      (size,))))
    for (_prefix, count), shards in splits.items():
        present = [shards[i] for i in range(1, count + 1) if i in shards]
        first = present[0][0]
        label = quant_label(first)
        groups.append((str(PurePosixPath(first).parent), label,
                       FileGroup(label, tuple(p for p, _ in present), tuple(s for _, s in present),
                                 missing=count - len(present))))
    seen: dict[str, int] = {}
    for _, label, _ in groups:
        seen[label.lower()] = seen.get(label.lower(), 0) + 1
    out = []
    for folder, label, g in sorted(groups, key=lambda x: x[2].files[0]):
        if seen[label.lower()] > 1 and folder not in ("", "."):
            g = FileGroup(f"{folder}/{label}", g.files, g.sizes, g.missing)
        out.append(g)
    return GroupedFiles(tuple(out), tuple(sorted(mmproj)))


def candidates_from_headers(headers: Sequence[GgufHeader], groups: Sequence[FileGroup], *, source: str,
                            repo: str | None, revision: str | None,
                            mmproj: tuple[str, int] | None) -> list[QuantCandidate]:
    """One candidate per group from its joined header, marked with the card the model matches (if any) and ranked
    best quality first."""
    out = []
    for header, g in zip(headers, groups, strict=True):
        out.append(QuantCandidate(
            quant=g.label, layout=layout_from_header(header), files=g.files, file_bytes=g.file_bytes, source=source,
            repo=repo, revision=revision, mmproj=mmproj[0] if mmproj else None,
            mmproj_bytes=mmproj[1] if mmproj else 0))
    card = match_card(out[0].layout) if out else None
    if card is not None:
        out = [replace(c, card_key=card.key) for c in out]
    return rank_by_quality(out, card)
