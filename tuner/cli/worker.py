"""``tuner worker``: offer this machine's devices to a llama-server on another machine (llama.cpp's RPC backend).

Builds llama.cpp if needed (the same cached build ``tuner serve`` uses, so the worker and the server speak the same
RPC protocol), runs ``ggml-rpc-server`` in the foreground, prints its devices and their memory, and stops it on
Ctrl-C or SIGTERM. It listens on 127.0.0.1 unless told otherwise; any other address needs ``--allow-remote``,
because llama.cpp's RPC has no authentication or encryption.

Examples:

    tuner worker                                   # 127.0.0.1:50052: this machine only (or through ssh -L)
    tuner worker --host 192.168.1.20 --allow-remote # reachable on a trusted LAN
    tuner worker --port 50053 --device CUDA1       # a second worker on one machine, offering one GPU
    tuner worker --json                            # JSON lines: listening, client connected/closed, stopped

Then, on the machine that runs llama-server: ``tuner serve MODEL --rpc 192.168.1.20:50052``.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tuner.cli import _options as o
from tuner.cli import stop_signals
from tuner.cli._output import console, emit_json_line, err_console, text
from tuner.cli.build import BuildProgress
from tuner.hardware import DEFAULT_RPC_PORT
from tuner.units import fmt_bytes

WorkerHostOpt = Annotated[str, typer.Option(
    "--host", help="IPv4 address to listen on; anything but loopback needs --allow-remote.")]
WorkerPortOpt = Annotated[int, typer.Option("--port", help="TCP port to listen on.")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="Devices to offer, as llama.cpp names them: CUDA0,CUDA1 (default: every GPU, else the CPU).",
    show_default=False)]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, show_default=False,
                                                help="CPU backend threads (default: half the hardware threads).")]
CacheOpt = Annotated[bool, typer.Option("--cache", help="Keep large tensors in a local file cache "
                                                        "(faster reloads of the same model).")]
AllowRemoteOpt = Annotated[bool, typer.Option(
    "--allow-remote", help="Allow a non-loopback --host: llama.cpp's RPC has no authentication or encryption.")]
JsonLinesOpt = Annotated[bool, typer.Option("--json", help="JSON lines (listening, clients, stopped) instead of "
                                                           "text.")]


class WorkerPrinter:
    """Worker events as lines for a person, or JSON lines."""

    def __init__(self, as_json: bool, build_progress: BuildProgress) -> None:
        self.as_json = as_json
        self.build_progress = build_progress

    def __call__(self, event: dict[str, Any]) -> None:
        if self.as_json:
            emit_json_line(event)
            return
        self.build_progress.close()
        if "warning" in event:
            err_console.print(f"[yellow]warning:[/yellow] {text(event['warning'])}", highlight=False)
        elif event.get("status") == "listening":
            render_listening(event)
        elif event.get("client") == "connected":
            console.print("[dim]a llama-server connected[/dim]", highlight=False)
        elif event.get("client") == "closed":
            console.print("[dim]the llama-server disconnected[/dim]", highlight=False)
        elif event.get("status") == "stopped":
            console.print(f"ggml-rpc-server stopped ({event['reason']}).", highlight=False)
        elif "log" in event:
            console.print(f"[dim]{text(event['log'])}[/dim]", highlight=False)


def render_listening(event: dict[str, Any]) -> None:
    console.print(f"[bold green]RPC worker listening[/bold green] on {event['endpoint']} (RPC protocol "
                  f"{event['version']}, pid {event['pid']})", highlight=False)
    for d in event["devices"]:
        console.print(f"  {text(d['name'])}: {text(d['description'])} — {fmt_bytes(d['total_bytes'])}, "
                      f"{fmt_bytes(d['free_bytes'])} free", highlight=False)
    host, _, port = event["endpoint"].rpartition(":")
    if event["loopback_only"]:
        console.print("Only this machine can reach it; from another, forward the port "
                      f"(ssh -L {port}:127.0.0.1:{port} THIS_HOST) or restart with --host ADDRESS --allow-remote.",
                      highlight=False, soft_wrap=True)
        where = f"127.0.0.1:{port}"
    else:
        err_console.print(f"[yellow]warning:[/yellow] {event['security']}", highlight=False, soft_wrap=True)
        where = f"{host if host != '0.0.0.0' else 'THIS_HOST'}:{port}"
    console.print(f"Use it from the machine that runs llama-server: tuner serve MODEL --rpc {where}",
                  highlight=False, soft_wrap=True)
    console.print("Serving; Ctrl-C stops it.", highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("worker")
    def worker_cmd(
        host: WorkerHostOpt = "127.0.0.1",
        port: WorkerPortOpt = DEFAULT_RPC_PORT,
        device: DeviceOpt = None,
        threads: ThreadsOpt = None,
        cache: CacheOpt = False,
        allow_remote: AllowRemoteOpt = False,
        source: o.SourceOpt = "pypi",
        cuda: o.CudaOpt = None,
        server_bin: o.ServerBinOpt = None,
        as_json: JsonLinesOpt = False,
    ) -> None:
        """Run llama.cpp's RPC server (ggml-rpc-server) so a llama-server elsewhere can use this machine's devices."""
        from tuner.build import obtain_build
        from tuner.errors import TunerError
        from tuner.worker import WorkerOptions, run_worker, worker_address

        devices = tuple(d.strip() for d in (device or "").replace("/", ",").split(",") if d.strip())
        options = WorkerOptions(host=host, port=port, devices=devices, threads=threads, cache=cache,
                                allow_remote=allow_remote)
        worker_address(host, port, allow_remote)  # cheap refusals before any build
        build_progress = BuildProgress(err_console)
        printer = WorkerPrinter(as_json, build_progress)
        try:
            with stop_signals():
                build, _cached = obtain_build(source, cuda, server_bin, on_progress=build_progress)
                build_progress.close()
                if build.rpc_server_bin is None:
                    raise TunerError(f"no ggml-rpc-server beside {build.server_bin}: that llama.cpp was built without "
                                     "GGML_RPC=ON", hint="use tuner's own build (leave out --server-bin)")
                run_worker(build.rpc_server_bin, options, on_event=printer)
        finally:
            build_progress.close()
