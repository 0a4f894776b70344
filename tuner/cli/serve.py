"""``tuner serve``: from nothing to a tuned, verified llama-server, in one command.

Plans as ``tuner recommend`` does, builds llama.cpp if needed (CUDA only when NVML sees a GPU, or with --cuda),
downloads the planned quant, launches llama-server with the plan's flags, waits until it has loaded and answered one
real request, checks its memory against the estimate, prints the endpoint and client settings, and keeps it running
(watching for memory trouble) until Ctrl-C or SIGTERM, which stop it cleanly.

Examples:

    tuner serve                                        # Qwen3.5-35B-A3B, the best quant for this machine
    tuner serve qwen3.5-35b-a3b:UD-Q4_K_XL --ctx-size 131072
    tuner serve ./Qwen3.5-35B-A3B-Q4_K_M.gguf --port 8081 --preset coding
    tuner serve unsloth/Qwen3.6-35B-A3B-GGUF --vision --prefer quality
    tuner serve model.gguf --host 0.0.0.0 --api-key "$KEY"  # reachable from other machines: a key is required
    tuner serve model.gguf --gpu none --json              # CPU only; JSON lines (status, memory_check, ready …)
    tuner serve qwen3.5-122b-a10b --rpc 192.168.1.20:50052,192.168.1.21:50052   # with RPC workers (tuner worker)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn
from rich.table import Table

from tuner.cli import _options as o
from tuner.cli import stop_signals
from tuner.cli._options import server_option
from tuner.cli._output import console, emit_json_line, err_console, render_health, text
from tuner.cli.build import BuildProgress
from tuner.cli.profile import calibration_for, recommend_hook
from tuner.cli.recommend import wishes_from_options
from tuner.errors import TunerError
from tuner.hardware import HostSpec, hardware_for
from tuner.rpc import cluster_hardware
from tuner.serve import Event, ServeOptions, preflight, run_serve
from tuner.units import fmt_bytes
from tuner.untrusted import visible

# llama-server's own flags, passed on to it: spelled by tuner.flags.FLAGS
HostOpt = Annotated[str, server_option("host", help="Address to listen on; not loopback needs --api-key.")]
PortOpt = Annotated[int, server_option("port", min=1, max=65535, help="Port to listen on.")]
ApiKeyOpt = Annotated[str | None, server_option("api_key", envvar="TUNER_API_KEY", show_default=False,
                                                help="Key clients must send (Authorization: Bearer …).")]
PresetOpt = Annotated[str | None, typer.Option("--preset", show_default=False,
                                               help="The model card's sampling preset (default: the card's own).")]
AliasOpt = Annotated[str | None, server_option("alias", show_default=False,
                                               help="Model name clients see (default: the card, or the file name).")]
LogFileOpt = Annotated[Path | None, typer.Option("--log-file", show_default=False, callback=o.output_file,
                                                 help="llama-server's log (default: logs/ in the tuner cache).")]
JsonLinesOpt = Annotated[bool, typer.Option("--json", help="JSON lines (status, plan, memory_check, ready, "
                                                           "warnings) instead of text.")]


class FetchProgress:
    """Download bars on stderr; not a terminal: one line per file once it is complete, so logs stay readable."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), console=out, transient=True)
        self._tasks: dict[str, TaskID] = {}
        self._done: set[str] = set()
        self._started = False

    def __call__(self, file_name: str, done: int, total: int | None) -> None:
        if not self.out.is_terminal:
            if total is not None and done >= total and file_name not in self._done:
                self._done.add(file_name)
                self.out.print(f"tuner serve: {visible(file_name)} ({fmt_bytes(total)}) is in the Hugging Face cache",
                               highlight=False, soft_wrap=True, markup=False)
            return
        if not self._started:
            self._progress.start()
            self._started = True
        task = self._tasks.get(file_name)
        if task is None:
            task = self._tasks[file_name] = self._progress.add_task(text(file_name), total=total)
        self._progress.update(task, completed=done, total=total)

    def close(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False


class EventPrinter:
    """Turns :mod:`tuner.serve` events into lines for a person (or JSON lines with ``--json``)."""

    def __init__(self, as_json: bool, build_progress: BuildProgress, fetch_progress: FetchProgress) -> None:
        self.as_json = as_json
        self.build_progress = build_progress
        self.fetch_progress = fetch_progress
        self._stage = ""
        self._status = err_console.status("") if err_console.is_terminal and not as_json else None
        self._status_on = False

    def _spin(self, text: str) -> None:
        if self._status is None:
            if not self.as_json:
                err_console.print(f"[dim]{text}[/dim]", highlight=False)
            return
        self._status.update(text)
        if not self._status_on:
            self._status.start()
            self._status_on = True

    def _unspin(self) -> None:
        if self._status is not None and self._status_on:
            self._status.stop()
            self._status_on = False

    def close(self) -> None:
        self._unspin()
        self.build_progress.close()
        self.fetch_progress.close()

    def __call__(self, event: Event) -> None:
        if self.as_json:
            emit_json_line(event)
            return
        if "warning" in event:
            self._unspin()
            err_console.print(f"[yellow]warning:[/yellow] {text(event['warning'])}", highlight=False)
            return
        if "plan" in event:
            console.print(visible(plan_line(event["plan"])), highlight=False, soft_wrap=True, markup=False)
            return
        if "health" in event:  # its warnings come again as warning events: the notes here
            render_health(err_console, [f for f in event["health"] if f["severity"] != "warning"])
            return
        if "memory_check" in event:
            self._unspin()
            console.print(memory_check_table(event["memory_check"]))
            return
        status = event.get("status")
        if status == "building":
            self._unspin()  # the build has its own progress bar
        elif status == "built":
            self.build_progress.close()
            console.print(f"llama-server: {text(event['server_bin'])} ({'cached' if event['cached'] else 'built'}, "
                          f"{'CUDA' if event['cuda'] else 'CPU'})", highlight=False, soft_wrap=True)
        elif status == "fetching":
            self._unspin()
        elif status == "chat_template":
            self._unspin()
            console.print(text(event["message"]), highlight=False, soft_wrap=True)
        elif status == "launching":
            self.fetch_progress.close()
            self._spin("starting llama-server")
        elif status == "loading":
            self._spin(f"loading: {event.get('stage', '')}")
        elif status == "verifying":
            self._spin(f"healthy after {event.get('seconds_to_health', 0):.1f} s; sending a test completion")
        elif status == "ready":
            self._unspin()
            render_ready(console, event)
        elif status == "server_exited":
            self._unspin()
            err_console.print(f"llama-server stopped ({event['reason']}); the end of its log ({text(event['log'])}):",
                              highlight=False)
            for line in event.get("log_tail", []):
                err_console.print(f"  {visible(line)}", highlight=False, markup=False)
        elif status == "stopping":
            self._spin("stopping llama-server")
        elif status == "stopped":
            self._unspin()
            console.print(f"llama-server stopped ({event['reason']}).", highlight=False)


def plan_line(plan: dict[str, Any]) -> str:
    placement = ("all layers on the CPU" if plan["n_gpu_layers"] == 0 else
                 f"experts of {plan['n_cpu_moe']} layers on the CPU" if plan["n_cpu_moe"] else "all on the GPU")
    return (f"Plan: {plan['model']} {plan['quant']}, context {plan['ctx_per_slot']} × {plan['parallel']} slot(s), "
            f"KV {plan['cache_type_k']}/{plan['cache_type_v']}, flash-attn {plan['flash_attn']}, {placement}, "
            f"ubatch {plan['ubatch_size']}")


def memory_check_table(check: dict[str, Any]) -> Table:
    table = Table(title="Memory: estimate vs llama-server's load log", title_justify="left")
    for col in ("kind", "device", "estimate", "llama-server", "diff", ""):
        table.add_column(col, justify="left" if col in ("kind", "device", "") else "right")
    for kind in ("weights", "kv", "recurrent", "compute"):
        row = check.get(kind)
        if row is None:
            continue
        reported = row["reported_bytes"]
        ok = {True: "[green]ok[/green]", False: "[red]off[/red]", None: "[yellow]?[/yellow]"}[row["within"]]
        diff = "-" if row["diff_ratio"] is None else f"{row['diff_ratio'] * 100:.2f}%"
        devices = list(row["devices"])
        table.add_row(kind, devices[0] if len(devices) == 1 else "all", fmt_bytes(row["predicted_bytes"]),
                      "-" if reported is None else fmt_bytes(reported), diff,
                      f"{ok} (±{row['tolerance_ratio'] * 100:.0f}%)")
        if len(row["devices"]) > 1:
            for dev, d in row["devices"].items():
                table.add_row("", dev, fmt_bytes(d["predicted_bytes"]), fmt_bytes(d["reported_bytes"]), "", "",
                              style="dim")
    nvml = check.get("nvml")
    if nvml:
        process = nvml.get("process_bytes")
        table.caption = (f"NVML: the process holds {fmt_bytes(process) if process else 'n/a (container?)'}; "
                         f"free GPU memory dropped by {fmt_bytes(nvml.get('free_drop_bytes', 0))} since launch")
    return table


def render_ready(out: Console, event: dict[str, Any]) -> None:
    client = event["client"]
    out.print(f"[bold green]Ready[/bold green] in {event['seconds_to_ready']:.1f} s: {text(event['endpoint'])}  "
              f"model [bold]{text(event['model'])}[/bold]  (llama-server pid {event['pid']})", highlight=False,
              soft_wrap=True)
    out.print(f"log: {visible(event['log'])}", highlight=False, soft_wrap=True, markup=False)
    oa = client["openai"]
    out.print("\n[bold]OpenAI-compatible clients[/bold]")
    out.print(visible(f"  base_url = {oa['base_url']}\n  api_key  = {oa['api_key']}\n  model    = {oa['model']}"),
              highlight=False, soft_wrap=True, markup=False)
    out.print(visible("  " + " ".join(f"{k}={v}" for k, v in client["env"].items())), highlight=False,
              soft_wrap=True, markup=False)
    out.print("\n[bold]claude-code-router[/bold] (~/.claude-code-router/config.json)")
    out.print(json.dumps(client["claude_code_router"], indent=2), highlight=False, markup=False, soft_wrap=True)
    out.print("\nServing; Ctrl-C stops it.")


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        model: o.OptionalModelArg = None,
        ctx_size: o.PlanCtxOpt = None,
        parallel: o.PlanParallelOpt = 1,
        prefer: o.PreferOpt = o.DEFAULT_PREFER,
        vision: o.VisionOpt = False,
        mmproj_offload: o.MmprojOffloadOpt = True,
        buffer: o.BufferOpt = None,
        quant: o.QuantOpt = None,
        cache_type: o.CacheTypeOpt = None,
        allow_yarn: o.AllowYarnOpt = False,
        gpu: o.GpuOpt = None,
        vram: o.VramOpt = None,
        ram: o.RamOpt = None,
        ram_bandwidth: o.RamBandwidthOpt = None,
        cpu_cores: o.CpuCoresOpt = None,
        rpc: o.PlanRpcOpt = None,
        rpc_gpu: o.RpcGpuOpt = None,
        link_gbit: o.LinkGbitOpt = None,
        link_rtt_ms: o.LinkRttOpt = None,
        host: HostOpt = "127.0.0.1",
        port: PortOpt = 8080,
        api_key: ApiKeyOpt = None,
        source: o.SourceOpt = "pypi",
        cuda: o.CudaOpt = None,
        server_bin: o.ServerBinOpt = None,
        preset: PresetOpt = None,
        alias: AliasOpt = None,
        log_file: LogFileOpt = None,
        as_json: JsonLinesOpt = False,
    ) -> None:
        """Plan, build, download and launch llama-server for MODEL; verify it; serve until Ctrl-C."""
        wishes = wishes_from_options(ctx_size=ctx_size, parallel=parallel, prefer=prefer, vision=vision,
                                     buffer=buffer, quant=quant, cache_type=cache_type, allow_yarn=allow_yarn,
                                     mmproj_offload=mmproj_offload)
        options = ServeOptions(host=host, port=port, api_key=api_key, source=source, server_bin=server_bin,
                               cuda=cuda, preset=preset, alias=alias, log_path=log_file)
        preflight(options)  # before probing hardware or reading the model: cheap refusals first
        if rpc_gpu and not rpc:
            raise TunerError("--rpc-gpu alone plans workers that are not running; tuner serve needs --rpc HOST:PORT "
                             "of running ones (tuner worker)")
        build_progress = BuildProgress(err_console)
        fetch_progress = FetchProgress(err_console)
        printer = EventPrinter(as_json, build_progress, fetch_progress)
        try:
            with stop_signals():
                described = HostSpec.from_options(ram, ram_bandwidth, cpu_cores)
                hardware = cluster_hardware(hardware_for(gpu, vram, host=described), rpc=rpc, rpc_gpu=rpc_gpu,
                                            link_gbit=link_gbit, link_rtt_ms=link_rtt_ms, source=source, cuda=cuda,
                                            server_bin=server_bin, on_build_progress=build_progress)
                run_serve(model, hardware, wishes, options, on_event=printer, on_build_progress=build_progress,
                          on_fetch_progress=fetch_progress, measured=recommend_hook(hardware, server_bin),
                          calibration=calibration_for(hardware, server_bin))
        finally:
            printer.close()
