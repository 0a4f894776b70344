"""Byte units: parsing sizes a user types and printing sizes a user reads. Bytes stay ``int`` until printed."""

from __future__ import annotations

import re

from tuner.errors import TunerError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size_bytes(text: str, *, default_unit: str = "") -> int:
    """Parse ``24G``, ``768MiB``, ``0.5 GiB`` or ``1024`` (bytes, or ``default_unit``) into bytes.

    Sizes are binary (``G`` = GiB), as llama.cpp prints them.
    """
    match = _SIZE_RE.match(str(text))
    if not match:
        raise TunerError(f"cannot read {text!r} as a size (examples: 24G, 768M, 0.5GiB)")
    number, unit, _ = match.groups()
    unit = (unit or default_unit).lower()
    value = float(number) * _SCALE[unit]
    if value < 0:
        raise TunerError(f"size {text!r} is negative")
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
