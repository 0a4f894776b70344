"""The profile: what ``tuner bench`` measured on this machine, kept per user, read back by ``tuner recommend``.

Where: ``tuner.paths.config_dir()/profiles.yaml`` (one YAML file; written through a temporary file and a rename,
under a lock file, so concurrent writers do not lose each other's entries).

One **entry** per key, and a key is everything that changes speed without changing the flags:

* the **GGUF file**: its total size and the sha256 of its first ``header_bytes`` bytes (the metadata and tensor
  table; for a split model the same count of bytes of every shard), plus the Hub repo and revision when the file
  sits in a Hugging Face cache snapshot (``…/models--owner--name/snapshots/<rev>/…``) or the candidate came from the
  Hub. Two identities match when their header hashes are equal, or, if one side has no hash (a Hub candidate that
  is not downloaded), when repo, revision, file name and size are equal;
* the **hardware**: the GPU models in order and the driver version (no GPU: the CPU model);
* the **llama.cpp build**: its commit, CUDA or not, and the sha256 of its CMake options.

An entry holds every measurement (set name, llama-server arguments, the :class:`ServerFlags` they map to, depth,
tok/s, the roofline bounds and efficiency = measured / bound from :mod:`tuner.speed`, the results file), the
**best** flags (the highest score — geometric mean of pp and tg — among the measurements at the deepest depth the
entry has), and the **memory observations** of ``tuner serve``.

Invalidation: when a new measurement arrives, entries for the same file name (from the same Hub repo, or from none)
on the same GPU models (or CPU) whose model hash, driver, or llama.cpp build differ are dropped (the file, the
driver or the build changed: old speeds no longer hold). Lookups only ever use an entry whose whole key matches.

**Calibration points** (format 2): the store's top-level ``calibration`` list holds the memory and speed points of
:mod:`tuner.corrections` (``kind: memory`` / ``kind: speed``, their fields in :meth:`MemoryPoint.to_dict` /
:meth:`SpeedPoint.to_dict`), written by ``tuner serve`` (one memory point per device of each launch, also kept in its
observation file) and ``tuner calibrate`` (memory and speed points of every rung), replaced by ``id``.
:func:`load_calibration` picks the ones that apply to a machine and build: this machine's of the same llama.cpp
commit, else (per device model) those of the shipped calibration files (:mod:`tuner.calibration_file`). A format-1
file reads as before, with no points. ``tuner profile reset`` removes the store and serve's observation files.

What is read from ``config_dir()/observations/*.json`` (written by ``tuner serve``, format 1, see
:mod:`tuner.serve`): ``model.path`` / ``model.file`` / ``model.bytes``, ``flags``, ``build.commit``, ``gpus[].name``,
``observed_at``, ``mismatches`` and, per kind of ``memory_check`` (weights, kv, recurrent, compute),
``predicted_bytes``, ``reported_bytes``, ``diff_bytes`` and ``diff_ratio``. An observation joins the entry with the
same model identity (hashed from ``model.path`` when the file is there, else by file name and size), GPU models
and build commit; others are skipped.

:func:`measured_hook` is the planner's ``measured`` hook: for a candidate and flag set it returns the measured
:class:`~tuner.speed.Prediction` (``source="measured"``, with the roofline bounds and efficiency recorded at
measurement time) when this exact flag set (the fields that change speed) was measured, single stream and without
extra arguments, on the same model file, hardware and build. A flag set of that model file that was not measured
gets the speed model's prediction rescaled (``source="rescaled"``) by ``measured / predicted`` of the file's
measurements: the median over those of the same placement (:func:`tuner.corrections.placement_class`), else over
all of them, each measurement's prediction recomputed with today's speed model at its depth. Else None, and the
planner keeps its roofline (rescaled by a calibration, if any). Measurements are not spread to other quants: a
factor measured on one quant would tilt the planner's comparison between quants.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock
import yaml

from tuner import records as rec
from tuner.corrections import (
    POINT,
    Calibration,
    MemoryPoint,
    SpeedPoint,
    hardware_label,
    placement_class,
    point_from_dict,
)
from tuner.errors import TunerError
from tuner.estimate import ServerFlags
from tuner.flags import Occurrence, scan
from tuner.hardware import Hardware, gpu_split
from tuner.paths import MAX_YAML_BYTES, YamlRefused, config_dir, load_yaml_text, read_text_bounded, write_atomic

STORE_FORMAT = 2
READABLE_FORMATS = (1, 2)
MAX_POINTS = 2000
STORE_FILE = "profiles.yaml"
OBSERVATIONS_DIR = "observations"
MAX_MEASUREMENTS = 400
MAX_HASH_BYTES = 64 * 1024 * 1024
MAX_OBSERVATION_BYTES = 1 << 20  # an observation file is a few kB
RESET_HINT = "`tuner profile reset --yes` starts a new one"
_HF_SNAPSHOT_RE = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[0-9a-f]{7,64})/")
# ServerFlags fields that do not change speed (host RAM limits only): ignored when matching a measurement.
_SPEED_NEUTRAL = {"cache_ram_mib", "ctx_checkpoints"}
_GPU_ONLY = {"n_gpu_layers", "n_cpu_moe", "cpu_moe", "no_kv_offload", "split_mode", "main_gpu", "device",
             "tensor_split", "override_tensor"}


def store_path() -> Path:
    return config_dir() / STORE_FILE


def observations_dir() -> Path:
    return config_dir() / OBSERVATIONS_DIR


# --------------------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class ModelIdentity:
    name: str  # file name of the (first shard of the) GGUF
    file_bytes: int
    header_sha256: str | None = None
    repo: str | None = None
    revision: str | None = None

    def matches(self, other: ModelIdentity) -> bool:
        if self.header_sha256 and other.header_sha256:
            return self.header_sha256 == other.header_sha256 and self.file_bytes == other.file_bytes
        return (bool(self.repo) and self.repo == other.repo and self.revision == other.revision
                and self.name == other.name and (not self.file_bytes or not other.file_bytes
                                                 or self.file_bytes == other.file_bytes))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "model") -> ModelIdentity:
        """From :meth:`to_dict`'s data, checked (:class:`tuner.records.RecordError` naming the bad field)."""
        return cls(**rec.validate(MODEL_IDENTITY, d, where))


def hub_origin(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(repo, revision) of a file inside a Hugging Face cache snapshot, else None."""
    m = _HF_SNAPSHOT_RE.search(Path(path).as_posix())
    return (f"{m['owner']}/{m['name']}", m["rev"]) if m else None


_identity_cache: dict[tuple[str, int, float], ModelIdentity] = {}


def model_identity(path: str | os.PathLike[str]) -> ModelIdentity:
    """The identity of a local GGUF (or split model): size and sha256 of the header bytes (see the module doc)."""
    from tuner.gguf_file import read_gguf

    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise TunerError(f"cannot read {p}: {exc.strerror}") from None
    memo = (str(p.resolve()), st.st_size, st.st_mtime)
    if memo in _identity_cache:
        return _identity_cache[memo]
    header = read_gguf(p)
    n = min(header.header_bytes, MAX_HASH_BYTES)
    h = hashlib.sha256()
    for shard in header.paths:
        with open(shard, "rb") as fh:
            h.update(fh.read(n))
    origin = hub_origin(p.resolve()) or hub_origin(p)
    ident = ModelIdentity(p.name, header.file_bytes, h.hexdigest(), origin[0] if origin else None,
                          origin[1] if origin else None)
    _identity_cache[memo] = ident
    return ident


def candidate_identity(candidate: Any) -> ModelIdentity | None:
    """The identity of a :class:`tuner.models.QuantCandidate`: hashed if its first file is local, else by Hub
    repo, revision, file name and size; None when neither is known."""
    files = list(getattr(candidate, "files", ()) or ())
    if files and Path(files[0]).is_file():
        try:
            return model_identity(files[0])
        except TunerError:
            return None
    repo = getattr(candidate, "repo", None)
    if repo and files:
        return ModelIdentity(Path(files[0]).name, int(getattr(candidate, "file_bytes", 0) or 0), None, repo,
                             getattr(candidate, "revision", None))
    return None


@dataclass(frozen=True)
class HardwareKey:
    gpus: tuple[str, ...]
    driver: str | None
    cpu: str | None  # only when there is no GPU

    @classmethod
    def of(cls, hardware: Hardware) -> HardwareKey:
        if hardware.gpus:
            return cls(tuple(g.name for g in hardware.gpus), hardware.gpus[0].driver_version, None)
        return cls((), None, hardware.cpu_model)

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": list(self.gpus), "driver": self.driver, "cpu": self.cpu}

    @classmethod
    def from_dict(cls, d: Any, where: str = "hardware") -> HardwareKey:
        return cls(**rec.validate(HARDWARE_KEY, d, where))

    def label(self) -> str:
        if self.gpus:
            return " + ".join(self.gpus) + (f" (driver {self.driver})" if self.driver else "")
        return f"CPU {self.cpu}"


@dataclass(frozen=True)
class BuildKey:
    commit: str
    cuda: bool
    options_sha256: str

    @classmethod
    def of(cls, build: Any) -> BuildKey:
        """From a :class:`tuner.build.LlamaBuild` (or the ``llama_cpp`` part of a results file)."""
        if isinstance(build, dict):
            commit, cuda, options = build.get("commit", ""), build.get("cuda", False), build.get("options", {})
        else:
            commit, cuda, options = build.commit, build.cuda, build.options
        blob = json.dumps(sorted((options or {}).items()), sort_keys=True)
        return cls(str(commit or "unknown"), bool(cuda), hashlib.sha256(blob.encode()).hexdigest()[:16])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "build") -> BuildKey:
        return cls(**rec.validate(BUILD_KEY, d, where))

    def same_commit(self, commit: str | None) -> bool:
        if not commit:
            return False
        a, b = self.commit.lower(), commit.lower()
        return a.startswith(b) or b.startswith(a)


@dataclass(frozen=True)
class ProfileKey:
    model: ModelIdentity
    hardware: HardwareKey
    build: BuildKey

    def matches(self, other: ProfileKey, *, check_build: bool = True) -> bool:
        return (self.model.matches(other.model) and self.hardware == other.hardware
                and (not check_build or self.build == other.build))

    def id(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "hardware": self.hardware.to_dict(), "build": self.build.to_dict()}

    @classmethod
    def from_dict(cls, d: Any, where: str = "key") -> ProfileKey:
        k = rec.validate(PROFILE_KEY, d, where)
        return cls(ModelIdentity(**k["model"]), HardwareKey(**k["hardware"]), BuildKey(**k["build"]))


# --------------------------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Measurement:
    set_name: str
    args: tuple[str, ...]
    server_flags: dict[str, Any] | None  # asdict(ServerFlags) or None (llama-server sized itself)
    extra_args: tuple[str, ...]
    depth: int
    pp_tok_s: float
    tg_tok_s: float
    n_samples: int
    kind: str  # bench | tune
    measured_at: str
    results_file: str = ""
    tg_bound_tok_s: float | None = None
    pp_bound_tok_s: float | None = None
    tg_efficiency: float | None = None  # measured / roofline bound
    pp_efficiency: float | None = None
    concurrency: int = 1

    @property
    def score(self) -> float:
        return (max(self.pp_tok_s, 0.0) * max(self.tg_tok_s, 0.0)) ** 0.5

    def flags(self) -> ServerFlags | None:
        if not self.server_flags:
            return None
        known = {f.name for f in fields(ServerFlags)}
        try:
            return ServerFlags(**{k: v for k, v in self.server_flags.items() if k in known})
        except (TunerError, TypeError):
            return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["args"], d["extra_args"] = list(self.args), list(self.extra_args)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "measurement") -> Measurement:
        return cls(**rec.validate(MEASUREMENT, d, where))


@dataclass(frozen=True)
class ProfileEntry:
    key: ProfileKey
    measurements: tuple[Measurement, ...] = ()
    memory_observations: tuple[dict[str, Any], ...] = ()
    updated_at: str = ""

    @property
    def best(self) -> Measurement | None:
        """The highest score among the measurements at the deepest depth this entry has."""
        usable = [m for m in self.measurements if m.concurrency == 1 and m.tg_tok_s > 0]
        if not usable:
            return None
        deepest = max(m.depth for m in usable)
        return max((m for m in usable if m.depth == deepest), key=lambda m: m.score)

    def efficiencies(self) -> tuple[list[float], list[float]]:
        tg = [m.tg_efficiency for m in self.measurements if m.tg_efficiency and m.concurrency == 1]
        pp = [m.pp_efficiency for m in self.measurements if m.pp_efficiency and m.concurrency == 1]
        return tg, pp

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {"id": self.key.id(), "key": self.key.to_dict(), "updated_at": self.updated_at,
                "best": best.to_dict() if best else None,
                "measurements": [m.to_dict() for m in self.measurements],
                "memory_observations": [dict(o) for o in self.memory_observations]}

    @classmethod
    def from_dict(cls, d: Any, where: str = "entry") -> ProfileEntry:
        return _entry(rec.validate(ENTRY, d, where))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------- the records, checked
# What profiles.yaml and an observation file may hold: one schema per record, checked where the file is read
# (tuner.records). Bounds are far above anything tuner writes.

_TEXT = rec.string(1024)
_WHEN = rec.string(64)
_ARGS = rec.seq_of(rec.string(4096), 1024)
_TOK_S = rec.number(0.0, 1e9)
_BYTES = rec.integer(-(1 << 62), 1 << 62)  # differences are negative
_maybe, _or = rec.maybe, rec.field

MODEL_IDENTITY = rec.record(name=_or(_TEXT, ""), file_bytes=_or(rec.integer(0, 1 << 60), 0),
                            header_sha256=_maybe(rec.string(128)), repo=_maybe(rec.string(256)),
                            revision=_maybe(rec.string(256)))
HARDWARE_KEY = rec.record(gpus=_or(rec.seq_of(_TEXT, 64), ()), driver=_maybe(rec.string(128)), cpu=_maybe(_TEXT))
BUILD_KEY = rec.record(commit=_or(rec.string(128), ""), cuda=_or(rec.boolean(), False),
                       options_sha256=_or(rec.string(128), ""))
PROFILE_KEY = rec.record(model=_or(MODEL_IDENTITY, {}), hardware=_or(HARDWARE_KEY, {}), build=_or(BUILD_KEY, {}))
MEASUREMENT = rec.record(
    set_name=_TEXT, args=_ARGS, server_flags=rec.optional(rec.json_value(4, 1000)), extra_args=_ARGS,
    depth=rec.integer(0, 1 << 40), pp_tok_s=_TOK_S, tg_tok_s=_TOK_S, n_samples=rec.integer(0, 1 << 31),
    kind=rec.string(64), measured_at=_WHEN, results_file=_or(rec.string(4096), ""),
    tg_bound_tok_s=_maybe(_TOK_S), pp_bound_tok_s=_maybe(_TOK_S), tg_efficiency=_maybe(rec.number(0.0, 1e6)),
    pp_efficiency=_maybe(rec.number(0.0, 1e6)), concurrency=_or(rec.integer(1, 1 << 16), 1))
MEMORY_KINDS = ("weights", "kv", "recurrent", "compute")
_MISMATCHES = rec.seq_of(rec.one_of(*MEMORY_KINDS), len(MEMORY_KINDS))
KIND_FIGURES = rec.record(predicted_bytes=_maybe(_BYTES), reported_bytes=_maybe(_BYTES), diff_bytes=_maybe(_BYTES),
                          diff_ratio=_maybe(rec.number(0.0, 1e12)))
OBSERVATION_SUMMARY = rec.record(file=rec.string(255), observed_at=_maybe(_WHEN), flags=_or(_ARGS, ()),
                                 mismatches=_or(_MISMATCHES, ()),
                                 kinds=_or(rec.map_of(KIND_FIGURES, len(MEMORY_KINDS)), {}))
ENTRY = rec.record(key=_or(PROFILE_KEY, {}), updated_at=_or(_WHEN, ""),
                   measurements=_or(rec.seq_of(MEASUREMENT, 4 * MAX_MEASUREMENTS), ()),
                   memory_observations=_or(rec.seq_of(OBSERVATION_SUMMARY, 10_000), ()))


STORE = rec.record(format=_or(rec.integer(0, 1 << 31), 1), entries=_or(rec.optional(rec.seq_of(ENTRY, 100_000)), ()),
                   calibration=_or(rec.optional(rec.seq_of(POINT, 4 * MAX_POINTS)), ()))
# tuner serve's observation file, format 1 (tuner.serve's module doc): the fields the store reads.
OBSERVATION = rec.record(
    format=rec.integer(1, 1), observed_at=_maybe(_WHEN),
    model=_or(rec.record(path=_maybe(rec.string(4096)), file=_maybe(_TEXT), bytes=_maybe(rec.integer(0, 1 << 60))),
              {}),
    flags=_maybe(_ARGS), mismatches=_maybe(_MISMATCHES),
    build=_maybe(rec.record(commit=_maybe(rec.string(128)))),
    gpus=_maybe(rec.seq_of(rec.record(name=_or(_TEXT, "")), 64)),
    memory_check=_maybe(rec.map_of(rec.json_value(4, 1000), 16)), points=_maybe(rec.seq_of(POINT, 1024)))


def _entry(e: dict[str, Any]) -> ProfileEntry:
    """A :class:`ProfileEntry` from data :data:`ENTRY` accepted."""
    k = e["key"]
    key = ProfileKey(ModelIdentity(**k["model"]), HardwareKey(**k["hardware"]), BuildKey(**k["build"]))
    return ProfileEntry(key, tuple(Measurement(**m) for m in e["measurements"]),
                        tuple(rec.plain(o) for o in e["memory_observations"]), e["updated_at"])


# --------------------------------------------------------------------------------------------- the store


class ProfileStore:
    """The YAML file of entries. Every change is read-modify-write under a lock, written atomically."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else store_path()

    # --- file ----------------------------------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        """The file, every field checked (:data:`STORE`): ``entries`` and ``calibration`` as checked dicts. A file
        that is not a profile tuner wrote is refused whole, with one line naming it, the first bad field and how to
        start a new one."""
        try:
            text = read_text_bounded(self.path, MAX_YAML_BYTES, what="the profile")
        except FileNotFoundError:
            return {"format": STORE_FORMAT, "entries": (), "calibration": ()}
        except OSError as exc:
            raise TunerError(f"cannot read the profile {self.path}: {exc.strerror or exc}") from None
        except TunerError as exc:  # too large, or not UTF-8
            raise TunerError(f"{exc}; {RESET_HINT}") from None
        try:
            data = load_yaml_text(text, str(self.path))
        except YamlRefused as exc:  # an alias
            raise TunerError(f"the profile {exc}; {RESET_HINT}") from None
        except yaml.YAMLError as exc:
            raise TunerError(f"the profile {self.path} is not valid YAML ({exc.__class__.__name__}); "
                             f"{RESET_HINT}") from None
        fmt = data.get("format") if isinstance(data, dict) else None
        if type(fmt) is int and fmt > STORE_FORMAT:
            raise TunerError(f"the profile {self.path} has format {fmt}, newer than this tuner reads "
                             f"({STORE_FORMAT}): upgrade tuner, or {RESET_HINT}")
        try:
            checked = rec.validate(STORE, data if data is not None else {})
        except rec.RecordError as exc:
            raise TunerError(f"the profile {self.path} is not valid ({exc}); {RESET_HINT}") from None
        if checked["format"] not in READABLE_FORMATS:
            raise TunerError(f"the profile {self.path} has an unknown format ({checked['format']}); {RESET_HINT}")
        return {**checked, "entries": checked["entries"] or (), "calibration": checked["calibration"] or ()}

    def load(self) -> list[ProfileEntry]:
        return [_entry(e) for e in self._read()["entries"]]

    def load_points(self) -> list[MemoryPoint | SpeedPoint]:
        """The calibration points (see the module doc)."""
        points = (point_from_dict(rec.plain(d)) for d in self._read()["calibration"])
        return [p for p in points if p is not None]

    def _write(self, entries: Sequence[ProfileEntry], points: Sequence[MemoryPoint | SpeedPoint] | None = None) -> None:
        """Write the entries and the points (None: keep the points the file has)."""
        if points is None:
            points = self.load_points()
        data = {"format": STORE_FORMAT, "updated_at": _now(), "entries": [e.to_dict() for e in entries],
                "calibration": [p.to_dict() for p in points]}
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
        try:
            write_atomic(self.path, text)
        except OSError as exc:
            raise TunerError(f"cannot write the profile {self.path}: {exc.strerror or exc}") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            held = filelock.FileLock(lock)
            held.acquire()
        except OSError as exc:  # a read-only config folder, a file where the folder should be
            raise TunerError(f"cannot write the profile's folder {self.path.parent}: {exc.strerror or exc}",
                             hint="set TUNER_CONFIG_DIR to a folder you can write") from None
        try:
            yield
        finally:
            held.release()

    def reset(self) -> bool:
        """Remove the file and ``tuner serve``'s observation files beside it (which would otherwise be learnt again);
        True if there was anything."""
        with self._locked():
            removed = False
            obs = self.path.parent / OBSERVATIONS_DIR
            for f in obs.glob("*.json") if obs.is_dir() else ():
                f.unlink(missing_ok=True)
                removed = True
            try:
                self.path.unlink()
                return True
            except FileNotFoundError:
                return removed

    def add_points(self, points: Sequence[MemoryPoint | SpeedPoint]) -> int:
        """Add calibration points (replacing those of the same id); the newest :data:`MAX_POINTS` are kept."""
        if not points:
            return 0
        with self._locked():
            entries = self.load()
            kept = {p.id: p for p in self.load_points()}
            for p in points:
                kept.pop(p.id, None)
                kept[p.id] = p
            self._write(entries, list(kept.values())[-MAX_POINTS:])
        return len(points)

    def export(self, dest: str | os.PathLike[str]) -> Path:
        """Copy the profile (as it is, YAML) to ``dest``, atomically."""
        entries, points = self.load(), self.load_points()
        out = ProfileStore(dest)
        out._write(entries, points)
        return out.path

    # --- lookups -------------------------------------------------------------------------------------------------
    def find(self, key: ProfileKey, *, check_build: bool = True) -> ProfileEntry | None:
        """The entry whose key matches ``key`` (the newest, if several do)."""
        found = [e for e in self.load() if e.key.matches(key, check_build=check_build)]
        return max(found, key=lambda e: e.updated_at) if found else None

    # --- learning ------------------------------------------------------------------------------------------------
    def learn(self, document: dict[str, Any], *, results_file: str = "") -> ProfileEntry:
        """Add a results document's measurements (see :func:`measurements_from_document`) and return its entry."""
        key = key_from_document(document)
        new = measurements_from_document(document, results_file=results_file)
        with self._locked():
            entries = self.load()
            kept: list[ProfileEntry] = []
            current: ProfileEntry | None = None
            for e in entries:
                if e.key.matches(key):
                    current = e if current is None else ProfileEntry(
                        current.key, current.measurements + e.measurements,
                        current.memory_observations + e.memory_observations, current.updated_at)
                elif _invalidated_by(e.key, key):
                    continue  # same file name on the same GPU models, but the file, driver or build changed
                else:
                    kept.append(e)
            base = current or ProfileEntry(key)
            merged = ProfileEntry(key, (base.measurements + tuple(new))[-MAX_MEASUREMENTS:],
                                  base.memory_observations, _now())
            kept.append(merged)
            self._write(kept)
        return merged

    def learn_file(self, path: str | os.PathLike[str]) -> ProfileEntry:
        """Read a results file written by ``tuner bench`` back and learn from it."""
        p = Path(path)
        try:
            document = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TunerError(f"cannot read results file {p}: {exc}") from None
        return self.learn(document, results_file=str(p))

    def absorb_observations(self, directory: str | os.PathLike[str] | None = None, *,
                            problems: list[str] | None = None) -> tuple[int, int]:
        """Attach ``tuner serve``'s memory observations to matching entries, and add their calibration points (if
        not there yet); returns (attached, skipped: those matching no entry). Files that cannot be read go to
        ``problems`` (see :func:`read_observations`)."""
        obs = list(read_observations(directory, problems=problems))
        if not obs:
            return 0, 0
        have = {p.id for p in self.load_points()}
        new_points = [p for o in obs for d in o["points"] or ()
                      if (p := point_from_dict(rec.plain(d))) is not None and p.id not in have]
        self.add_points(new_points)
        attached = skipped = 0
        with self._locked():
            entries = self.load()
            out: list[ProfileEntry] = []
            by_entry: dict[int, list[dict[str, Any]]] = {}
            for o in obs:
                idx = _observation_entry(o, entries)
                if idx is None:
                    skipped += 1
                    continue
                by_entry.setdefault(idx, []).append(o["summary"])
            for i, e in enumerate(entries):
                if i in by_entry:
                    merged = {o["file"]: o for o in e.memory_observations}
                    for s in by_entry[i]:
                        merged[s["file"]] = s
                        attached += 1
                    e = ProfileEntry(e.key, e.measurements, tuple(merged.values()), e.updated_at)
                out.append(e)
            if attached:
                self._write(out)
        return attached, skipped


def _invalidated_by(old: ProfileKey, new: ProfileKey) -> bool:
    """``old`` is the same file on the same hardware in an older state (see the module doc)."""
    return (old.model.name == new.model.name and old.model.repo == new.model.repo
            and old.hardware.gpus == new.hardware.gpus and old.hardware.cpu == new.hardware.cpu
            and not old.matches(new))


def key_from_document(document: dict[str, Any]) -> ProfileKey:
    """The profile key of a results document (``tuner bench``'s JSON)."""
    model = document.get("model") or {}
    ident = model.get("identity")
    if not ident:
        path = model.get("path")
        if not path or not Path(path).is_file():
            raise TunerError("the results file has no model identity and its GGUF is not there to hash")
        identity = model_identity(path)
    else:
        identity = ModelIdentity.from_dict(ident)
    hw = document.get("hardware") or {}
    gpus = hw.get("gpus") or []
    hardware = (HardwareKey(tuple(g.get("name", "") for g in gpus), gpus[0].get("driver_version"), None) if gpus
                else HardwareKey((), None, hw.get("cpu_model")))
    return ProfileKey(identity, hardware, BuildKey.of(document.get("llama_cpp") or {}))


def measurements_from_document(document: dict[str, Any], *, results_file: str = "") -> list[Measurement]:
    """Every set of a results document, at every depth it measured, as :class:`Measurement`\\ s."""
    kind = str(document.get("kind", "bench"))
    at = str(document.get("created_at") or _now())
    conc = int((document.get("config") or {}).get("concurrency", 1) or 1)
    out: list[Measurement] = []
    for r in document.get("results") or ():
        roof = {int(x["depth"]): x for x in r.get("roofline") or () if "depth" in x}
        for d in r.get("by_depth") or ():
            depth = int(d["depth"])
            pp = float(d["pp_tok_s"]["median"])
            tg = float(d["tg_tok_s"]["median"])
            bound = roof.get(depth) or {}
            tg_b, pp_b = bound.get("tg_bound_tok_s"), bound.get("pp_bound_tok_s")
            out.append(Measurement(
                set_name=str(r.get("name", "")), args=tuple(r.get("flags") or ()),
                server_flags=r.get("server_flags"), extra_args=tuple(r.get("extra_args") or ()), depth=depth,
                pp_tok_s=pp, tg_tok_s=tg, n_samples=int(d["tg_tok_s"].get("n", 0)), kind=kind, measured_at=at,
                results_file=results_file, tg_bound_tok_s=tg_b, pp_bound_tok_s=pp_b,
                tg_efficiency=round(tg / tg_b, 4) if tg_b else None,
                pp_efficiency=round(pp / pp_b, 4) if pp_b else None, concurrency=conc))
    return out


# --------------------------------------------------------------------------------------------- observations


def read_observations(directory: str | os.PathLike[str] | None = None, *,
                      problems: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """``tuner serve``'s observation files (format 1, checked against :data:`OBSERVATION`), each with a compact
    ``summary`` of its memory check. A file that does not pass is skipped; ``problems`` gets one line for it (its
    name and the first bad field)."""
    base = Path(directory) if directory is not None else observations_dir()
    if not base.is_dir():
        return
    for p in sorted(base.glob("*.json")):
        try:
            if not p.is_file():  # a folder or a FIFO named *.json: nothing to read (a FIFO would block)
                raise rec.RecordError("", "not a regular file")
            data = rec.validate(OBSERVATION, rec.read_json_file(p, MAX_OBSERVATION_BYTES))
        except OSError as exc:
            if problems is not None:
                problems.append(f"{p}: {exc.strerror or exc}")
            continue
        except rec.RecordError as exc:
            if problems is not None:
                problems.append(f"{p}: {exc}")
            continue
        check = data["memory_check"] or {}
        kinds = {}
        for kind in MEMORY_KINDS:
            k = check.get(kind)
            if isinstance(k, dict):
                kinds[kind] = {f: k.get(f) for f in ("predicted_bytes", "reported_bytes", "diff_bytes", "diff_ratio")}
        summary = {"file": p.name, "observed_at": data["observed_at"], "flags": list(data["flags"] or ()),
                   "mismatches": list(data["mismatches"] or ()), "kinds": kinds}
        try:
            data["summary"] = rec.plain(rec.validate(OBSERVATION_SUMMARY, summary, "memory_check"))
        except rec.RecordError as exc:
            if problems is not None:
                problems.append(f"{p}: {exc}")
            continue
        yield data


def _observation_entry(o: dict[str, Any], entries: Sequence[ProfileEntry]) -> int | None:
    """The index of the entry an observation (as :func:`read_observations` checked it) belongs to, or None."""
    model = o["model"]
    path = model["path"]
    ident: ModelIdentity | None = None
    if path and Path(path).is_file():
        with contextlib.suppress(TunerError):
            ident = model_identity(path)
    gpus = tuple(g["name"] for g in o["gpus"] or ())
    commit = (o["build"] or {}).get("commit")
    for i, e in enumerate(entries):
        if ident is not None:
            same_model = e.key.model.matches(ident)
        else:
            same_model = e.key.model.name == model.get("file") and e.key.model.file_bytes == model.get("bytes")
        if same_model and e.key.hardware.gpus == gpus and e.key.build.same_commit(commit):
            return i
    return None


# --------------------------------------------------------------------------------------------- the planner's hook


def speed_key(flags: ServerFlags, *, cpu_only: bool = False) -> tuple[Any, ...]:
    """The fields of a flag set that change speed (host RAM limits left out; without a GPU also the offload
    fields, which then change nothing), normalized."""
    d = asdict(flags)
    for name in _SPEED_NEUTRAL | (_GPU_ONLY if cpu_only else set()):
        d.pop(name, None)
    if "n_gpu_layers" in d:
        d["n_gpu_layers"] = None if d["n_gpu_layers"] is None or d["n_gpu_layers"] < 0 else d["n_gpu_layers"]
    d["kv_unified"] = flags.unified
    return tuple(sorted(d.items()))


def lookup_measured(entry: ProfileEntry, flags: ServerFlags) -> Measurement | None:
    """The newest, deepest single-stream measurement of exactly ``flags`` (no extra arguments) in ``entry``."""
    cpu_only = not entry.key.hardware.gpus
    want = speed_key(flags, cpu_only=cpu_only)
    hits = []
    for m in entry.measurements:
        f = m.flags()
        if f is not None and not _extra_changes_speed(m.extra_args) and m.concurrency == 1 \
                and speed_key(f, cpu_only=cpu_only) == want:
            hits.append(m)
    if not hits:
        return None
    return max(hits, key=lambda m: (m.measured_at, m.depth))


def _extra_changes_speed(extra: Sequence[str]) -> bool:
    """Arguments beyond ServerFlags other than ``--fit off`` / ``--jinja`` (which a plan's command has too)."""
    for occ in scan(extra):
        if isinstance(occ, Occurrence) and occ.row.key in ("jinja", "fit") and occ.value() in (True, "off"):
            continue
        return True
    return False


PredictionHook = Callable[[Any, ServerFlags, Hardware], Any]


def measured_hook(hardware: Hardware, build: Any | None, *, store: ProfileStore | None = None) -> PredictionHook:
    """The planner's ``measured`` hook (see the module doc). ``build`` None: entries of any llama.cpp build match
    (the newest is used); pass the build that will serve to honour the invalidation rule."""
    from tuner.speed import Prediction, predict_speed

    the_store = store or ProfileStore()
    entries = the_store.load()
    hw_key = HardwareKey.of(hardware)
    build_key = BuildKey.of(build) if build is not None else None
    memo: dict[tuple[Any, ...], ProfileEntry | None] = {}

    def entry_for(candidate: Any) -> ProfileEntry | None:
        memo_key = (tuple(getattr(candidate, "files", ()) or ()), getattr(candidate, "repo", None),
                    getattr(candidate, "revision", None))
        if memo_key in memo:
            return memo[memo_key]
        ident = candidate_identity(candidate)
        found = None
        if ident is not None:
            hits = [e for e in entries if e.key.model.matches(ident) and e.key.hardware == hw_key
                    and (build_key is None or e.key.build == build_key)]
            found = max(hits, key=lambda e: e.updated_at) if hits else None
        memo[memo_key] = found
        return found

    ratio_memo: dict[tuple[int, str], tuple[float, float, int, str] | None] = {}

    def ratios(entry: ProfileEntry, candidate: Any, placement: str) -> tuple[float, float, int, str] | None:
        """(tg, pp) medians of measured / predicted over the entry's single-stream measurements, preferring those
        of ``placement``; with their count and scope."""
        key = (id(entry), placement)
        if key not in ratio_memo:
            layout = candidate.layout
            rows: list[tuple[str, float, float]] = []
            for m in entry.measurements:
                f = m.flags()
                if f is None or m.concurrency != 1 or _extra_changes_speed(m.extra_args) or m.tg_tok_s <= 0:
                    continue
                try:
                    p = predict_speed(layout, f, hardware, gpu_split=gpu_split(hardware),
                                      depth_tokens=max(m.depth, 1))
                except TunerError:
                    continue
                if p.tg_tok_s > 0 and p.pp_tok_s > 0 and m.pp_tok_s > 0:
                    rows.append((placement_class(layout, f, hardware), m.tg_tok_s / p.tg_tok_s,
                                 m.pp_tok_s / p.pp_tok_s))
            same = [r for r in rows if r[0] == placement]
            chosen, scope = (same, placement.replace("_", " ")) if same else (rows, "all placements")
            ratio_memo[key] = (statistics.median(r[1] for r in chosen), statistics.median(r[2] for r in chosen),
                               len(chosen), scope) if chosen else None
        return ratio_memo[key]

    def hook(candidate: Any, flags: ServerFlags, hw: Hardware) -> Any:
        entry = entry_for(candidate)
        if entry is None:
            return None
        m = lookup_measured(entry, flags)
        if m is not None:
            tg_b = m.tg_bound_tok_s or 0.0
            return Prediction(tg_tok_s=m.tg_tok_s, pp_tok_s=m.pp_tok_s, tg_bound_tok_s=tg_b,
                              pp_bound_tok_s=m.pp_bound_tok_s or 0.0,
                              efficiency=m.tg_tok_s / tg_b if tg_b else 0.0, source="measured",
                              notes=(f"measured by tuner bench at depth {m.depth} ({m.n_samples} samples, "
                                     f"{m.measured_at[:10]})",))
        found = ratios(entry, candidate, placement_class(candidate.layout, flags, hw))
        if found is None:
            return None
        tg_r, pp_r, n, scope = found
        base = predict_speed(candidate.layout, flags, hw, gpu_split=gpu_split(hw))
        return replace(base, tg_tok_s=base.tg_tok_s * tg_r, pp_tok_s=base.pp_tok_s * pp_r,
                       efficiency=base.efficiency * tg_r, source="rescaled",
                       notes=(*base.notes, f"rescaled by {n} tuner bench measurement{'s' if n != 1 else ''} of this "
                                           f"model file ({scope}): tg ×{tg_r:.2f}, pp ×{pp_r:.2f}"))

    return hook


# --------------------------------------------------------------------------------------------- calibration


def load_calibration(hardware: Hardware, build: Any | None, *, store: ProfileStore | None = None,
                     shipped: Sequence[MemoryPoint | SpeedPoint] | None = None,
                     on_skip: Callable[[str], None] | None = None) -> Calibration:
    """The calibration points that apply on ``hardware`` with ``build`` (a :class:`tuner.build.LlamaBuild`, or None
    when there is no build yet: then the newest build's points): this machine's, of the same llama.cpp commit;
    then, for each device model (and the hardware's speed) without any, the shipped calibration files'
    (``shipped``: default :func:`tuner.calibration_file.shipped_points`, which tells ``on_skip`` of a file it
    could not read)."""
    from tuner.calibration_file import shipped_points
    from tuner.corrections import device_model

    local = (store or ProfileStore()).load_points()
    commit = str(getattr(build, "commit", "") or "") if build is not None else ""
    if not commit and local:
        commit = max(local, key=lambda p: p.observed_at).build
    key = BuildKey(commit, False, "")
    names = [g.llama_name for g in hardware.gpus] or ["CPU"]
    devices = {d for n in names if (d := device_model(n, hardware)) is not None}
    label = hardware_label(hardware)
    memory = [p for p in local if isinstance(p, MemoryPoint) and p.device in devices and key.same_commit(p.build)]
    speed = [p for p in local if isinstance(p, SpeedPoint) and p.hardware == label and key.same_commit(p.build)]
    missing = devices - {p.device for p in memory}
    if missing or not speed:
        others = shipped_points(on_skip=on_skip) if shipped is None else shipped
        memory += [p for p in others if isinstance(p, MemoryPoint) and p.device in missing]
        if not speed:
            speed = [p for p in others if isinstance(p, SpeedPoint) and p.hardware == label]
    return Calibration(tuple(memory), tuple(speed))

