"""Bench results files: ``<base>/<model>/<hardware>/<timestamp>.json``, written atomically.

A document holds the model, the hardware, the llama.cpp build, the configuration, every launch and sample in the
order they were taken, each set's results with :mod:`tuner.speed`'s roofline beside them, and the verdict;
:mod:`tuner.profile_store` learns from it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuner.bench.flagsets import FlagSet, slug, uses_fit
from tuner.bench.measure import BenchConfig
from tuner.bench.run import BenchRun
from tuner.bench.stats import SetResult, predicted_ratios, verdict
from tuner.bench.tune import TuneResult
from tuner.errors import TunerError
from tuner.flags import ServerFlags
from tuner.hardware import Hardware
from tuner.layout import ModelLayout
from tuner.paths import write_atomic
from tuner.planner import gpu_split
from tuner.speed import predict_speed

RESULTS_SCHEMA = 1


def model_slug(model_path: str | os.PathLike[str]) -> str:
    name = Path(model_path).name
    name = re.sub(r"-\d{5}-of-\d{5}\.gguf$", "", name)
    return slug(re.sub(r"\.gguf$", "", name))


def hardware_slug(hardware: Hardware) -> str:
    if not hardware.gpus:
        return "cpu-" + slug(hardware.cpu_model.lower())
    names = [slug(g.name.lower().replace("nvidia", "").replace("geforce", "")) for g in hardware.gpus]
    if len(set(names)) == 1:
        return names[0] if len(names) == 1 else f"{names[0]}x{len(names)}"
    return "+".join(names)


def hardware_summary(hardware: Hardware) -> dict[str, Any]:
    return {
        "gpus": [{"index": g.index, "name": g.name, "llama_name": g.llama_name, "driver_version": g.driver_version,
                  "vram_total_bytes": g.vram_total_bytes, "vram_free_bytes": g.vram_free_bytes,
                  "compute_capability": list(g.compute_capability) if g.compute_capability else None,
                  "source": g.source} for g in hardware.gpus],
        "cpu_model": hardware.cpu_model,
        "cpu_physical_cores": hardware.cpu_physical_cores,
        "cpu_logical_cores": hardware.cpu_logical_cores,
        "ram_total_bytes": hardware.ram_total_bytes,
        "ram_available_bytes": hardware.ram_available_bytes,
    }


def build_summary(build: Any) -> dict[str, Any]:
    """What llama.cpp ran: a :class:`tuner.build.LlamaBuild` (duck-typed, so tests may pass a stand-in)."""
    if build is None:
        return {}
    return {"key": getattr(build, "key", ""), "version_text": getattr(build, "version_text", ""),
            "commit": getattr(build, "commit", ""), "cuda": bool(getattr(build, "cuda", False)),
            "options": dict(getattr(build, "options", {}) or {}), "server_bin": str(getattr(build, "server_bin", ""))}


def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def results_path(base_dir: str | os.PathLike[str], model_path: str | os.PathLike[str], hardware: Hardware,
                 stamp: str | None = None) -> Path:
    """``<base>/<model>/<hardware>/<timestamp>.json``."""
    return Path(base_dir) / model_slug(model_path) / hardware_slug(hardware) / f"{stamp or timestamp()}.json"


def write_json_atomic(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON to ``path`` atomically."""
    return write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def roofline_rows(layout: ModelLayout, fs: FlagSet, hardware: Hardware, depths: Iterable[int]) -> list[dict[str, Any]]:
    """:mod:`tuner.speed`'s bounds and predictions for a set at each depth (none for a ``--fit`` set on a GPU,
    whose placement llama-server decides)."""
    if hardware.gpus and uses_fit(fs.args):
        return []
    flags = fs.flags or ServerFlags()
    rows = []
    for depth in depths:
        try:
            p = predict_speed(layout, flags, hardware, gpu_split=gpu_split(hardware), depth_tokens=max(depth, 1))
        except TunerError:
            return []
        rows.append({"depth": depth, "tg_bound_tok_s": round(p.tg_bound_tok_s, 3),
                     "pp_bound_tok_s": round(p.pp_bound_tok_s, 3), "tg_predicted_tok_s": round(p.tg_tok_s, 3),
                     "pp_predicted_tok_s": round(p.pp_tok_s, 3)})
    return rows


def result_rows(results: Iterable[SetResult], layout: ModelLayout, hardware: Hardware) -> list[dict[str, Any]]:
    """Each set's dict with its roofline rows and efficiency (measured / bound) at the reference depth."""
    out = []
    for r in results:
        d = r.to_dict()
        d["roofline"] = roofline_rows(layout, r.fs, hardware, [x.depth for x in r.by_depth])
        ref = next((x for x in d["roofline"] if x["depth"] == r.ref_depth), None)
        d["efficiency"] = ({"tg": round(r.tg_tok_s / ref["tg_bound_tok_s"], 4) if ref["tg_bound_tok_s"] else None,
                            "pp": round(r.pp_tok_s / ref["pp_bound_tok_s"], 4) if ref["pp_bound_tok_s"] else None}
                           if ref else None)
        out.append(d)
    return out


def _model_doc(model_path: str | os.PathLike[str], layout: ModelLayout,
               identity: dict[str, Any] | None) -> dict[str, Any]:
    return {"path": str(Path(model_path).resolve()), "name": model_slug(model_path), "arch": layout.arch,
            "file_bytes": layout.file_bytes, "has_mtp": layout.has_mtp, "identity": identity}


def _document_head(kind: str, model_path: str | os.PathLike[str], layout: ModelLayout, hardware: Hardware,
                   build: Any, model_identity: dict[str, Any] | None, config: Any, launches: Any, results: Any,
                   samples: Any) -> dict[str, Any]:
    """What every results file starts with: the model, the hardware, the build, the runs and their order."""
    return {
        "schema": RESULTS_SCHEMA,
        "kind": kind,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": _model_doc(model_path, layout, model_identity),
        "hardware": hardware_summary(hardware),
        "llama_cpp": build_summary(build),
        "config": asdict(config),
        "launches": [asdict(la) for la in launches],
        "results": result_rows(results, layout, hardware),
        "order": [[s.seq, s.set_name, s.depth, s.repeat] for s in samples],
    }


def bench_document(run: BenchRun, *, model_path: str | os.PathLike[str], layout: ModelLayout, hardware: Hardware,
                   build: Any, objective: str = "both", model_identity: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results file of a plain benchmark (:mod:`tuner.profile_store` learns from it)."""
    head = _document_head("bench", model_path, layout, hardware, build, model_identity, run.config, run.launches,
                          run.results, run.samples)
    return {
        **head,
        "mode": run.mode,
        "mode_reason": run.mode_reason,
        "verdict": with_predictions(verdict(run.results, objective), head["results"]),
        "notes": list(run.notes),
        **(extra or {}),
    }


def with_predictions(found: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The verdict's comparisons with :mod:`tuner.speed`'s predicted ratio beside each measured one, by depth."""
    for comp in found.get("comparisons", []):
        pred = predicted_ratios(rows, comp["set"], comp["reference"])
        for row in comp["by_depth"]:
            row["predicted"] = pred.get(row["depth"])
    return found


def tune_document(result: TuneResult, *, model_path: str | os.PathLike[str], layout: ModelLayout,
                  hardware: Hardware, build: Any, cfg: BenchConfig, model_identity: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    results = [result.winner]
    if result.plan.fs.name != result.winner.fs.name:
        results.append(result.plan)
    if result.defaults is not None:
        results.append(result.defaults)
    verdict_depths = sorted({d.depth for r in results for d in r.by_depth}) or [result.depth]
    head = _document_head("tune", model_path, layout, hardware, build, model_identity,
                          replace(cfg, depths=tuple(verdict_depths)), result.launches, results, result.samples)
    document = {
        **head,
        "tune": {
            "depth": result.depth,
            "objective": result.objective,
            "dimensions": [{"name": n, "values": list(v)} for n, v in result.dimensions],
            "grid_size": result.grid_size,
            "launches": len(result.launches),
            "trials": [t.to_dict() for t in result.trials],
        },
        "verdict": {
            "objective": result.objective,
            "winner": result.winner.fs.name,
            "winner_args": list(result.winner.fs.args),
            "ratio_to_plan": result.ratio(result.plan),
            "ratio_to_defaults": result.ratio(result.defaults),
            "comparisons": result.comparisons(),
            "ref_depth": result.winner.ref_depth,
            "search_best": result.search_best,
        },
        "notes": list(result.notes),
        **(extra or {}),
    }
    with_predictions(document["verdict"], head["results"])
    return document
