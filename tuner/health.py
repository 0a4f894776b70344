"""Health of a model file beyond memory: a stale chat template, an MTP head it lacks (and where one is), its vision
projector. One list of findings, ``health: [{kind, severity, message, fix}]`` in the JSON of ``recommend``,
``estimate`` and ``serve``, printed as warnings (``severity`` ``warning``) or notes (``info``).

**Chat template** (kind ``chat_template``; the fetching is :mod:`tuner.chat_template`). The file's
``tokenizer.chat_template`` is compared with the current one of the model's original repo: the card's
``official_repo``, else the repo the GGUF's ``general.base_model.0.repo_url`` names (no check without either, nor
for a card's quant that has no file yet: an ``info`` says it is checked once downloaded). The file's date is the
Hub's date of the last commit that touched it (its shards: the latest), for a Hub file or a file inside a Hugging
Face cache snapshot (:func:`tuner.remote.hf_snapshot`); the fix date is the card's ``chat_template_fixed`` (the
repo's own, else the card's).

1. the same template (as llama.cpp reads it, :func:`tuner.chat_template.effective_template`): no finding;
2. different, and the file dated before the fix date, or its date unknown, or no fix date known: **stale**, a
   warning whose ``fix`` is ``--chat-template-file <the fetched official template>``; ``serve`` passes it;
3. different, and the file dated on or after the fix date: the uploader's own template, an ``info``, kept;
4. the official template unavailable (offline and never fetched, no such repo): a warning naming what could not be
   checked; it says stale when the file's date alone shows it (dated before the fix). Never an error.

**MTP** (kind ``mtp``): when the file has no MTP head and no sidecar of it was found, but the card knows a repo
whose GGUFs keep the head, or one with sidecars, an ``info`` says where it is reported to be (the card's word,
unchecked until that repo is read; its fix, ``tuner recommend REPO``, needs the Hub, which it says under
``HF_HUB_OFFLINE``): only where drafting could be planned (the
caller's ``mtp_blocked``, :func:`tuner.mtp.drafting_blocked`, is None: the whole trunk on the GPU, one slot).

**Vision** (kind ``vision``): a projector beside the model that the plan leaves out (``--no-mmproj``) is an ``info``
naming it and ``--vision``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from tuner.candidate import QuantCandidate
from tuner.errors import TunerError
from tuner.layout import ModelLayout

WARNING = "warning"
INFO = "info"


@dataclass(frozen=True)
class Finding:
    kind: str  # chat_template | mtp | vision
    severity: str  # warning | info
    message: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "severity": self.severity, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class Health:
    """The findings, and the official chat template to serve with when the file's is stale."""

    findings: tuple[Finding, ...] = ()
    chat_template_file: Path | None = None

    def to_list(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self.findings]

    def __add__(self, other: Health) -> Health:
        return Health(self.findings + other.findings, self.chat_template_file or other.chat_template_file)


# ------------------------------------------------------------------------------------------------ chat template


def file_origin(candidate: QuantCandidate, model_paths: Sequence[str | Path] = ()
                ) -> tuple[str, str, tuple[str, ...]] | None:
    """``(repo, commit, paths in repo)`` the model's file(s) came from: a Hub candidate's own, or the Hugging Face
    cache snapshot ``model_paths`` (or a local candidate's files) sit in; None when unknown."""
    from tuner.remote import hf_snapshot
    from tuner.untrusted import is_commit

    if not model_paths and candidate.source == "hub" and candidate.repo and candidate.revision \
            and is_commit(candidate.revision):
        return candidate.repo, candidate.revision, tuple(candidate.files)
    paths = list(model_paths) or (list(candidate.files) if candidate.source == "local" else [])
    snaps = [hf_snapshot(p) for p in paths]
    if not snaps or any(s is None for s in snaps):
        return None
    repos = {(s[0], s[1]) for s in snaps if s is not None}
    if len(repos) != 1:
        return None
    repo, commit = repos.pop()
    return repo, commit, tuple(s[2] for s in snaps if s is not None)


def file_date(origin: tuple[str, str, tuple[str, ...]] | None) -> tuple[datetime | None, str | None]:
    """The uploader's date of the file (the latest of its shards' last commits) and, when there is none, why."""
    from tuner.remote import hub_file_dates

    if origin is None:
        return None, "not a Hub file"
    repo, commit, paths = origin
    try:
        dates = hub_file_dates(repo, commit, paths)
    except TunerError as exc:
        return None, str(exc)
    if not dates or any(d is None for d in dates.values()):
        return None, f"the Hub gave no date for {repo}/{paths[0]}"
    return max(d for d in dates.values() if d is not None), None


def _official_repo(layout: ModelLayout, card_key: str | None) -> tuple[str | None, Any]:
    from tuner.cards import load_card, match_card

    card = load_card(card_key) if card_key else match_card(layout)
    repo = (card.official_repo if card is not None else None) or layout.base_model_repo
    return repo, card


def check_chat_template(candidate: QuantCandidate, layout: ModelLayout | None = None,
                        model_paths: Sequence[str | Path] = ()) -> Health:
    """The chat template rules of the module docstring for ``candidate`` (``layout``: the file's own, when the
    candidate's has no header, e.g. a card's quant once downloaded to ``model_paths``)."""
    from tuner.chat_template import official_template, same_template

    layout = layout or candidate.layout
    repo, card = _official_repo(layout, candidate.card_key)
    if repo is None:
        return Health()
    if candidate.source == "card" and layout is candidate.layout:  # no file yet: checked once downloaded (serve)
        return Health((Finding("chat_template", INFO,
                               f"the chat template is not checked yet: {candidate.quant} is the model card's, with no "
                               f"file to read; tuner serve checks the downloaded file's against {repo}'s"),))
    fixed: date | None = card.template_fixed_on(candidate.repo) if card is not None else None
    origin = file_origin(candidate, model_paths)
    dated, no_date = file_date(origin)
    when = f"the file is dated {dated.date().isoformat()}" if dated else f"the file's date is unknown ({no_date})"
    fix_text = f"the fix of {fixed.isoformat()}" if fixed else "no fix date known"
    before = dated is not None and fixed is not None and dated.date() < fixed
    try:
        official = official_template(repo)
    except TunerError as exc:
        if before:
            return Health((Finding("chat_template", WARNING,
                                   f"the GGUF's chat template is stale by its date ({when}, before {fix_text}); "
                                   f"the official one could not be fetched to replace it: {exc}",
                                   f"re-download the file, or pass {repo}'s chat template with "
                                   "--chat-template-file"),))
        return Health((Finding("chat_template", WARNING,
                               f"could not check the GGUF's chat template against {repo}'s: {exc}", None),))
    if same_template(layout.chat_template, official.text):
        return Health()
    what = (f"carries no chat template ({official.describe()} has one)" if layout.chat_template is None
            else f"has a chat template that differs from {official.describe()}")
    if dated is not None and fixed is not None and not before:
        return Health((Finding("chat_template", INFO,
                               f"the GGUF {what}, but {when}, on or after {fix_text}: the uploader's own template, "
                               "kept", f"--chat-template-file {official.path}"),))
    return Health((Finding("chat_template", WARNING,
                           f"the GGUF {what}: stale ({when}; {fix_text}); the official template is used instead",
                           f"--chat-template-file {official.path}"),), official.path)


# ------------------------------------------------------------------------------------------------------- MTP


def mtp_findings(candidate: QuantCandidate, blocked: str | None = None) -> Health:
    """Where an MTP head is, when the chosen file has none and drafting could be planned (``blocked``: why it could
    not, then nothing is said; see the module docstring)."""
    from tuner.cards import load_card, match_card

    if candidate.has_mtp or blocked:
        return Health()
    card = load_card(candidate.card_key) if candidate.card_key else match_card(candidate.layout)
    if card is None:
        return Health()
    own = (candidate.repo or "").lower()
    sources = [s for s in card.mtp_sources() if s.split(" ")[0].lower() != own]
    if not sources:
        return Health()
    from tuner.remote import hub_offline

    fix = f"tuner recommend {sources[0].split(' ')[0]}"
    return Health((Finding("mtp", INFO,
                           f"{candidate.quant} has no MTP head (speculative decoding with --spec-type draft-mtp); "
                           f"{card.name}'s is reported (by tuner's model card, not checked) to be in "
                           + "; ".join(sources),
                           fix + (" (reads that repo from the Hub: unset HF_HUB_OFFLINE)" if hub_offline() else "")),))


# ---------------------------------------------------------------------------------------------------- vision


def vision_findings(candidate: QuantCandidate, vision: bool) -> Health:
    if vision or not candidate.mmproj:
        return Health()
    name = Path(candidate.mmproj).name
    return Health((Finding("vision", INFO,
                           f"a vision projector ({name}) is available; the plan leaves it out (--no-mmproj)",
                           "--vision"),))


# ---------------------------------------------------------------------------------------------------- all of it


def check(candidate: QuantCandidate, *, vision: bool = False, layout: ModelLayout | None = None,
          model_paths: Sequence[str | Path] = (), chat_template: bool = True, mtp_blocked: str | None = None
          ) -> Health:
    """Every finding for ``candidate`` as planned (``vision``: whether the plan loads the projector;
    ``mtp_blocked``: why the plan could not draft with an MTP head, :func:`tuner.mtp.drafting_blocked`)."""
    out = Health()
    if chat_template:
        out = out + check_chat_template(candidate, layout, model_paths)
    return out + mtp_findings(candidate, mtp_blocked) + vision_findings(candidate, vision)
