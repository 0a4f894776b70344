"""Model references: turning what a user types into quant candidates and a :class:`~tuner.layout.ModelLayout`.

A reference is one of (checked in this order):

* nothing: the built-in Qwen3.5-35B-A3B card's ladder;
* a local ``.gguf`` file, or the first shard of a split model;
* a local folder of quants (``dir[:QUANT]``);
* a Hugging Face repo ``owner/name[@revision][:QUANT]`` (it has a slash): headers read over HTTP, :mod:`tuner.remote`;
* a built-in card ``qwen3.5-35b-a3b[:QUANT]`` (no slash): no file at all, :mod:`tuner.cards`.

Files and folders are read by :mod:`tuner.local`; each quant found is a :class:`~tuner.candidate.QuantCandidate`.

A ladder (card, folder, repo) without ``:QUANT`` is a list of candidates for the planner; :func:`resolve_layout`
wants one model and asks for a quant unless there is only one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tuner.candidate import ProgressFn, QuantCandidate
from tuner.cards import DEFAULT_CARD, card_candidates, find_card, list_cards, load_card
from tuner.errors import TunerError
from tuner.gguf_file import read_gguf
from tuner.layout import ModelLayout
from tuner.local import dir_candidates, dir_quant_labels, file_candidate, local_layout
from tuner.remote import hub_candidates, hub_quant_labels, parse_hub_ref, read_hub_file_header
from tuner.vision import Projector, projector_from_header

__all__ = ["ModelRef", "ProgressFn", "QuantCandidate", "local_layout", "parse_model_ref", "read_projector",
           "resolve_candidate", "resolve_candidates", "resolve_layout"]


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
        hub = parse_hub_ref(text)  # TunerError when it is no repo reference either
        return ModelRef("hub", f"{hub.repo}@{hub.revision}" if hub.revision else hub.repo, hub.quant)
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
        card = load_card(parsed.target)
        ladder = card_candidates(card)
        if parsed.quant is None:
            return ladder
        want = card.quant(parsed.quant)
        return [c for c in ladder if c.quant == want]
    if parsed.kind == "file":
        return [file_candidate(parsed.target)]
    if parsed.kind == "dir":
        return dir_candidates(parsed.target, parsed.quant)
    target = f"{parsed.target}:{parsed.quant}" if parsed.quant else parsed.target
    return hub_candidates(target, on_progress=on_progress)


def resolve_layout(ref: str, on_progress: ProgressFn | None = None) -> ModelLayout:
    """A layout for any model reference the CLI accepts; a ladder needs ``:QUANT`` unless it has one quant."""
    parsed = parse_model_ref(ref)
    if parsed.kind == "file":
        return local_layout(parsed.target)
    _require_one_quant(ref, parsed)
    return resolve_candidates(ref, on_progress)[0].layout


def resolve_candidate(ref: str, on_progress: ProgressFn | None = None) -> QuantCandidate:
    """The one quant a reference names (as :func:`resolve_layout` takes it), with what lies beside it: its vision
    projector and MTP sidecar, its repo and commit."""
    parsed = parse_model_ref(ref)
    if parsed.kind == "file":
        return file_candidate(parsed.target)
    _require_one_quant(ref, parsed)
    return resolve_candidates(ref, on_progress)[0]


def _require_one_quant(ref: str, parsed: ModelRef) -> None:
    """A reference without ``:QUANT`` names one quant only when its ladder has one."""
    if parsed.quant is None:
        labels = _ladder_labels(parsed)
        if len(labels) != 1:
            raise TunerError(f"{ref} comes in {len(labels)} quants; name one as {parsed.target}:QUANT "
                             f"({', '.join(labels)})")


def _ladder_labels(parsed: ModelRef) -> list[str]:
    if parsed.kind == "card":
        return list(load_card(parsed.target).quants)
    if parsed.kind == "hub":
        return hub_quant_labels(parsed.target)
    return dir_quant_labels(parsed.target)


def read_projector(candidate: QuantCandidate) -> Projector | None:
    """The vision projector beside a quant, read from its header: a local file, or a Hub file by range requests
    (cached like the models' headers). None when there is none, for a card (no file to read: its size stands in),
    or when the header cannot be read (offline and never read: the file's size stands in, a few kB over the
    tensors)."""
    if not candidate.mmproj or candidate.source == "card":
        return None
    try:
        if candidate.source == "local":
            return projector_from_header(read_gguf(candidate.mmproj))
        if not candidate.repo or not candidate.revision:
            return None
        header = read_hub_file_header(candidate.repo, candidate.revision, candidate.mmproj, candidate.mmproj_bytes)
        return replace(projector_from_header(header), path=candidate.mmproj)
    except TunerError:
        return None
