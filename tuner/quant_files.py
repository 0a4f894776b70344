"""GGUF files grouped into quants by their names, and the quant candidates their headers make.

A Hub repo's listing and a local folder are read alike: split shards (``-00001-of-00003.gguf``) go together, the quant
label comes from the file name, ``mmproj`` vision projectors, ``mtp-`` MTP heads and imatrix files are set apart, as
are the other draft models (``eagle3-``, ``dflash-``, ``dspark-``): none of them is a model llama.cpp would pick
(common/download.cpp:637-653).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from tuner.candidate import QuantCandidate
from tuner.cards import match_card, rank_by_quality
from tuner.errors import TunerError
from tuner.estimate import check_sidecar
from tuner.gguf_file import SPLIT_RE, GgufHeader, split_name
from tuner.layout import ModelLayout, layout_from_header

# Quant label in a file name: Q4_K_M, UD-Q4_K_XL, IQ4_XS, Q8_0, BF16, MXFP4_MOE, TQ1_0 ... (last match wins).
_QUANT_RE = re.compile(
    r"(?:^|[-_.])((?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32|FP16|FP32|MXFP4(?:_MOE)?|TQ\d_\d))(?=$|[-_.])",
    re.IGNORECASE)
_MMPROJ_PREFERENCE = ("f16", "bf16", "q8_0", "f32")
#: file-name parts of draft models, never quants (common/download.cpp:637-653); ``mtp-`` marks an MTP sidecar
MTP_MARK = "mtp-"
_DRAFT_MARKS = (MTP_MARK, "eagle3-", "dflash-", "dspark-")
_BITS_RE = re.compile(r"\d+")


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


def is_mtp_sidecar(path: str) -> bool:
    """An MTP head written apart (``mtp-<Model>-<QUANT>.gguf``): its name contains ``mtp-``, case-sensitive, as
    llama.cpp's ``find_best_mtp`` matches it (common/download.cpp:613-617)."""
    return MTP_MARK in PurePosixPath(path).name


def is_draft_model(path: str) -> bool:
    name = PurePosixPath(path).name
    return any(mark in name for mark in _DRAFT_MARKS)


def quant_bits(label: str) -> int:
    """The bits a quant label names: Q4_0 -> 4, BF16 -> 16, UD-Q8_K_XL -> 8 (llama.cpp's ``extract_quant_bits``,
    common/download.cpp:512-521); 0 when it names none."""
    m = _BITS_RE.search(label)
    return int(m.group(0)) if m else 0


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
    mtp: tuple[tuple[str, int], ...] = ()  # MTP sidecars (path, size)

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

    def pick_mtp(self, group: FileGroup) -> tuple[str, int] | None:
        """The MTP sidecar for a quant, as llama.cpp's ``find_best_sibling`` ranks them (common/download.cpp:543-606):
        in the model's folder or one above it, the deepest first; then one named ``-<QUANT>.``; then the nearest
        quant bits. tuner passes it with ``-md``, so a sidecar in a sub-folder (``MTP/mtp-…``) is taken last."""
        if not self.mtp:
            return None
        model_dir = PurePosixPath(group.files[0]).parent.parts
        label = group.label.rsplit("/", 1)[-1].upper()

        def rank(entry: tuple[str, int]) -> tuple[int, int, int, int, str]:
            sib_dir = PurePosixPath(entry[0]).parent.parts
            above = model_dir[:len(sib_dir)] == sib_dir
            exact = f"-{label}." in PurePosixPath(entry[0]).name.upper()
            diff = abs(quant_bits(quant_label(entry[0])) - quant_bits(label))
            return (int(above), len(sib_dir) if above else -len(sib_dir), int(exact), -diff, entry[0])

        return max(self.mtp, key=rank)

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
    mtp: list[tuple[str, int]] = []
    for path, size in entries:
        name = PurePosixPath(path).name.lower()
        if not name.endswith(".gguf") or "imatrix" in name:
            continue
        if is_mmproj(path):
            mmproj.append((path, size))
            continue
        if is_draft_model(path):
            if is_mtp_sidecar(path) and not split_name(path):
                mtp.append((path, size))
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
    return GroupedFiles(tuple(out), tuple(sorted(mmproj)), tuple(sorted(mtp)))


def sidecar_layout(header: GgufHeader, model: ModelLayout) -> ModelLayout | None:
    """The layout of an MTP sidecar's header when it is ``model``'s head; None when it is not (or not readable)."""
    try:
        draft = layout_from_header(header)
        check_sidecar(model, draft)
    except TunerError:
        return None
    return draft


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
