"""Fitting :mod:`tuner.speed`'s coefficients to published llama.cpp measurements, and the residuals of the result.

The measurements are tests/data/speed-measurements.yaml: each record carries its source and a ``tuner`` block that
says how tuner reproduces it (the card and nearest quant, the ``--gpu``, the host, the llama-server flags, the
depths) and whether it is fitted on (``fit``: mainline llama.cpp), reported apart (``apart``: forks, MTP runs,
older builds) or ``excluded`` (not reproducible, with the reason).

The model is linear in its coefficients once each is written as a time factor (1 / efficiency, or seconds per layer),
so the fit is a least-squares solve, no optimiser: generation first, on the relative error of each record's
predicted seconds per token, then prompt processing, whose per-ubatch layer cost and CPU weight pass take the
generation fit's values. Every coefficient must come out positive, else the data do not support it and the fit says
so. ``python -m tuner.speedfit [--cli] [FILE]`` prints the fit beside the shipped values and the residual table
(``--cli``: each prediction from a ``tuner estimate … --json`` run, as a user would get it).

Only the fitting imports numpy (lazily): nothing here is on the path of ``recommend`` or ``estimate``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuner import speed
from tuner.errors import TunerError
from tuner.estimate import ServerFlags
from tuner.hardware import GB, Hardware, gpu_split, hardware_for
from tuner.models import resolve_layout
from tuner.paths import load_yaml

DEFAULT_RAM_GB_S = 50.0
"""Host RAM bandwidth of a record that states none and needs none (every layer on GPUs): tuner's desktop default."""
DEFAULT_CPU_CORES = 8
CLASSES = ("moe_gpu", "dense_gpu", "experts_in_ram", "cpu_only")
METRICS = ("tg", "pp")
USES = ("fit", "apart", "excluded")
GPU_GENERATIONS_FITTED = ("ampere", "ada", "blackwell")


@dataclass(frozen=True)
class SpeedRecord:
    """One published measurement and how tuner reproduces it."""

    id: int
    cls: str
    use_tg: str | None
    use_pp: str | None
    tg_tok_s: float | None
    pp_tok_s: float | None
    model: str | None
    gpu: str | None
    ram_gb_s: float
    cpu_cores: int
    flags: ServerFlags | None
    tg_depth: int | None
    pp_depth: int | None
    note: str

    def use(self, metric: str) -> str | None:
        return self.use_tg if metric == "tg" else self.use_pp

    def measured(self, metric: str) -> float | None:
        return self.tg_tok_s if metric == "tg" else self.pp_tok_s

    def depth(self, metric: str) -> int | None:
        return self.tg_depth if metric == "tg" else self.pp_depth

    @property
    def reproducible(self) -> bool:
        return self.model is not None and self.gpu is not None and self.flags is not None


def _record(raw: Mapping[str, Any], source: str) -> SpeedRecord:
    t = raw.get("tuner")
    if not isinstance(t, dict):
        raise TunerError(f"{source}: record {raw.get('id')} has no 'tuner' block")
    where = f"{source}: record {raw.get('id')}"
    for key in ("use_tg", "use_pp"):
        if t.get(key) not in (*USES, None):
            raise TunerError(f"{where}: {key} must be one of {', '.join(USES)} or null, got {t.get(key)!r}")
    if t.get("class") not in CLASSES:
        raise TunerError(f"{where}: class must be one of {', '.join(CLASSES)}, got {t.get('class')!r}")
    try:
        flags = ServerFlags(**t["flags"]) if t.get("flags") is not None else None
    except TypeError as error:
        raise TunerError(f"{where}: bad flags ({error})") from None
    return SpeedRecord(
        id=int(raw["id"]), cls=t["class"], use_tg=t.get("use_tg"), use_pp=t.get("use_pp"),
        tg_tok_s=raw.get("tg_tok_s"), pp_tok_s=raw.get("pp_tok_s"), model=t.get("model"), gpu=t.get("gpu"),
        ram_gb_s=float(t.get("ram_gb_s", DEFAULT_RAM_GB_S)), cpu_cores=int(t.get("cpu_cores", DEFAULT_CPU_CORES)),
        flags=flags, tg_depth=t.get("tg_depth"), pp_depth=t.get("pp_depth"), note=str(t.get("note", "")))


def load_records(path: str | Path) -> list[SpeedRecord]:
    """The records of a measurements file (see the module docstring)."""
    data = load_yaml(Path(path))
    if not isinstance(data, list):
        raise TunerError(f"{path}: expected a list of records")
    records = [_record(r, str(path)) for r in data]
    for r in records:
        for metric in METRICS:
            if r.use(metric) == "fit" and not (r.reproducible and r.depth(metric) is not None):
                raise TunerError(f"{path}: record {r.id} is fitted for {metric} but lacks model, gpu, flags or depth")
    return records


def record_hardware(rec: SpeedRecord) -> Hardware:
    """The record's ``--gpu`` with its host's RAM bandwidth and cores."""
    base = hardware_for(rec.gpu)
    return replace(base, ram_bandwidth_bytes_s=round(rec.ram_gb_s * GB), cpu_physical_cores=rec.cpu_cores,
                   cpu_logical_cores=max(base.cpu_logical_cores, rec.cpu_cores))


def record_terms(rec: SpeedRecord, metric: str) -> speed.SpeedTerms:
    """:func:`tuner.speed.speed_terms` of the record at its depth for ``metric``."""
    if not rec.reproducible or rec.depth(metric) is None:
        raise TunerError(f"record {rec.id} is not reproduced for {metric}")
    assert rec.model is not None and rec.flags is not None
    hardware = record_hardware(rec)
    return speed.speed_terms(resolve_layout(rec.model), rec.flags, hardware, gpu_split=gpu_split(hardware),
                             depth_tokens=int(rec.depth(metric) or 0))


def record_prediction(rec: SpeedRecord, metric: str) -> speed.Prediction:
    """:func:`tuner.speed.predict_speed` of the record (what ``tuner estimate`` reports for it)."""
    assert rec.model is not None and rec.flags is not None
    hardware = record_hardware(rec)
    return speed.predict_speed(resolve_layout(rec.model), rec.flags, hardware, gpu_split=gpu_split(hardware),
                               depth_tokens=int(rec.depth(metric) or 0))


# ---------------------------------------------------------------------------------------------------- fitting

TG_COLUMNS: tuple[tuple[str, Callable[[speed.SpeedTerms], float]], ...] = (
    ("GPU_TG_BANDWIDTH_EFFICIENCY", lambda t: t.tg_gpu_weights_s),
    ("KV_READ_EFFICIENCY", lambda t: t.tg_gpu_kv_s),
    *((f"GPU_LAYER_SECONDS.{g}", lambda t, g=g: float(t.gpu_layers.get(g, 0))) for g in GPU_GENERATIONS_FITTED),
    ("RAM_EFFICIENCY", lambda t: t.tg_cpu_bytes_s),
    ("CPU_LAYER_SECONDS", lambda t: float(t.cpu_layers)),
)
PP_COLUMNS: tuple[tuple[str, Callable[[speed.SpeedTerms], float]], ...] = (
    ("PP_DENSE_EFFICIENCY", lambda t: t.pp_dense_s),
    ("PP_EXPERT_EFFICIENCY", lambda t: t.pp_expert_s),
    ("PP_ATTENTION_EFFICIENCY", lambda t: t.pp_attention_s),
    ("PP_WEIGHT_PASS_EFFICIENCY", lambda t: t.pp_weight_pass_s),
    ("PCIE_EFFICIENCY", lambda t: t.pp_pcie_s),
    ("CPU_PP_FLOPS_PER_CORE", lambda t: t.pp_cpu_core_flops),
)


def _is_time_factor(name: str) -> bool:
    """Seconds per layer are fitted as they are; the others as 1 / efficiency (1 / FLOP rate)."""
    return "LAYER_SECONDS" in name


def _solve(rows: Sequence[Sequence[float]], seconds: Sequence[float], offsets: Sequence[float],
           names: Sequence[str]) -> dict[str, float]:
    """Least squares on relative error: Σ_j a_j·x_ij + offset_i ≈ seconds_i, each row divided by seconds_i."""
    import numpy as np  # here, not at import: only fitting needs it

    a = np.array(rows, dtype=float) / np.array(seconds)[:, None]
    b = 1.0 - np.array(offsets) / np.array(seconds)
    used = [j for j in range(a.shape[1]) if np.any(a[:, j] != 0)]
    solution = np.linalg.lstsq(a[:, used], b, rcond=None)[0]
    out: dict[str, float] = {}
    for j, value in zip(used, solution, strict=True):
        if value <= 0:
            raise TunerError(f"the measurements do not support {names[j]}: its least-squares value is {value:.3g}")
        out[names[j]] = float(value) if _is_time_factor(names[j]) else 1.0 / float(value)
    return out


def _fit_rows(records: Iterable[SpeedRecord], metric: str) -> list[tuple[SpeedRecord, speed.SpeedTerms]]:
    out = []
    for rec in records:
        if rec.use(metric) == "fit" and rec.measured(metric):
            out.append((rec, record_terms(rec, metric)))
    return out


def fit_coefficients(records: Sequence[SpeedRecord]) -> dict[str, float]:
    """The coefficients of :mod:`tuner.speed`, by constant name (``GPU_LAYER_SECONDS.ada`` for a mapping entry), as
    the records marked ``fit`` give them (see the module docstring)."""
    tg_rows = _fit_rows(records, "tg")
    tg_names = [n for n, _ in TG_COLUMNS]
    tg = _solve([[f(t) for _, f in TG_COLUMNS] for _, t in tg_rows], [1.0 / float(r.tg_tok_s or 0) for r, _ in tg_rows],
                [0.0] * len(tg_rows), tg_names)

    def layer_seconds(t: speed.SpeedTerms) -> float:
        return (t.cpu_layers * tg.get("CPU_LAYER_SECONDS", 0.0)
                + sum(n * tg[f"GPU_LAYER_SECONDS.{g}"] for g, n in t.gpu_layers.items()))

    pp_rows = _fit_rows(records, "pp")
    offsets = [t.pp_cpu_pass_s / tg.get("RAM_EFFICIENCY", 1.0) + layer_seconds(t) / t.n_ubatch for _, t in pp_rows]
    pp = _solve([[f(t) for _, f in PP_COLUMNS] for _, t in pp_rows], [1.0 / float(r.pp_tok_s or 0) for r, _ in pp_rows],
                offsets, [n for n, _ in PP_COLUMNS])
    return {**tg, **pp}


def shipped_coefficients() -> dict[str, float]:
    """:mod:`tuner.speed`'s coefficients, named as :func:`fit_coefficients` names them."""
    out = {n: float(getattr(speed, n)) for n, _ in (*TG_COLUMNS, *PP_COLUMNS) if "." not in n}
    out.update({f"GPU_LAYER_SECONDS.{g}": s for g, s in speed.GPU_LAYER_SECONDS.items()})
    return out


SHARE_THAT_COUNTS = 0.05
"""A record bears on a coefficient when the part that coefficient scales is at least this share of its prediction."""


def records_per_coefficient(records: Sequence[SpeedRecord]) -> dict[str, int]:
    """How many fitted records bear on each coefficient (:data:`SHARE_THAT_COUNTS` of the predicted time, with the
    shipped coefficients)."""
    out: dict[str, int] = {}
    for metric, parts in (("tg", speed.tg_parts), ("pp", speed.pp_parts)):
        for _, t in _fit_rows(records, metric):
            split = parts(t)
            total = sum(split.values())
            for name, seconds in split.items():
                if total and seconds >= SHARE_THAT_COUNTS * total:
                    out[name] = out.get(name, 0) + 1
    return out


# -------------------------------------------------------------------------------------------------- residuals

@dataclass(frozen=True)
class Residual:
    id: int
    cls: str
    metric: str
    use: str
    measured_tok_s: float
    predicted_tok_s: float

    @property
    def ratio(self) -> float:
        """predicted / measured."""
        return self.predicted_tok_s / self.measured_tok_s

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "class": self.cls, "metric": self.metric, "use": self.use,
                "measured_tok_s": self.measured_tok_s, "predicted_tok_s": round(self.predicted_tok_s, 2),
                "ratio": round(self.ratio, 3)}


Predictor = Callable[[SpeedRecord, str], float]


def library_predictor(rec: SpeedRecord, metric: str) -> float:
    p = record_prediction(rec, metric)
    return p.tg_tok_s if metric == "tg" else p.pp_tok_s


def estimate_argv(rec: SpeedRecord, metric: str) -> list[str]:
    """The ``tuner estimate`` arguments that reproduce the record for ``metric``."""
    assert rec.model is not None and rec.flags is not None and rec.gpu is not None
    return ["estimate", rec.model, "--gpu", rec.gpu, *rec.flags.to_args(), "--depth", str(rec.depth(metric)),
            "--ram-bandwidth", f"{rec.ram_gb_s:g}", "--cpu-cores", str(rec.cpu_cores), "--json"]


def cli_predictor(rec: SpeedRecord, metric: str) -> float:
    """The record's prediction from a ``tuner estimate … --json`` run in a child process."""
    done = subprocess.run([sys.executable, "-m", "tuner", *estimate_argv(rec, metric)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise TunerError(f"tuner estimate for record {rec.id} failed: {done.stderr.strip()}")
    return float(json.loads(done.stdout)["predicted"][f"{metric}_tok_s"])


def residuals(records: Iterable[SpeedRecord], predictor: Predictor = library_predictor) -> list[Residual]:
    """predicted / measured for every reproduced record, fitted or apart, tg and pp."""
    out = []
    for rec in records:
        for metric in METRICS:
            use, measured = rec.use(metric), rec.measured(metric)
            if use in ("fit", "apart") and measured and rec.reproducible and rec.depth(metric) is not None:
                out.append(Residual(rec.id, rec.cls, metric, use, float(measured), predictor(rec, metric)))
    return out


def summary(rows: Iterable[Residual], use: str = "fit") -> dict[tuple[str, str], dict[str, float]]:
    """Per (class, metric): count, median and worst |predicted / measured − 1| of the rows with ``use``."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.use == use:
            groups.setdefault((r.cls, r.metric), []).append(abs(r.ratio - 1))
    return {k: {"n": len(v), "median": statistics.median(v), "worst": max(v)}
            for k, v in sorted(groups.items(), key=lambda kv: (CLASSES.index(kv[0][0]), kv[0][1]))}


def default_data_path() -> Path:
    """tests/data/speed-measurements.yaml of a source checkout."""
    return Path(__file__).resolve().parent.parent / "tests" / "data" / "speed-measurements.yaml"


def main(argv: Sequence[str] = ()) -> int:
    args = list(argv)
    use_cli = "--cli" in args
    paths = [a for a in args if a != "--cli"]
    records = load_records(paths[0] if paths else default_data_path())
    fitted, shipped, counts = fit_coefficients(records), shipped_coefficients(), records_per_coefficient(records)
    print(f"{'coefficient':32} {'fitted':>12} {'shipped':>12} {'records':>8}")
    for name in fitted:
        print(f"{name:32} {fitted[name]:12.4g} {shipped.get(name, float('nan')):12.4g} {counts.get(name, 0):8d}")
    rows = residuals(records, cli_predictor if use_cli else library_predictor)
    print(f"\n{'id':>4} {'class':15} {'metric':6} {'use':6} {'measured':>9} {'predicted':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r.id:4d} {r.cls:15} {r.metric:6} {r.use:6} {r.measured_tok_s:9.1f} {r.predicted_tok_s:9.1f} "
              f"{r.ratio:6.3f}")
    for use in ("fit", "apart"):
        print(f"\n|predicted / measured - 1|, {use} records: class, metric, n, median, worst")
        for (cls, metric), s in summary(rows, use).items():
            print(f"  {cls:15} {metric:3} {s['n']:3d} {s['median']:6.3f} {s['worst']:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
