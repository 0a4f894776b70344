"""Bench flag sets: named llama-server configurations, from ``--set NAME=FLAGS``, a plan, or llama-server's defaults.

The flags themselves are read through :mod:`tuner.flags` (one table for every flag tuner knows); what a set may not
carry (the model, the address, turning the prompt cache off) is the table's ``bench_forbidden`` rows.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tuner.errors import TunerError
from tuner.flags import FLAGS, TRUTHY, Occurrence, ServerFlags, flag_value, flags_from_args, scan

DEFAULTS_NAME = "defaults"
PLAN_NAME = "plan"
#: what llama-server gets for the baseline: only the model (and host/port), with its default --fit on spelled out.
DEFAULTS_ARGS: tuple[str, ...] = tuple(FLAGS["fit"].to_args(FLAGS["fit"].default))
#: what a planned set adds: the plan already fits, so llama-server must not resize it.
FIT_OFF_ARGS: tuple[str, ...] = tuple(FLAGS["fit"].to_args("off"))


@dataclass(frozen=True)
class FlagSet:
    """One named llama-server configuration.

    ``args`` is exactly what llama-server gets after ``-m MODEL --host H --port P``. ``flags`` is what tuner could
    map onto :class:`ServerFlags` for the memory estimate (None: llama-server decides with ``--fit``), ``extra``
    the arguments it passed through unmapped (threads, load mode, …).
    """

    name: str
    args: tuple[str, ...]
    flags: ServerFlags | None
    extra: tuple[str, ...] = ()
    origin: str = "user"  # user | plan | defaults | tune

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": list(self.args), "origin": self.origin,
                "flags": asdict(self.flags) if self.flags else None, "extra": list(self.extra)}


def split_flag_string(text: str) -> list[str]:
    """A llama-server flag string as the shell would split it."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise TunerError(f"cannot split flags {text!r}: {exc}") from None


def set_flags(args: Sequence[str]) -> tuple[ServerFlags, list[str]]:
    """A set's arguments as :class:`ServerFlags` (for the estimate) and the tokens passed through unmapped. Flags
    tuner sets itself (``-m``, ``--port`` …) or that would change what is measured are refused."""
    for occ in scan(args):
        if isinstance(occ, Occurrence) and occ.row.bench_forbidden:
            raise TunerError(f"{occ.option} is set by tuner itself; leave it out of the flag set")
    try:
        return flags_from_args(args)
    except TunerError as exc:
        raise TunerError(f"flags {shlex.join(args)!r}: {exc}") from None


def uses_fit(args: Sequence[str], gpu: bool = True) -> bool:
    """True when llama-server's ``--fit`` (on by default, common/common.h:478) may change the set at launch: it
    shrinks the context only when ``-c`` is not given (common/arg.cpp:1639-1648), and moves weights only on a GPU
    and only when no placement option (``-ngl``, ``-ot``, ``--n-cpu-moe`` …: the table's ``placement`` rows) is
    given."""
    found = [occ for occ in scan(args) if isinstance(occ, Occurrence)]
    for occ in found:
        if occ.row.key == "fit" and (occ.raw or FLAGS["fit"].default).lower() not in TRUTHY:
            return False
    given = {occ.row.key for occ in found}
    if "ctx_size" not in given:
        return True
    return gpu and not any(FLAGS[key].placement for key in given)


def load_mode(args: Sequence[str]) -> str:
    """The ``--load-mode`` a set's arguments ask for (llama-server's default: auto)."""
    return str(flag_value(args, "load_mode"))


def parse_set(spec: str) -> FlagSet:
    """``NAME=FLAGS`` (from ``--set``) into a :class:`FlagSet`; ``NAME=`` alone means llama-server's defaults."""
    name, eq, text = spec.partition("=")
    name = name.strip()
    if not eq or not name:
        raise TunerError(f"--set expects NAME=FLAGS (e.g. 'q8kv=-ctk q8_0 -ctv q8_0'), got {spec!r}")
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise TunerError(f"set name {name!r}: use letters, digits and . _ + - only")
    args = split_flag_string(text)
    flags, extra = set_flags(args)
    return FlagSet(name=name, args=tuple(args), flags=flags, extra=tuple(extra), origin="user")


def defaults_set(name: str = DEFAULTS_NAME) -> FlagSet:
    """llama-server as it starts with only the model: ``--fit on`` sizes context and offload itself."""
    return FlagSet(name=name, args=DEFAULTS_ARGS, flags=None, extra=(), origin="defaults")


def flagset_from_flags(name: str, flags: ServerFlags, extra: Sequence[str] = (), origin: str = "plan") -> FlagSet:
    """A set from planned :class:`ServerFlags` and the arguments beyond them (a plan's: ``--fit off`` …)."""
    args = (*flags.to_args(), *extra)
    return FlagSet(name=name, args=args, flags=flags, extra=tuple(extra), origin=origin)


def check_unique_names(sets: Sequence[FlagSet]) -> None:
    seen: set[str] = set()
    for s in sets:
        if s.name in seen:
            raise TunerError(f"two flag sets are named {s.name!r}")
        seen.add(s.name)


def slug(text: str) -> str:
    """``text`` safe as a file name: a set's log, a model's results folder."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"
