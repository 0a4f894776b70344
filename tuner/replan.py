"""The plan again, from the downloaded file's own header, before ``serve`` or ``bench`` starts llama-server.

A card's plan is sized with the tensor mix the card records for the file it names (:func:`tuner.cards.quant_mix`):
a prediction. Once the file is on disk, its header is the truth. When its tensors are not the ones planned (another
mix, a re-upload, a quant whose mix is not recorded), the plan is made again for the file as it is, with the same
wishes, and the caller is told what changed; when nothing fits any more, :class:`~tuner.errors.TunerError` (one line)
stops the launch. A plan made from a header already (a local file, a Hub repo read over HTTP) is kept as it is when
the downloaded header agrees with it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tuner.errors import TunerError
from tuner.flags import FLAGS
from tuner.hardware import Hardware
from tuner.layout import ModelLayout
from tuner.local import local_layout
from tuner.planner import Measured, Plan, Wishes, recommend
from tuner.units import fmt_bytes

#: Plan fields compared to say what a re-plan changed, with how a person reads them.
_COMPARED: tuple[tuple[str, str], ...] = (
    ("ctx_per_slot", "context"), ("cache_type_k", "K cache"), ("cache_type_v", "V cache"),
    *((key, FLAGS[key].long) for key in ("n_cpu_moe", "n_gpu_layers", "ubatch_size", "cache_ram_mib",
                                          "ctx_checkpoints")),
)


@dataclass(frozen=True)
class Replanned:
    """The plan to launch (the one given when the header agreed with it) and, when it was made again, why and what
    changed (one line)."""

    plan: Plan
    header: ModelLayout  # the downloaded file's layout, read once here (serve's health check reads it too)
    why: str | None = None
    changes: tuple[str, ...] = ()

    @property
    def replanned(self) -> bool:
        return self.why is not None

    def message(self) -> str:
        """One line for the user: what differed and what that did to the plan."""
        if self.why is None:
            return ""
        did = "; ".join(self.changes) if self.changes else "the plan still fits as it was"
        return f"{self.why}; re-planned from its header: {did}"


def same_tensors(a: ModelLayout, b: ModelLayout) -> bool:
    """Whether two layouts hold the same tensors (names, types, shapes) of the same model."""
    return (a.arch, a.n_layer_all, a.n_ctx_train) == (b.arch, b.n_layer_all, b.n_ctx_train) and [
        (t.name, t.ggml_type.name, tuple(t.shape)) for t in a.tensors] == [
        (t.name, t.ggml_type.name, tuple(t.shape)) for t in b.tensors]


def replan_from_file(plan: Plan, model_path: str | Path, hardware: Hardware, wishes: Wishes, *,
                     measured: Measured | None = None) -> Replanned:
    """``plan`` checked against ``model_path``'s header (the first shard of the downloaded file): kept when the
    header holds the planned tensors, else made again for the file as it is (same wishes; the candidate keeps its
    name, repo and files). TunerError, one line, when nothing fits the file."""
    path = Path(model_path)
    header = local_layout(path)
    planned = plan.candidate.layout
    if same_tensors(header, planned):
        return Replanned(plan, header)
    why = (f"{path.name} is not the file the plan was sized for: its weights are "
           f"{fmt_bytes(header.weights_bytes)}, not {fmt_bytes(planned.weights_bytes)}"
           if header.weights_bytes != planned.weights_bytes else
           f"{path.name} is not the file the plan was sized for: its tensors differ")
    candidate = replace(plan.candidate, layout=header, file_bytes=header.file_bytes, notes=())
    try:
        new = recommend([candidate], hardware, replace(wishes, quant=None), measured=measured).plan
    except TunerError as exc:
        raise TunerError(f"{why}; re-planned from its header, it no longer fits: {exc.one_line()}") from None
    before, after = plan.to_dict(), new.to_dict()
    changes = tuple(f"{label} {before[key]} → {after[key]}" for key, label in _COMPARED if before[key] != after[key])
    return Replanned(new, header, why, changes)
