"""Checking records tuner reads back (its profile, observations, caches) or gets from a program it runs
(llama-server's JSON answers) against one schema per record type, before any field becomes a number.

A schema is built from small checks (:func:`integer`, :func:`number`, :func:`string`, :func:`seq_of`,
:func:`record` …); each returns the value it accepts (a list as a tuple, a record as a dict with its defaults
filled in) or raises :class:`RecordError` naming where in the record the bad value sits (``entries[3].depth``),
what it holds (``repr``, cut short) and what was expected. The reader turns that into what fits the record: a
refusal naming the file and how to reset it (the profile), a skipped file (an observation), a cache miss (a cache).

Hand-written rather than pydantic: pydantic costs ~0.15 s of start-up on every command (the reason typer is pinned
below 0.26 in pyproject.toml), and the checks here are a few dozen lines.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.untrusted import has_control, shown

Check = Callable[[Any, str], Any]

MAX_TEXT_CHARS = 4096
MAX_JSON_DEPTH = 32
MAX_JSON_ITEMS = 100_000


class RecordError(ValueError):
    """A value of a record that does not pass its schema: ``where`` (``entries[3].depth``) and what is wrong."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where or 'the top level'}: {problem}")
        self.where = where
        self.problem = problem


def _at(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _refuse(value: Any, where: str, expected: str) -> RecordError:
    return RecordError(where, f"{_describe(value)}, expected {expected}")


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}"
    return shown(value, 40)


# --- scalars --------------------------------------------------------------------------------------------------------

def _bound(n: float) -> str:
    """``1152921504606846976`` as ``2^60``: the large bounds are powers of two."""
    if isinstance(n, int) and abs(n) >= 1 << 20 and (abs(n) & (abs(n) - 1)) == 0:
        return f"{'-' if n < 0 else ''}2^{abs(n).bit_length() - 1}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def integer(lo: int, hi: int) -> Check:
    """A whole number in ``lo..hi`` (a bool or a float is not one)."""

    def check(value: Any, where: str) -> int:
        if type(value) is not int or not lo <= value <= hi:
            raise _refuse(value, where, f"a whole number {_bound(lo)}..{_bound(hi)}")
        return value

    return check


def number(lo: float, hi: float) -> Check:
    """A finite number in ``lo..hi`` (whole numbers accepted), as a float."""

    def check(value: Any, where: str) -> float:
        if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
            raise _refuse(value, where, f"a number {_bound(lo)}..{_bound(hi)}")
        return float(value)

    return check


def string(max_chars: int = MAX_TEXT_CHARS, *, control: bool = False) -> Check:
    """A string of at most ``max_chars`` characters; without control characters unless ``control``."""

    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or len(value) > max_chars or (not control and has_control(value)):
            raise _refuse(value, where, f"a string of at most {max_chars} characters"
                          + ("" if control else " without control characters"))
        return value

    return check


def boolean() -> Check:
    def check(value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise _refuse(value, where, "true or false")
        return value

    return check


def optional(inner: Check) -> Check:
    """``None`` or what ``inner`` accepts."""

    def check(value: Any, where: str) -> Any:
        return None if value is None else inner(value, where)

    return check


def one_of(*choices: str) -> Check:
    def check(value: Any, where: str) -> str:
        if value not in choices:
            raise _refuse(value, where, "one of " + ", ".join(choices))
        return str(value)

    return check


# --- containers -----------------------------------------------------------------------------------------------------

def seq_of(item: Check, max_items: int) -> Check:
    """A list of at most ``max_items`` values ``item`` accepts, as a tuple."""

    def check(value: Any, where: str) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple) or len(value) > max_items:
            raise _refuse(value, where, f"a list of at most {max_items}")
        return tuple(item(v, _at(where, i)) for i, v in enumerate(value))

    return check


def tuple_of(*items: Check) -> Check:
    """A list of exactly ``len(items)`` values, each as its own check accepts it, as a tuple (a table row)."""

    def check(value: Any, where: str) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise _refuse(value, where, f"a list of {len(items)}")
        return tuple(item(v, _at(where, i)) for i, (item, v) in enumerate(zip(items, value, strict=True)))

    return check


def map_of(value_check: Check, max_items: int, *, key_chars: int = 256) -> Check:
    """An object of at most ``max_items`` string keys, each value as ``value_check`` accepts it."""
    key_check = string(key_chars)

    def check(value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, Mapping) or len(value) > max_items:
            raise _refuse(value, where, f"an object of at most {max_items} entries")
        return {key_check(k, where): value_check(v, _at(where, str(k))) for k, v in value.items()}

    return check


def json_value(max_depth: int = MAX_JSON_DEPTH, max_items: int = MAX_JSON_ITEMS) -> Check:
    """Any JSON data (null, bool, finite number, string, list, object with string keys), at most ``max_depth`` deep
    and ``max_items`` values in all: for parts of a record tuner keeps without reading them field by field."""

    def check(value: Any, where: str) -> Any:
        count = 0
        stack: list[tuple[Any, str, int]] = [(value, where, 0)]
        while stack:
            v, at, depth = stack.pop()
            count += 1
            if count > max_items or depth > max_depth:
                raise RecordError(at, f"more than {max_items} values or {max_depth} levels deep")
            if isinstance(v, Mapping):
                for k, x in v.items():
                    if not isinstance(k, str):
                        raise _refuse(k, at, "string keys")
                    stack.append((x, _at(at, k), depth + 1))
            elif isinstance(v, list | tuple):
                stack.extend((x, _at(at, i), depth + 1) for i, x in enumerate(v))
            elif isinstance(v, float) and not math.isfinite(v):
                raise _refuse(v, at, "a finite number")
            elif v is not None and not isinstance(v, str | int | float | bool):
                raise _refuse(v, at, "JSON data")
        return value

    return check


_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """One field of a :func:`record`: its check, and the default when the field is missing (none: required)."""

    check: Check
    default: Any = _REQUIRED


def field(check: Check, default: Any = _REQUIRED) -> Field:
    return Field(check, default)


def record(**fields: Check | Field) -> Check:
    """An object with these fields (a bare check: required; :func:`field` with a default: optional), as a dict of
    exactly these fields; other keys are ignored (a newer tuner may have added them)."""
    spec = {name: f if isinstance(f, Field) else Field(f) for name, f in fields.items()}

    def check(value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise _refuse(value, where, "an object")
        out: dict[str, Any] = {}
        for name, f in spec.items():
            if name in value:
                out[name] = f.check(value[name], _at(where, name))
            elif f.default is _REQUIRED:
                raise RecordError(_at(where, name), "missing")
            else:  # the default goes through the check too: a record's default {} gets its own defaults
                out[name] = f.check(f.default, _at(where, name))
        return out

    return check


def validate(schema: Check, value: Any, where: str = "") -> Any:
    """``schema(value)``: the checked value, or :class:`RecordError`."""
    return schema(value, where)


# --- reading a JSON file --------------------------------------------------------------------------------------------

MAX_JSON_FILE_BYTES = 64 << 20


def read_json_file(path: Path, max_bytes: int = MAX_JSON_FILE_BYTES) -> Any:
    """A JSON file of at most ``max_bytes``; :class:`RecordError` when it is larger, not UTF-8, not JSON or nested
    past what the parser takes. OSError as ``open`` raises it."""
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    return parse_json(data, max_bytes)


def parse_json(data: bytes | str, max_bytes: int = MAX_JSON_FILE_BYTES) -> Any:
    """JSON text or bytes of at most ``max_bytes``, parsed; :class:`RecordError` otherwise. Non-finite numbers are
    refused too: ``NaN`` and ``Infinity``, which Python's parser accepts and JSON does not, and a number too large
    for a double (``1e400``), which it reads as infinity. This is the one place tuner parses a JSON record, so no
    reader downstream meets an infinity (``int(inf)`` raises OverflowError)."""
    if len(data) > max_bytes:
        raise RecordError("", f"larger than the limit of {max_bytes} bytes")

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"the number {text[:40]} is out of range")
        return value

    try:
        return json.loads(data, parse_constant=no_constant, parse_float=finite)
    except UnicodeDecodeError:
        raise RecordError("", "not UTF-8 text") from None
    except RecursionError:
        raise RecordError("", "nested too deep") from None
    except ValueError as error:
        raise RecordError("", f"not JSON ({' '.join(str(error).split())[:80]})") from None


def plain(value: Any) -> Any:
    """``value`` with every tuple a list, recursively: what YAML's safe dumper and JSON write back."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def maybe(check: Check) -> Field:
    """An optional field that may also be ``null``: None when missing."""
    return Field(optional(check), None)
