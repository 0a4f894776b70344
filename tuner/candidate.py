"""One quant the planner may choose (:class:`QuantCandidate`), whatever found it: a built-in card, a local file or
folder, or a Hugging Face repo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tuner.layout import ModelLayout, TensorClass
from tuner.vision import Projector, projector_from_file_size

ProgressFn = Callable[[str, "int | None", "int | None"], None]
"""``on_progress(stage, done, total)`` of the Hub listing and header reads."""


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
    mtp_sidecar: str | None = None  # the MTP head as its own file (mtp-*.gguf: local path or repo file name)
    mtp_draft: ModelLayout | None = field(default=None, repr=False)  # that sidecar's layout (its header)
    projector: Projector | None = None  # the vision projector read from its header (None: sized by file size)
    notes: tuple[str, ...] = ()  # what a plan of it must say (a card quant sized from another file, say)

    @property
    def has_mtp(self) -> bool:
        """Whether MTP drafting is possible: the head is in the model or a sidecar of it was found."""
        return self.layout.has_mtp or self.mtp_draft is not None

    def vision_projector(self) -> Projector | None:
        """The projector the estimate sizes: read from its header, else known by its file size; None without one."""
        if self.projector is not None:
            return self.projector
        return projector_from_file_size(self.mmproj, self.mmproj_bytes) if self.mmproj else None

    @property
    def n_params(self) -> int:
        """Weights of the trunk (the MTP block excluded, as in ``layout.weights_bytes``)."""
        return sum(t.n_elements for t in self.layout.tensors if t.cls is not TensorClass.MTP)

    @property
    def bits_per_weight(self) -> float:
        n = self.n_params
        return 8.0 * self.layout.weights_bytes / n if n else 0.0
