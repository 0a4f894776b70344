"""Byte units: parsing sizes a user types and printing sizes a user reads. Bytes stay ``int`` until printed."""

from __future__ import annotations

import re

from tuner.errors import TunerError
from tuner.untrusted import shown

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MAX_SIZE_BYTES = 1 << 60  # 1 EiB: a thousand times the memory of the largest machines
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size_bytes(text: str, *, default_unit: str = "") -> int:
    """Parse ``24G``, ``768MiB``, ``0.5 GiB`` or ``1024`` (bytes, or ``default_unit``) into bytes.

    Sizes are binary (``G`` = GiB), as llama.cpp prints them.
    """
    match = _SIZE_RE.match(str(text)) if len(str(text)) <= 1000 else None
    if not match:
        raise TunerError(f"cannot read {shown(text, 40)} as a size (examples: 24G, 768M, 0.5GiB)")
    number, unit, _ = match.groups()
    unit = (unit or default_unit).lower()
    value = float(number) * _SCALE[unit]
    if not value <= MAX_SIZE_BYTES:  # 400 digits make a float of inf
        raise TunerError(f"size {shown(text, 40)} is larger than the limit of 1 EiB")
    return int(value)


def mib(n_bytes: int) -> float:
    return n_bytes / MiB


def gib(n_bytes: int) -> float:
    return n_bytes / GiB


def fmt_bytes(n_bytes: int) -> str:
    """``20.50 GiB``, ``768.0 MiB``, ``512 B``: the unit that keeps three or four significant digits."""
    sign = "-" if n_bytes < 0 else ""
    n = abs(n_bytes)
    if n >= GiB:
        return f"{sign}{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{sign}{n / MiB:.1f} MiB"
    if n >= KiB:
        return f"{sign}{n / KiB:.1f} KiB"
    return f"{sign}{n} B"
