"""``tuner bench``: measure llama-server flag sets side by side on this machine, and learn from it.

Each ``--set NAME=FLAGS`` is a llama-server flag string. Without ``--set`` the planner's plan is compared with
llama-server's defaults (only the model, ``--fit on``). Every set gets its own server (all up at once when memory
allows, so the runs interleave A B, B A …), is warmed up, and at every ``--depths`` context depth measures prompt
processing of fresh tokens and the generation of ``--gen-tokens`` tokens, from the server's own timings. ``--tune``
searches around the plan instead (coordinate descent; see :mod:`tuner.bench.tune`) and reports the winner against
the plan and the defaults. The work is :func:`tuner.bench.run_benchmark`; this module parses and prints.

Results: ``bench_results/<model>/<hardware>/<timestamp>.json`` (or under ``--out``) with a PNG chart beside it
(matplotlib: ``pip install 'tuner[plot]'``); the measurements go into the profile (``tuner profile show``) that
``tuner recommend`` reads.

Examples:

    tuner bench model.gguf                                     # the plan vs llama-server's defaults
    tuner bench model.gguf --set f16='-c 32768 -np 1' --set q8='-c 32768 -np 1 -ctk q8_0 -ctv q8_0'
    tuner bench model.gguf --set a='-c 65536' --depths 0,16k,60k --repeat 5 --gen-tokens 256
    tuner bench model.gguf --set np4='-c 131072 -np 4 -kvu' --concurrency 4   # aggregate and per-request tok/s
    tuner bench model.gguf --tune --ctx-size 65536             # search around the plan at 64k of context
    tuner bench model.gguf --tune --dims ubatch,kv,threads --json
    tuner bench model.gguf --gpu none                          # the CPU alone, even on a machine with a GPU
    tuner bench model.gguf --rpc 192.168.1.20:50052            # with an RPC worker (every set gets --rpc)
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
from tuner.cli import stop_signals
from tuner.cli._output import emit, err_console, text
from tuner.errors import TunerError
from tuner.flags import INT32_MAX, MAX_SEQ
from tuner.hardware import HostSpec
from tuner.untrusted import shown, visible

SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="NAME=FLAGS: a named llama-server flag set to measure (repeatable). Default: the plan and "
                  "llama-server's defaults.", show_default=False)]
DepthsOpt = Annotated[str | None, typer.Option(
    "--depths", help="Context depths to measure at, tokens: 0,8192,32768 (k suffix allowed). --tune: the plan's "
                     "context unless given (the largest is used).", show_default=False)]
RepeatOpt = Annotated[int, typer.Option("--repeat", min=1, max=1000,
                                        help="Runs per set and depth (--tune: the most per round).")]
PromptTokensOpt = Annotated[int, typer.Option("--prompt-tokens", min=1, max=INT32_MAX,
                                              help="Fresh prompt tokens per measurement.")]
GenTokensOpt = Annotated[int, typer.Option("--gen-tokens", min=2, max=INT32_MAX,
                                           help="Tokens generated per measurement.")]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", min=1, max=MAX_SEQ,
                                             help="Requests sent at once (needs as many slots).")]
TuneOpt = Annotated[bool, typer.Option("--tune", help="Search around the plan for faster flags.")]
DimsOpt = Annotated[str | None, typer.Option(
    "--dims", help=f"--tune: only these dimensions ({', '.join(b.TUNE_DIMENSIONS)}).", show_default=False)]
ObjectiveOpt = Annotated[str, typer.Option("--objective", metavar=f"[{'|'.join(b.OBJECTIVES)}]",
                                           help="Rank by tg, pp, or both (geometric mean).")]
OutOpt = Annotated[Path, typer.Option("--out", callback=o.output_folder, help="Base folder of the results files.")]
KeepLogsOpt = Annotated[bool, typer.Option("--keep-logs", help="Keep llama-server logs beside the results.")]
NoProfileOpt = Annotated[bool, typer.Option("--no-profile", help="Do not record the results in the profile.")]
BenchGpuOpt = Annotated[str | None, typer.Option(
    "--gpu", help="'none': measure on the CPU only (a CPU build of llama.cpp). A catalog GPU cannot be measured "
                  "here: leave --gpu out to use the detected ones.", show_default=False)]


def _say(line: str) -> None:
    err_console.print(Text(visible(line), style="dim"), highlight=False)


def bench_config(depths: str | None, repeat: int, prompt_tokens: int, gen_tokens: int, concurrency: int,
                 default: tuple[int, ...] = b.DEFAULT_DEPTHS) -> b.BenchConfig:
    return b.BenchConfig(depths=b.parse_depths(depths) if depths else default, repeat=repeat,
                         prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, concurrency=concurrency)


def compact_results(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The results rows for ``--json``: everything but the per-sample detail (that is in the file)."""
    return [{k: v for k, v in r.items() if k != "samples"} for r in document["results"]]


def _fmt(stats: dict[str, Any]) -> str:
    return f"{stats['median']:,.1f} ({stats['min']:,.1f}–{stats['max']:,.1f})"


def _ratio_cell(r: dict[str, Any] | None) -> str:
    if not r or r["ratio"] is None:
        return "-"
    p = r["paired"]
    return f"×{r['ratio']:.2f} ({p['min']:.2f}–{p['max']:.2f}, {r['wins']}/{r['n']})"


def _draft_cell(a: dict[str, Any] | None) -> str:
    """A ``draft_acceptance`` entry as ``rate (accepted/drafted)``; ``-`` when nothing was drafted."""
    return f"{a['rate']:.1%} ({a['accepted']}/{a['drafted']})" if a and a["rate"] is not None else "-"


def render_comparison(console: Console, comp: dict[str, Any]) -> None:
    """One set against another at every depth: ratio of medians, the paired runs' min–max and wins, predicted."""
    table = Table(title=f"{comp['set']} vs {comp['reference']}: ratio of medians (paired runs min–max, "
                        f"{comp['set']} faster in k/n)", title_justify="left")
    for col in ("depth", "tg", "pp", "predicted tg / pp"):
        table.add_column(col, justify="right")
    for row in comp["by_depth"]:
        pred = row.get("predicted")
        table.add_row(str(row["depth"]), _ratio_cell(row.get("tg")), _ratio_cell(row.get("pp")),
                      f"×{pred.get('tg', 0):.2f} / ×{pred.get('pp', 0):.2f}" if pred else "-")
    console.print(table)
    worst = comp["worst"]
    console.print(f"{comp['set']} vs {comp['reference']}: "
                  + ("at least as fast at every depth" if comp["at_least"] else
                     "not slower beyond the noise at any depth" if comp["not_slower"] else
                     "[bold]slower[/bold] at some depth")
                  + "; worst " + ", ".join(f"{m} ×{w['ratio']:.2f} at {w['depth']}" for m, w in worst.items()),
                  highlight=False)


def render_bench(console: Console, result: dict[str, Any]) -> None:
    from tuner.bench.plot import bar_table, series_from_results

    table = Table(title="tok/s: median (min–max)", title_justify="left")
    for col in ("set", "depth", "pp tok/s", "tg tok/s", "n"):
        table.add_column(col, justify="left" if col == "set" else "right")
    conc = result.get("concurrency", 1) > 1
    if conc:
        table.add_column("per request pp / tg", justify="right")
    drafts = any(r.get("draft_acceptance") for r in result["results"])
    if drafts:  # MTP on and off side by side: the server's own count of drafted and accepted tokens
        table.add_column("draft accepted", justify="right")
    for r in result["results"]:
        for d in r["by_depth"]:
            row = [text(r["name"]), str(d["depth"]), _fmt(d["pp_tok_s"]), _fmt(d["tg_tok_s"]), str(d["tg_tok_s"]["n"])]
            if conc:
                row.append(f"{d['per_request_pp_tok_s']['median']:,.1f} / {d['per_request_tg_tok_s']['median']:,.1f}")
            if drafts:
                row.append(_draft_cell(d.get("draft_acceptance")))
            table.add_row(*row)
    console.print(table)
    console.print(bar_table(series_from_results(result["results"])))
    for r in result["results"]:
        console.print(f"[bold]{text(r['name'])}[/bold]: llama-server {text(shlex.join(r['flags']))}", highlight=False,
                      soft_wrap=True)
    tune = result.get("tune")
    if tune:
        trials = Table(title=f"--tune at depth {tune['depth']}: {tune['launches']} launches for a grid of "
                             f"{tune['grid_size']}", title_justify="left")
        trial_drafts = any(t.get("draft_acceptance") for t in tune["trials"])
        for col in ("round", "dimension", "configuration", "pp tok/s", "tg tok/s", "n", "note"):
            trials.add_column(col, justify="right" if col in ("round", "pp tok/s", "tg tok/s", "n") else "left")
        if trial_drafts:  # the MTP trials: the server's own count of drafted and accepted tokens
            trials.add_column("draft accepted", justify="right")
        for t in tune["trials"]:
            note = t["reason"] if not t["fits"] else (f"dropped after {t['dropped_after']}" if t["dropped_after"]
                                                      else "")
            cells = [str(t["round"]), text(t["dimension"]), text(t["name"]), f"{t['pp_tok_s']:,.1f}",
                     f"{t['tg_tok_s']:,.1f}", str(t["n_samples"]), text(note)]
            if trial_drafts:
                cells.append(_draft_cell(t.get("draft_acceptance")))
            trials.add_row(*cells)
        console.print(trials)
    verdict = result.get("verdict") or {}
    if "ratio_to_defaults" in verdict:
        for label, key in (("the plan", "ratio_to_plan"), ("llama-server's defaults", "ratio_to_defaults")):
            ratio = verdict.get(key)
            if ratio:
                console.print(f"winner [bold]{text(verdict['winner'])}[/bold] vs {label}: tg ×{ratio['tg']:.2f}, "
                              f"pp ×{ratio['pp']:.2f}")
    elif verdict:
        console.print(f"fastest at depth {verdict['ref_depth']} ({verdict['objective']}): "
                      f"[bold]{text(verdict['winner'])}[/bold]")
        for name, ratio in verdict["ratios_to_reference"].items():
            if name != verdict["reference_set"] and ratio["tg"] is not None:
                console.print(f"  {text(name)} vs {text(verdict['reference_set'])}: tg ×{ratio['tg']:.2f}, "
                              f"pp ×{ratio['pp']:.2f}")
    for comp in verdict.get("comparisons", []):
        render_comparison(console, comp)
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {text(note)}", highlight=False)
    # paths and the install hint as they are: rich would take "[plot]" (or a "[...]" in a path) for markup
    plain = {"highlight": False, "soft_wrap": True, "markup": False}
    console.print(visible(f"results: {result['saved_to']}"), **plain)
    console.print(visible(f"chart:   {result['plot'] or 'not drawn: ' + result['plot_problem']}"), **plain)
    prof = result.get("profile")
    if prof:
        console.print(f"profile: {prof['path']} ({prof['measurements']} measurements for this model, hardware and "
                      f"build)", **plain)


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
        prefer: o.PreferOpt = o.DEFAULT_PREFER,
        buffer: o.BufferOpt = None,
        quant: o.QuantOpt = None,
        cache_type: o.CacheTypeOpt = None,
        allow_yarn: o.AllowYarnOpt = False,
        gpu: BenchGpuOpt = None,
        vram: o.VramOpt = None,
        ram: o.RamOpt = None,
        ram_bandwidth: o.RamBandwidthOpt = None,
        cpu_cores: o.CpuCoresOpt = None,
        rpc: o.PlanRpcOpt = None,
        rpc_gpu: o.RpcGpuOpt = None,
        link_gbit: o.LinkGbitOpt = None,
        link_rtt_ms: o.LinkRttOpt = None,
        out: OutOpt = b.DEFAULT_OUT_DIR,
        keep_logs: KeepLogsOpt = False,
        no_profile: NoProfileOpt = False,
        as_json: o.JsonOpt = False,
    ) -> None:
        """Measure llama-server flag sets side by side (or --tune around the plan) and learn the results."""
        from tuner.cli.build import BuildProgress
        from tuner.cli.recommend import wishes_from_options

        cfg = bench_config(depths, repeat, prompt_tokens, gen_tokens, concurrency)
        dim_names = tuple(d.strip() for d in dims.split(",") if d.strip()) if dims else None
        unknown = [d for d in dim_names or () if d not in b.TUNE_DIMENSIONS]
        if unknown:  # before any build or launch
            raise TunerError(f"--dims: unknown dimension {shown(unknown[0])} (known: {', '.join(b.TUNE_DIMENSIONS)})")
        options = b.BenchOptions(
            sets=tuple(b.parse_set(spec) for spec in sets or ()), config=cfg, tune=tune,
            tune_depth=max(cfg.depths) if depths else None, dims=dim_names, objective=objective,
            server_bin=server_bin, out_dir=out, keep_logs=keep_logs, learn=not no_profile, cpu_only=gpu is not None)
        wishes = wishes_from_options(ctx_size=ctx_size, parallel=parallel, prefer=prefer, vision=False,
                                     buffer=buffer, quant=quant, cache_type=cache_type, allow_yarn=allow_yarn)
        from tuner.rpc import cluster_hardware

        if rpc_gpu and not rpc:
            raise TunerError("--rpc-gpu alone plans workers that are not running; tuner bench measures: give --rpc "
                             "HOST:PORT of running ones (tuner worker)")
        build_progress = BuildProgress(err_console)
        hardware = cluster_hardware(b.bench_hardware(gpu, vram, HostSpec.from_options(ram, ram_bandwidth, cpu_cores)),
                                    rpc=rpc, rpc_gpu=rpc_gpu, link_gbit=link_gbit,
                                    link_rtt_ms=link_rtt_ms, server_bin=server_bin, on_build_progress=build_progress)

        def say(line: str) -> None:
            build_progress.close()  # a line after the build: its progress display is done
            _say(line)

        try:
            with stop_signals():  # SIGTERM, like Ctrl-C, stops the llama-servers (and a build) before tuner exits
                report = b.run_benchmark(model, hardware, wishes, options, on_progress=say,
                                         on_build_progress=build_progress)
        finally:
            build_progress.close()
        document = report.document
        result: dict[str, Any] = {
            "results": compact_results(document), "saved_to": str(report.results_path),
            "plot": str(report.plot_path) if report.plot_path else None, "profile": report.profile,
            "verdict": document["verdict"], "kind": document["kind"], "concurrency": cfg.concurrency,
            "launches": len(document["launches"]), "mode": document.get("mode"), "notes": document["notes"],
            "llama_cpp": document["llama_cpp"],
        }
        if report.plot_problem:
            result["plot_problem"] = report.plot_problem
        if tune:
            result["tune"] = dict(document["tune"])
        emit(result, as_json=as_json, render=lambda c: render_bench(c, result))
