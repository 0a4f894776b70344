"""``tuner bench``: measure llama-server flag sets side by side on this machine, and learn from it.

Each ``--set NAME=FLAGS`` is a llama-server flag string. Without ``--set`` the planner's plan is compared with
llama-server's defaults (only the model, ``--fit on``). Every set gets its own server (all up at once when memory
allows, so the runs interleave A B A B …), is warmed up, and at every ``--depths`` context depth measures prompt
processing of fresh tokens and the generation of ``--gen-tokens`` tokens, from the server's own timings. ``--tune``
searches around the plan instead (coordinate descent; see :mod:`tuner.bench`) and reports the winner against the
plan and the defaults.

Results: ``bench_results/<model>/<hardware>/<timestamp>.json`` (or under ``--out``) with a PNG chart beside it; the
measurements go into the profile (``tuner profile show``) that ``tuner recommend`` reads.

Examples:

    tuner bench model.gguf                                     # the plan vs llama-server's defaults
    tuner bench model.gguf --set f16='-c 32768 -np 1' --set q8='-c 32768 -np 1 -ctk q8_0 -ctv q8_0'
    tuner bench model.gguf --set a='-c 65536' --depths 0,16k,60k --repeat 5 --gen-tokens 256
    tuner bench model.gguf --set np4='-c 131072 -np 4 -kvu' --concurrency 4   # aggregate and per-request tok/s
    tuner bench model.gguf --tune --ctx-size 65536             # search around the plan at 64k of context
    tuner bench model.gguf --tune --dims ubatch,kv,threads --json
    tuner bench model.gguf --gpu none                          # the CPU alone, even on a machine with a GPU
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tuner import bench as b
from tuner.cli import _options as o
from tuner.cli._output import emit, err_console
from tuner.errors import TunerError
from tuner.hardware import Hardware, hardware_for

SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="NAME=FLAGS: a named llama-server flag set to measure (repeatable). Default: the plan and "
                  "llama-server's defaults.", show_default=False)]
DepthsOpt = Annotated[str | None, typer.Option(
    "--depths", help="Context depths to measure at, tokens: 0,8192,32768 (k suffix allowed). --tune: the plan's "
                     "context unless given (the largest is used).", show_default=False)]
RepeatOpt = Annotated[int, typer.Option("--repeat", help="Runs per set and depth (--tune: the most per round).")]
PromptTokensOpt = Annotated[int, typer.Option("--prompt-tokens", help="Fresh prompt tokens per measurement.")]
GenTokensOpt = Annotated[int, typer.Option("--gen-tokens", help="Tokens generated per measurement.")]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", help="Requests sent at once (needs as many slots).")]
TuneOpt = Annotated[bool, typer.Option("--tune", help="Search around the plan for faster flags.")]
DimsOpt = Annotated[str | None, typer.Option(
    "--dims", help=f"--tune: only these dimensions ({', '.join(b.TUNE_DIMENSIONS)}).", show_default=False)]
ObjectiveOpt = Annotated[str, typer.Option("--objective", help="Rank by tg, pp, or both (geometric mean).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Base folder of the results files.")]
KeepLogsOpt = Annotated[bool, typer.Option("--keep-logs", help="Keep llama-server logs beside the results.")]
NoProfileOpt = Annotated[bool, typer.Option("--no-profile", help="Do not record the results in the profile.")]
BenchGpuOpt = Annotated[str | None, typer.Option(
    "--gpu", help="'none': measure on the CPU only (a CPU build of llama.cpp). A catalog GPU cannot be measured "
                  "here: leave --gpu out to use the detected ones.", show_default=False)]


def bench_hardware(gpu: str | None, vram: str | None) -> Hardware:
    """The hardware measured: this machine's (``--vram`` may lower what the plan counts on), or its CPU alone."""
    if gpu is not None and gpu.strip().lower() not in ("none", "cpu"):
        raise TunerError(f"--gpu {gpu}: tuner bench measures this machine; --gpu takes only 'none' (CPU only)")
    return hardware_for(gpu, vram)


def _say(line: str) -> None:
    err_console.print(Text(line, style="dim"), highlight=False)


def resolve_model(model: str | None, hardware: Hardware, wishes: Any, *, need_plan: bool) -> tuple[Path, Any, Any]:
    """(local GGUF path, layout, plan or None). A file is used as it is; anything else is planned (to pick the
    quant) and fetched like ``tuner serve`` does."""
    from tuner.fetch import fetch_candidate
    from tuner.models import resolve_candidates
    from tuner.planner import plan_for

    plan = None
    if need_plan or model is None or not Path(model).expanduser().is_file():
        plan = plan_for(model, hardware, wishes).plan
        candidate = plan.candidate
    else:
        candidate = resolve_candidates(model)[0]
    fetched = fetch_candidate(candidate)
    return fetched.model_path, candidate.layout, plan


def bench_config(depths: str | None, repeat: int, prompt_tokens: int, gen_tokens: int, concurrency: int,
                 default: tuple[int, ...] = b.DEFAULT_DEPTHS) -> b.BenchConfig:
    return b.BenchConfig(depths=b.parse_depths(depths) if depths else default, repeat=repeat,
                         prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, concurrency=concurrency)


def compact_results(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The results rows for ``--json``: everything but the per-sample detail (that is in the file)."""
    return [{k: v for k, v in r.items() if k != "samples"} for r in document["results"]]


def save_outputs(document: dict[str, Any], out: Path, model_path: Path, hardware: Hardware, *,
                 learn: bool) -> dict[str, Any]:
    """Write the results file and the PNG beside it, and learn the file into the profile (read back from disk)."""
    from tuner.benchplot import render_png, series_from_results
    from tuner.profile_store import ProfileStore

    path = b.results_path(out, model_path, hardware)
    b.write_json_atomic(path, document)
    series = series_from_results(document["results"])
    png = path.with_suffix(".png")
    where = (f"{hardware.gpus[0].name}" if hardware.gpus else f"CPU {hardware.cpu_model}")
    cfg = document["config"]
    render_png(series, png, title=f"{b.model_slug(model_path)} on {where}",
               subtitle=f"median of up to {cfg['repeat']} runs, whiskers min-max; {cfg['prompt_tokens']} prompt "
                        f"tokens, {cfg['gen_tokens']} generated" + (f", {cfg['concurrency']} at once"
                                                                    if cfg["concurrency"] > 1 else ""))
    saved: dict[str, Any] = {"saved_to": str(path), "plot": str(png), "profile": None}
    if learn:
        store = ProfileStore()
        entry = store.learn_file(path)
        attached, _skipped = store.absorb_observations()
        best = entry.best
        saved["profile"] = {"path": str(store.path), "entry": entry.key.id(),
                            "measurements": len(entry.measurements), "memory_observations_attached": attached,
                            "best": best.to_dict() if best else None}
    return saved


def _fmt(stats: dict[str, Any]) -> str:
    return f"{stats['median']:,.1f} ({stats['min']:,.1f}–{stats['max']:,.1f})"


def render_bench(console: Console, result: dict[str, Any]) -> None:
    from tuner.benchplot import bar_table, series_from_results, terminal_chart

    table = Table(title="tok/s: median (min–max)", title_justify="left")
    for col in ("set", "depth", "pp tok/s", "tg tok/s", "n"):
        table.add_column(col, justify="left" if col == "set" else "right")
    conc = result.get("concurrency", 1) > 1
    if conc:
        table.add_column("per request pp / tg", justify="right")
    for r in result["results"]:
        for d in r["by_depth"]:
            row = [r["name"], str(d["depth"]), _fmt(d["pp_tok_s"]), _fmt(d["tg_tok_s"]), str(d["tg_tok_s"]["n"])]
            if conc:
                row.append(f"{d['per_request_pp_tok_s']['median']:,.1f} / {d['per_request_tg_tok_s']['median']:,.1f}")
            table.add_row(*row)
    console.print(table)
    series = series_from_results(result["results"])
    chart = terminal_chart(series, width=min(console.width, 120)) if len({d for s in series for d in s.depths}) > 1 \
        else None
    if chart:
        import re

        if not console.is_terminal:
            chart = re.sub(r"\x1b\[[0-9;]*m", "", chart)
        console.file.write(chart.rstrip("\n") + "\n")  # as is: rich would re-wrap plotext's lines
        console.file.flush()
    else:
        console.print(bar_table(series))
    for r in result["results"]:
        console.print(f"[bold]{r['name']}[/bold]: llama-server {shlex.join(r['flags'])}", highlight=False,
                      soft_wrap=True)
    tune = result.get("tune")
    if tune:
        trials = Table(title=f"--tune at depth {tune['depth']}: {tune['launches']} launches for a grid of "
                             f"{tune['grid_size']}", title_justify="left")
        for col in ("round", "dimension", "configuration", "pp tok/s", "tg tok/s", "n", "note"):
            trials.add_column(col, justify="right" if col in ("round", "pp tok/s", "tg tok/s", "n") else "left")
        for t in tune["trials"]:
            note = t["reason"] if not t["fits"] else (f"dropped after {t['dropped_after']}" if t["dropped_after"]
                                                      else "")
            trials.add_row(str(t["round"]), t["dimension"], t["name"], f"{t['pp_tok_s']:,.1f}",
                           f"{t['tg_tok_s']:,.1f}", str(t["n_samples"]), note)
        console.print(trials)
    verdict = result.get("verdict") or {}
    if "ratio_to_defaults" in verdict:
        for label, key in (("the plan", "ratio_to_plan"), ("llama-server's defaults", "ratio_to_defaults")):
            ratio = verdict.get(key)
            if ratio:
                console.print(f"winner [bold]{verdict['winner']}[/bold] vs {label}: tg ×{ratio['tg']:.2f}, "
                              f"pp ×{ratio['pp']:.2f}")
    elif verdict:
        console.print(f"fastest at depth {verdict['ref_depth']} ({verdict['objective']}): "
                      f"[bold]{verdict['winner']}[/bold]")
        for name, ratio in verdict["ratios_to_reference"].items():
            if name != verdict["reference_set"] and ratio["tg"] is not None:
                console.print(f"  {name} vs {verdict['reference_set']}: tg ×{ratio['tg']:.2f}, pp ×{ratio['pp']:.2f}")
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    console.print(f"results: {result['saved_to']}", highlight=False, soft_wrap=True)
    console.print(f"chart:   {result['plot']}", highlight=False, soft_wrap=True)
    prof = result.get("profile")
    if prof:
        console.print(f"profile: {prof['path']} ({prof['measurements']} measurements for this model, hardware and "
                      f"build)", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        model: o.OptionalModelArg = None,
        sets: SetOpt = None,
        depths: DepthsOpt = None,
        repeat: RepeatOpt = 3,
        prompt_tokens: PromptTokensOpt = 512,
        gen_tokens: GenTokensOpt = 128,
        concurrency: ConcurrencyOpt = 1,
        tune: TuneOpt = False,
        dims: DimsOpt = None,
        objective: ObjectiveOpt = "both",
        server_bin: o.ServerBinOpt = None,
        ctx_size: o.PlanCtxOpt = None,
        parallel: o.PlanParallelOpt = 1,
        prefer: o.PreferOpt = "speed",
        buffer: o.BufferOpt = None,
        quant: o.QuantOpt = None,
        cache_type: o.CacheTypeOpt = None,
        allow_yarn: o.AllowYarnOpt = False,
        gpu: BenchGpuOpt = None,
        vram: o.VramOpt = None,
        out: OutOpt = Path("bench_results"),
        keep_logs: KeepLogsOpt = False,
        no_profile: NoProfileOpt = False,
        as_json: o.JsonOpt = False,
    ) -> None:
        """Measure llama-server flag sets side by side (or --tune around the plan) and learn the results."""
        from tuner.cli.build import BuildProgress
        from tuner.cli.recommend import wishes_from_options
        from tuner.planner import budget_for
        from tuner.profile_store import model_identity
        from tuner.serve import gpus_for_build, obtain_build

        if objective not in b.OBJECTIVES:
            raise TunerError(f"--objective must be one of {', '.join(b.OBJECTIVES)}, got {objective!r}")
        if tune and sets:
            raise TunerError("--tune searches around the plan; leave out --set (or bench the sets without --tune)")
        user_sets = [b.parse_set(spec) for spec in sets or ()]
        b.check_unique_names(user_sets)
        b.check_slots(user_sets, concurrency)
        cfg = bench_config(depths, repeat, prompt_tokens, gen_tokens, concurrency)
        if parallel != -1 and parallel < concurrency:
            parallel = concurrency  # the plan needs a slot per concurrent request
        wishes = wishes_from_options(ctx_size=ctx_size, parallel=parallel, prefer=prefer, vision=False,
                                     buffer=buffer, quant=quant, cache_type=cache_type, allow_yarn=allow_yarn)
        hardware = bench_hardware(gpu, vram)
        budget = budget_for(hardware, wishes)
        model_path, layout, plan = resolve_model(model, hardware, wishes, need_plan=not user_sets)
        b.check_sets_fit(layout, user_sets, hardware, budget)  # refuse before building or launching anything
        with BuildProgress(err_console) as progress:
            build, _cached = obtain_build(server_bin=server_bin, gpus=gpus_for_build(hardware), on_progress=progress)
        if gpu is not None and build.cuda:
            raise TunerError("--gpu none with a CUDA build of llama-server would still use the GPU; "
                             "give --server-bin a CPU build")
        identity = model_identity(model_path).to_dict()
        stamp = b.timestamp()
        log_dir = b.results_path(out, model_path, hardware, stamp).with_suffix(".logs") if keep_logs else None
        if tune:
            only = [d.strip() for d in dims.split(",") if d.strip()] if dims else None
            result = b.run_tune(model_path, plan.flags, cfg, server_bin=build.server_bin, layout=layout,
                                hardware=hardware, budget=budget, plan_extra=plan.extra_args,
                                depth=max(cfg.depths) if depths else None, objective=objective, only=only,
                                min_parallel=max(wishes.parallel, concurrency), log_dir=log_dir, on_progress=_say)
            document = b.tune_document(result, model_path=model_path, layout=layout, hardware=hardware, build=build,
                                       cfg=cfg, model_identity=identity)
        else:
            # the baseline first: every ratio in the verdict is then "against llama-server's defaults"
            run_sets = user_sets or [b.defaults_set(),
                                     b.flagset_from_flags(b.PLAN_NAME, plan.flags, (*plan.extra_args, "--fit", "off"))]
            run = b.run_bench(model_path, run_sets, cfg, server_bin=build.server_bin, layout=layout,
                              hardware=hardware, budget=budget, log_dir=log_dir, on_progress=_say)
            document = b.bench_document(run, model_path=model_path, layout=layout, hardware=hardware, build=build,
                                        objective=objective, model_identity=identity)
        saved = save_outputs(document, out, model_path, hardware, learn=not no_profile)
        result: dict[str, Any] = {
            "results": compact_results(document), **saved, "verdict": document["verdict"],
            "kind": document["kind"], "concurrency": cfg.concurrency, "launches": len(document["launches"]),
            "mode": document.get("mode"), "notes": document["notes"], "llama_cpp": document["llama_cpp"],
        }
        if tune:
            result["tune"] = dict(document["tune"])
        emit(result, as_json=as_json, render=lambda c: render_bench(c, result))
