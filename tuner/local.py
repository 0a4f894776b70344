"""Models on this machine: one GGUF file (or the first shard of a split model), or a folder of quants."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from tuner.candidate import QuantCandidate
from tuner.cards import match_card
from tuner.errors import TunerError
from tuner.gguf_file import read_gguf
from tuner.layout import ModelLayout, layout_from_header
from tuner.quant_files import (
    FileGroup,
    GroupedFiles,
    candidates_from_headers,
    group_gguf_files,
    quant_label,
    sidecar_layout,
)


def local_layout(path: str | Path) -> ModelLayout:
    """Read a local GGUF (or split model) header into a layout."""
    return layout_from_header(read_gguf(path))


def file_candidate(path: str) -> QuantCandidate:
    """One local GGUF (or the first shard of a split model) as the only candidate, with the vision projector and the
    MTP sidecar beside it (chosen as in a folder or a repo) and the card its shapes match."""
    header = read_gguf(path)
    layout = layout_from_header(header)
    folder = Path(header.paths[0]).parent
    grouped = group_gguf_files((str(p), p.stat().st_size) for p in folder.glob("*.gguf") if p.is_file())
    mmproj = grouped.pick_mmproj()
    card = match_card(layout)
    label = quant_label(header.paths[0])
    sidecar = _sidecar(grouped, FileGroup(label, (header.paths[0],), (header.file_bytes,)), Path("/"), layout)
    return QuantCandidate(
        quant=label, layout=layout, files=header.paths, file_bytes=header.file_bytes,
        source="local", mmproj=mmproj[0] if mmproj else None, mmproj_bytes=mmproj[1] if mmproj else 0,
        quality_rank=1, card_key=card.key if card else None, mtp_sidecar=sidecar[0] if sidecar else None,
        mtp_draft=sidecar[1] if sidecar else None)


def _sidecar(grouped: GroupedFiles, group: FileGroup, root: Path, layout: ModelLayout
             ) -> tuple[str, ModelLayout] | None:
    """The MTP sidecar picked for ``group`` (paths relative to ``root``) and its layout, when it is this model's
    head; None when there is none, or it cannot be read or belongs to another model."""
    pick = grouped.pick_mtp(group)
    if pick is None:
        return None
    path = str(root / pick[0])
    try:
        draft = sidecar_layout(read_gguf(path), layout)
    except TunerError:
        return None
    return (path, draft) if draft is not None else None


def _dir_files(path: str | os.PathLike[str]) -> tuple[Path, GroupedFiles]:
    """A local folder's GGUF files (sub-folders included), grouped into quants; TunerError when it holds none."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise TunerError(f"{root} is not a folder")
    entries = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in sorted(root.rglob("*.gguf"))
               if p.is_file()]
    grouped = group_gguf_files(entries)
    if not grouped.complete:
        raise TunerError(f"{root} holds no GGUF model files" + (" (only mmproj files)" if grouped.mmproj else ""))
    return root, grouped


def dir_quant_labels(path: str | os.PathLike[str]) -> list[str]:
    """The quant labels of a local folder, from its file names alone (no header is read)."""
    return [g.label for g in _dir_files(path)[1].complete]


def dir_candidates(path: str | os.PathLike[str], quant: str | None = None) -> list[QuantCandidate]:
    """Every quant in a local folder (sub-folders included: ``BF16/…-00001-of-00002.gguf``), best first."""
    root, grouped = _dir_files(path)
    groups = [grouped.find(quant, str(root))] if quant else list(grouped.complete)
    headers = [read_gguf(root / g.files[0]) for g in groups]
    local_groups = [FileGroup(g.label, tuple(str(root / f) for f in g.files), g.sizes) for g in groups]
    mm = grouped.pick_mmproj()
    candidates = candidates_from_headers(headers, local_groups, source="local", repo=None, revision=None,
                                         mmproj=(str(root / mm[0]), mm[1]) if mm else None)
    by_file = {g.files[0]: g for g in groups}
    out = []
    for c in candidates:
        group = by_file[Path(c.files[0]).relative_to(root).as_posix()]
        sidecar = _sidecar(grouped, group, root, c.layout)
        out.append(replace(c, mtp_sidecar=sidecar[0], mtp_draft=sidecar[1]) if sidecar else c)
    return out
