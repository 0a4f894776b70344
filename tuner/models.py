"""Model references: turning what a user types into a :class:`~tuner.layout.ModelLayout`.

A reference is a local ``.gguf`` file or the first shard of a split model. (Cards such as
``qwen3.5-35b-a3b:Q4_K_M`` and Hugging Face repos ``owner/name[:QUANT]`` are resolved by :mod:`tuner.cards` and
:mod:`tuner.remote` through :func:`resolve_layout`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuner.errors import TunerError
from tuner.gguf_file import read_gguf
from tuner.layout import ModelLayout, layout_from_header


def local_layout(path: str | Path) -> ModelLayout:
    """Read a local GGUF (or split model) header into a layout."""
    return layout_from_header(read_gguf(path))


def resolve_layout(ref: str) -> ModelLayout:
    """A layout for any model reference the CLI accepts."""
    if not ref or not ref.strip():
        raise TunerError("no model given")
    p = Path(ref).expanduser()
    if p.exists() or ref.endswith(".gguf"):
        return local_layout(p)
    raise TunerError(f"cannot find model {ref!r}: not a file, a known card or a Hugging Face repo")


@dataclass(frozen=True)
class QuantCandidate:
    """One quant of a model that the planner may choose: its full tensor layout and where its files are."""

    quant: str  # "Q4_K_M", "UD-Q4_K_XL", "BF16" … (the file's quant label)
    layout: ModelLayout
    files: tuple[str, ...]  # local paths, or file names inside ``repo`` (all shards)
    file_bytes: int
    source: str  # "local" | "card" | "hub"
    repo: str | None = None
    revision: str | None = None
    mmproj: str | None = None  # vision projector file (local path or repo file name)
    mmproj_bytes: int = 0
    quality_rank: int = 0  # higher = better quality (from the card's ladder; file size order otherwise)
    card_key: str | None = None  # the built-in card this model matches, if any

    @property
    def n_params(self) -> int:
        return sum((t.shape and _prod(t.shape)) or 0 for t in self.layout.tensors)

    @property
    def bits_per_weight(self) -> float:
        n = self.n_params
        return 8.0 * self.layout.weights_bytes / n if n else 0.0


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
