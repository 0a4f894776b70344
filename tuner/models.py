"""Model references: turning what a user types into quant candidates and a :class:`~tuner.layout.ModelLayout`.

A reference is one of (checked in this order):

* nothing: the built-in Qwen3.5-35B-A3B card's ladder;
* a local ``.gguf`` file, or the first shard of a split model;
* a local folder of quants (``dir[:QUANT]``);
* a Hugging Face repo ``owner/name[@revision][:QUANT]`` (it has a slash): headers read over HTTP, :mod:`tuner.remote`;
* a built-in card ``qwen3.5-35b-a3b[:QUANT]`` (no slash): no file at all, :mod:`tuner.cards`.

A ladder (card, folder, repo) without ``:QUANT`` is a list of candidates for the planner; :func:`resolve_layout`
wants one model and asks for a quant unless there is only one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tuner.errors import TunerError
from tuner.gguf_file import read_gguf
from tuner.layout import ModelLayout, TensorClass, layout_from_header

ProgressFn = Callable[[str, "int | None", "int | None"], None]


def local_layout(path: str | Path) -> ModelLayout:
    """Read a local GGUF (or split model) header into a layout."""
    return layout_from_header(read_gguf(path))


@dataclass(frozen=True)
class ModelRef:
    """A reference, classified: ``kind`` is "card", "file", "dir" or "hub"; ``target`` the card key, path or repo
    reference (with its @revision); ``quant`` the ``:QUANT`` suffix, if any."""

    kind: str
    target: str
    quant: str | None = None


def parse_model_ref(ref: str | None) -> ModelRef:
    """Classify a reference (see the module doc); TunerError when it names nothing."""
    if ref is None:
        from tuner.cards import DEFAULT_CARD

        return ModelRef("card", DEFAULT_CARD)
    text = ref.strip()
    if not text:
        raise TunerError("no model given")
    path = Path(text).expanduser()
    if path.is_file():
        return ModelRef("file", str(path))
    if path.is_dir():
        return ModelRef("dir", str(path))
    base, sep, quant = text.rpartition(":")
    if sep and base and quant:
        base_path = Path(base).expanduser()
        if base_path.is_dir():
            return ModelRef("dir", str(base_path), quant)
        if base_path.is_file():
            raise TunerError(f"{base} is one GGUF file; drop ':{quant}'")
    if text.lower().endswith(".gguf") or text.startswith(("/", "./", "../", "~")):
        return ModelRef("file", str(path))  # missing: read_gguf says so
    if "/" in text:
        from tuner.remote import parse_hub_ref

        hub = parse_hub_ref(text)  # TunerError when it is no repo reference either
        return ModelRef("hub", f"{hub.repo}@{hub.revision}" if hub.revision else hub.repo, hub.quant)
    from tuner.cards import find_card, list_cards

    key, quant = (base, quant) if sep else (text, "")
    card = find_card(key)
    if card is None:
        raise TunerError(f"cannot find model {text!r}: not a file, a known card "
                         f"({', '.join(c.key for c in list_cards())}) or a Hugging Face repo (owner/name)")
    return ModelRef("card", card.key, quant or None)


def resolve_candidates(ref: str | None, on_progress: ProgressFn | None = None) -> list[QuantCandidate]:
    """Every quant a reference offers, best quality first (one for a file or a ``:QUANT`` reference).

    ``None`` is the Qwen3.5-35B-A3B card's ladder (offline). ``on_progress(stage, done, total)`` reports the Hub
    listing and header reads."""
    parsed = parse_model_ref(ref)
    if parsed.kind == "card":
        from tuner.cards import card_candidates, load_card

        card = load_card(parsed.target)
        ladder = card_candidates(card)
        if parsed.quant is None:
            return ladder
        want = card.quant(parsed.quant)
        return [c for c in ladder if c.quant == want]
    if parsed.kind == "file":
        return [_file_candidate(parsed.target)]
    if parsed.kind == "dir":
        from tuner.remote import dir_candidates

        return dir_candidates(parsed.target, parsed.quant)
    from tuner.remote import hub_candidates

    target = f"{parsed.target}:{parsed.quant}" if parsed.quant else parsed.target
    return hub_candidates(target, on_progress=on_progress)


def resolve_layout(ref: str, on_progress: ProgressFn | None = None) -> ModelLayout:
    """A layout for any model reference the CLI accepts; a ladder needs ``:QUANT`` unless it has one quant."""
    parsed = parse_model_ref(ref)
    if parsed.kind == "file":
        return local_layout(parsed.target)
    if parsed.quant is None:
        labels = _ladder_labels(parsed)
        if len(labels) != 1:
            raise TunerError(f"{ref} comes in {len(labels)} quants; name one as {parsed.target}:QUANT "
                             f"({', '.join(labels)})")
    candidates = resolve_candidates(ref, on_progress)
    return candidates[0].layout


def _ladder_labels(parsed: ModelRef) -> list[str]:
    if parsed.kind == "card":
        from tuner.cards import load_card

        return list(load_card(parsed.target).quants)
    if parsed.kind == "hub":
        from tuner.remote import hub_quant_labels

        return hub_quant_labels(parsed.target)
    from tuner.remote import dir_quant_labels

    return dir_quant_labels(parsed.target)


def _file_candidate(path: str) -> QuantCandidate:
    from tuner.cards import match_card
    from tuner.remote import group_gguf_files, quant_label

    header = read_gguf(path)
    layout = layout_from_header(header)
    folder = Path(header.paths[0]).parent
    # the vision projector beside it, chosen as in a folder or a repo (F16 first)
    mmproj = group_gguf_files((str(p), p.stat().st_size) for p in folder.glob("*.gguf") if p.is_file()).pick_mmproj()
    card = match_card(layout)
    return QuantCandidate(
        quant=quant_label(header.paths[0]), layout=layout, files=header.paths, file_bytes=header.file_bytes,
        source="local", mmproj=mmproj[0] if mmproj else None, mmproj_bytes=mmproj[1] if mmproj else 0,
        quality_rank=1, card_key=card.key if card else None)


@dataclass(frozen=True)
class QuantCandidate:
    """One quant of a model that the planner may choose: its full tensor layout and where its files are."""

    quant: str  # "Q4_K_M", "UD-Q4_K_XL", "BF16" … (the file's quant label)
    layout: ModelLayout
    files: tuple[str, ...]  # local paths, or file names inside ``repo`` (all shards)
    file_bytes: int
    source: str  # "local" | "card" | "hub"
    repo: str | None = None
    revision: str | None = None  # hub: the commit sha the files were read at
    mmproj: str | None = None  # vision projector file (local path or repo file name)
    mmproj_bytes: int = 0
    quality_rank: int = 0  # higher = better: bits per weight, reordered by the card's quality_order if one matches
    card_key: str | None = None  # the built-in card this model matches, if any

    @property
    def n_params(self) -> int:
        """Weights of the trunk (the MTP block excluded, as in ``layout.weights_bytes``)."""
        return sum(t.n_elements for t in self.layout.tensors if t.cls is not TensorClass.MTP)

    @property
    def bits_per_weight(self) -> float:
        n = self.n_params
        return 8.0 * self.layout.weights_bytes / n if n else 0.0
