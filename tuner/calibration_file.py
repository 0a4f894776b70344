"""Calibration files: the small JSON ``tuner calibrate --export FILE`` writes, which a bug report can carry and
``profiles/calibrations/`` can ship (installed as ``tuner.catalogs/calibrations``, read by :func:`shipped_points`
when a machine has no calibration of its own for a device model).

The format is documented in docs/calibration.md; in short::

    {"format": "tuner-calibration", "version": 1, "created_at": "2026-…Z", "tuner_version": "0.…",
     "hardware": {"gpus": ["NVIDIA GeForce RTX 4090"], "driver": "550.54.14", "cpu": null},
     "build": {"commit": "0c1e570…", "cuda": true},
     "shapes": {"qwen35moe-40L-2048e-1a2b3c4d": {"arch": …, "n_layer": …, …}},
     "summary": {"devices": {…}, "speed": {…}},   # what the points give, for people; ignored when read
     "points": [{"kind": "memory", …}, {"kind": "speed", …}]}

No paths and no host names: points carry device models, a build commit, model shapes, llama-server flags (which
name no files) and byte counts. Reading validates the document (format, version, every point's fields) and skips
points of a kind it does not know; a file of another version, or with a bad field, is refused with one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tuner import records as rec
from tuner.corrections import POINT, SHIPPED, Calibration, MemoryPoint, SpeedPoint, point_from_dict
from tuner.errors import TunerError
from tuner.hardware import Hardware
from tuner.paths import catalog_dir
from tuner.untrusted import shown

FORMAT = "tuner-calibration"
VERSION = 1
SHIPPED_DIR = "calibrations"
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_POINTS = 5000


def export_document(points: Sequence[MemoryPoint | SpeedPoint], *, hardware: Hardware, build: Any,
                    shapes: Mapping[str, Mapping[str, Any]], created_at: str, tuner_version: str) -> dict[str, Any]:
    """The shareable document of ``points`` measured on ``hardware`` with ``build`` (see the module doc)."""
    shape_ids = {p.shape for p in points}
    summary = Calibration(tuple(p for p in points if isinstance(p, MemoryPoint)),
                          tuple(p for p in points if isinstance(p, SpeedPoint))).summary(
        hardware, shape_ids.pop() if len(shape_ids) == 1 else None)
    return {
        "format": FORMAT,
        "version": VERSION,
        "created_at": created_at,
        "tuner_version": tuner_version,
        "hardware": {"gpus": [g.name for g in hardware.gpus],
                     "driver": hardware.gpus[0].driver_version if hardware.gpus else None,
                     "cpu": None if hardware.gpus else hardware.cpu_model},
        "build": {"commit": str(getattr(build, "commit", "") or ""), "cuda": bool(getattr(build, "cuda", False))},
        "shapes": {k: dict(v) for k, v in shapes.items()},
        "summary": {"devices": summary["devices"], "speed": summary["speed"], "buffer_bytes": summary["buffer_bytes"]},
        "points": [p.to_dict() for p in points],
    }


def read_document(data: Any, *, origin: str, source: str = "calibration file") -> list[MemoryPoint | SpeedPoint]:
    """The points of a calibration document, each marked with ``origin``; TunerError (one line naming ``source`` and
    the first bad field) when it is not one. Every point is checked against :data:`tuner.corrections.POINT`; a
    point of a kind this tuner does not know (a newer one's) is skipped."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TunerError(f"{source} is not a tuner calibration file (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise TunerError(f"{source} is a calibration file of version {shown(data.get('version'), 40)}; this tuner "
                         f"reads version {VERSION}")
    try:
        checked = rec.validate(rec.seq_of(POINT, MAX_POINTS), data.get("points"), "points")
    except rec.RecordError as exc:
        raise TunerError(f"{source} is not a valid calibration file ({exc})") from None
    points = (point_from_dict(d, origin) for d in checked)
    return [p for p in points if p is not None]


def read_file(path: str | Path, *, origin: str) -> list[MemoryPoint | SpeedPoint]:
    """:func:`read_document` of a file (at most :data:`MAX_FILE_BYTES`); TunerError naming the file."""
    p = Path(path)
    source = f"the calibration file {p}"
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise TunerError(f"{source} is over {MAX_FILE_BYTES // (1024 * 1024)} MiB: not a calibration file")
        data = rec.read_json_file(p, MAX_FILE_BYTES)  # bounded in size and depth, numbers finite (tuner.records)
    except OSError as exc:
        raise TunerError(f"cannot read {source}: {exc.strerror or exc}") from None
    except rec.RecordError as exc:
        raise TunerError(f"{source} is {exc.problem}") from None
    return read_document(data, origin=origin, source=source)


def shipped_files() -> list[Path]:
    """The calibration files in the catalogs' ``calibrations/`` folder."""
    folder = catalog_dir() / SHIPPED_DIR
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def shipped_points(files: Iterable[Path] | None = None,
                   on_skip: Callable[[str], None] | None = None) -> list[MemoryPoint | SpeedPoint]:
    """Every point of the shipped calibration files, each with origin ``shipped <file name>``. A file that does not
    read is skipped (a broken catalog file must not stop planning), and ``on_skip`` gets one line naming it and why."""
    out: list[MemoryPoint | SpeedPoint] = []
    for f in shipped_files() if files is None else files:
        try:
            out += read_file(f, origin=f"{SHIPPED} {f.name}")
        except TunerError as exc:
            if on_skip is not None:
                on_skip(f"skipped {exc.one_line()}; delete or replace the file")
    return out
