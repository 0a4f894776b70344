"""``tuner calibrate``: measure this machine for a model before downloading it (:mod:`tuner.calibration`).

Writes a sparse twin of the model's real shape and tensor types, launches llama-server on it over a short ladder
(contexts, f16/q8_0 KV, two ubatches, and on a GPU more experts in RAM), and records what llama.cpp reported, what
NVML saw and the speeds into the profile; ``tuner estimate`` and ``tuner recommend`` then say "calibrated on this
machine". ``--export FILE`` writes the shareable calibration file (docs/calibration.md), of this run, or without a
MODEL of what the profile holds for this machine.

Examples:

    tuner calibrate                                   # the Qwen3.5-35B-A3B quant recommend would pick, this machine
    tuner calibrate qwen3.5-35b-a3b:Q4_K_M --quick    # about a minute on a modern GPU
    tuner calibrate model.gguf --gpu none             # the CPU alone
    tuner calibrate qwen3.5-35b-a3b --quick --export rtx4090.json
    tuner calibrate --export mine.json                # what the profile holds for this machine, as a file
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from tuner.cli import _options as o
from tuner.cli._output import emit, err_console, text
from tuner.errors import TunerError
from tuner.flags import INT32_MAX
from tuner.hardware import Hardware, hardware_for
from tuner.paths import write_atomic
from tuner.units import fmt_bytes

QuickOpt = Annotated[bool, typer.Option("--quick", help="The short ladder: two contexts, one q8_0 and one big-ubatch "
                                                        "rung, one --n-cpu-moe value; small measurements.")]
ExportOpt = Annotated[Path | None, typer.Option(
    "--export", callback=o.output_file,
    help="Write the calibration as a small JSON file (no paths, no host names) to share or ship.", show_default=False)]
CalGpuOpt = Annotated[str | None, typer.Option(
    "--gpu", help="'none': calibrate the CPU alone (a CPU build of llama.cpp). Calibration measures this machine: "
                  "catalog GPUs cannot be named.", show_default=False)]
DepthsOpt = Annotated[str | None, typer.Option(
    "--depths", help="Context depths of the speed measurements (default 0,2048 with --quick, else 0,8192).",
    show_default=False)]
PromptTokensOpt = Annotated[int | None, typer.Option("--prompt-tokens", min=1, max=INT32_MAX,
                                                     help="Prompt tokens per measurement.", show_default=False)]
GenTokensOpt = Annotated[int | None, typer.Option("--gen-tokens", min=2, max=INT32_MAX,
                                                  help="Tokens generated per measurement.", show_default=False)]
IgnoreLoadOpt = Annotated[bool, typer.Option("--ignore-load", help="Record CPU speeds even when other processes keep "
                                                                   "the CPU busy.")]


class CalibrationProgress:
    """Draws :class:`tuner.calibration.Progress` on stderr: a rich bar with the estimated time left on a terminal,
    one line per step otherwise."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or err_console
        self._live = self.console.is_terminal
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("[dim]{task.fields[eta]}"),
                                  console=self.console, transient=True)
        self._task: Any = None

    def __call__(self, p: Any) -> None:
        eta = f"~{p.eta_s:.0f} s left" if p.eta_s else ""
        if not self._live:
            self.console.print(Text(f"[{p.done}/{p.total}] {p.line}" + (f" ({eta})" if eta else ""), style="dim"),
                               highlight=False)
            return
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(p.line, total=p.total, eta=eta)
        self._progress.update(self._task, completed=p.done, description=p.line, eta=eta)

    def close(self) -> None:
        if self._task is not None:
            self._progress.stop()
            self._task = None


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def render_calibration(console: Console, result: dict[str, Any]) -> None:
    run = result.get("run")
    if run:
        console.print(f"[bold]{text(run['model'])}[/bold] {text(run['quant'])} (shape {text(run['shape'])}) on "
                      f"{text(run['hardware'])}, llama.cpp {text(run['build']['commit'][:12])}"
                      f"{' CUDA' if run['build']['cuda'] else ''}: {len(run['rungs'])} launches in "
                      f"{run['seconds']:.0f} s; sparse twin {fmt_bytes(run['twin']['file_bytes'])} "
                      f"({fmt_bytes(run['twin']['disk_bytes'])} on disk, deleted)")
        table = Table(title="compute buffer, MiB: estimate → llama.cpp (uncounted: NVML − buffers)",
                      title_justify="left")
        for col in ("rung", "device", "estimate", "reported", "×", "uncounted"):
            table.add_column(col, justify="left" if col in ("rung", "device") else "right")
        speed = Table(title="speed, tok/s: measured (predicted)", title_justify="left")
        for col in ("rung", "depth", "tg", "pp"):
            speed.add_column(col, justify="left" if col == "rung" else "right")
        for r in run["rungs"]:
            if r["failed"]:
                table.add_row(r["name"], "-", "-", "-", "-", text(r["failed"]))
                continue
            for dev, rep in (r["reported"].get("compute") or {}).items():
                pred = (r["predicted"].get("compute") or {}).get(dev, 0)
                proc = (r["uncounted_bytes"] or {}).get(dev)
                table.add_row(r["name"], text(dev), _mib(pred), _mib(rep), f"{rep / pred:.3f}" if pred else "-",
                              _mib(proc))
            for s in r["speed"]:
                speed.add_row(r["name"], str(s["depth"]), f"{s['tg_tok_s']:.1f} ({s['tg_predicted_tok_s']:.1f})",
                              f"{s['pp_tok_s']:.0f} ({s['pp_predicted_tok_s']:.0f})")
        console.print(table)
        console.print(speed)
        for line in run["skipped"]:
            console.print(f"[yellow]skipped:[/yellow] {text(line)}")
        for line in run["notes"]:
            console.print(f"[yellow]note:[/yellow] {text(line)}")
    cal = result.get("calibration") or {}
    for dev, c in (cal.get("devices") or {}).items():
        console.print(f"{text(dev)}: compute ×{c['compute_scale']} ({c['scope']}, {c['compute_runs']} runs)"
                      + (f", {fmt_bytes(c['uncounted_bytes'])} uncounted" if c.get("uncounted_bytes") else ""))
    if cal.get("speed"):
        s = cal["speed"]
        console.print(f"speed scale: tg ×{s['tg_scale']}, pp ×{s['pp_scale']} ({s['scope']}, {s['runs']} points)")
    if result.get("recorded_points"):
        console.print(f"{result['recorded_points']} points recorded in the profile: tuner estimate and tuner "
                      "recommend now say \"calibrated on this machine\" (tuner profile reset clears them)")
    if result.get("exported"):
        console.print(f"calibration file: {result['exported']}", markup=False, highlight=False, soft_wrap=True)


def _export(path: Path, points: list[Any], hardware: Hardware, build: Any,
            shapes: dict[str, dict[str, Any]]) -> Path:
    import json

    from tuner.calibration_file import export_document

    doc = export_document(points, hardware=hardware, build=build, shapes=shapes,
                          created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          tuner_version=version("tuner"))
    return write_atomic(path, json.dumps(doc, indent=2) + "\n")


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate_cmd(
        model: o.OptionalModelArg = None,
        quant: o.QuantOpt = None,
        quick: QuickOpt = False,
        gpu: CalGpuOpt = None,
        depths: DepthsOpt = None,
        prompt_tokens: PromptTokensOpt = None,
        gen_tokens: GenTokensOpt = None,
        export: ExportOpt = None,
        ignore_load: IgnoreLoadOpt = False,
        server_bin: o.ServerBinOpt = None,
        as_json: o.JsonOpt = False,
    ) -> None:
        """Measure this machine for MODEL with a sparse twin of it: buffers, CUDA overhead and speed."""
        from tuner.bench import parse_depths
        from tuner.build import current_build
        from tuner.calibration import CalibrateOptions, run_calibration
        from tuner.cli.build import BuildProgress
        from tuner.corrections import Calibration, MemoryPoint, SpeedPoint
        from tuner.profile_store import ProfileStore, load_calibration

        if gpu is not None and gpu.strip().lower() not in ("none", "cpu"):
            raise TunerError(f"--gpu {gpu}: tuner calibrate measures this machine; --gpu takes only 'none' (CPU only)")
        hardware = hardware_for(gpu)
        result: dict[str, Any] = {}
        export_only = export is not None and model is None and quant is None and not quick
        if export_only:
            build = current_build(server_bin)
            cal = load_calibration(hardware, build, shipped=[])
            points = [*cal.memory, *cal.speed]
            if not points:
                raise TunerError("nothing calibrated on this machine yet: run tuner calibrate MODEL first")
            result["exported"] = str(_export(export, points, hardware, build or _NoBuild(points),
                                             {p.shape: {} for p in points}))
            result["calibration"] = cal.summary(hardware)
        else:
            options = CalibrateOptions(quick=quick, quant=quant, server_bin=server_bin,
                                       depths=parse_depths(depths) if depths else None,
                                       prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, ignore_load=ignore_load)
            build_progress = BuildProgress(err_console)
            progress = CalibrationProgress(err_console)

            def on_progress(p: Any) -> None:
                build_progress.close()
                progress(p)

            try:
                report = run_calibration(model, hardware, options, on_progress=on_progress,
                                         on_build_progress=build_progress)
            finally:
                build_progress.close()
                progress.close()
            points = report.points
            cal = Calibration(tuple(p for p in points if isinstance(p, MemoryPoint)),
                              tuple(p for p in points if isinstance(p, SpeedPoint)))
            result["run"] = report.to_dict()
            result["recorded_points"] = report.recorded
            result["profile"] = str(ProfileStore().path)
            result["calibration"] = {**cal.summary(hardware, report.shape), "shape": report.shape}
            if export is not None:
                result["exported"] = str(_export(export, points, hardware, report.build, report.shapes))
        emit(result, as_json=as_json, render=lambda c: render_calibration(c, result))
        if export is not None and as_json:
            sys.stderr.write(f"calibration exported to {result['exported']}\n")


class _NoBuild:
    """The build of points exported when no llama.cpp build is installed any more: theirs."""

    def __init__(self, points: list[Any]) -> None:
        newest = max(points, key=lambda p: p.observed_at)
        self.commit, self.cuda = newest.build, newest.cuda
