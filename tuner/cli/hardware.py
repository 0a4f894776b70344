"""``tuner hardware``: what tuner sees on this machine (NVML GPUs, RAM, CPU), or a catalog card.

Examples:

    tuner hardware
    tuner hardware --gpu rtx-5080 --json
    tuner hardware --record-snapshot my-gpu.json     # record NVML's answers, for tests and bug reports
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tuner.cli import _options as o
from tuner.cli._output import emit, text
from tuner.hardware import Hardware, hardware_for, record_snapshot
from tuner.units import fmt_bytes


def hardware_dict(hardware: Hardware) -> dict[str, Any]:
    """Plain data for ``--json`` (and the ``hardware`` part of ``tuner estimate --json``); GPUs by llama.cpp's names."""
    return {
        "gpus": [{"name": g.llama_name, "model": g.name, "vram_total_bytes": g.vram_total_bytes,
                  "vram_free_bytes": g.vram_free_bytes, "vram_used_bytes": g.vram_used_bytes,
                  "mem_bandwidth_bytes_s": g.mem_bandwidth_bytes_s,
                  "pcie_gen": g.pcie_gen, "pcie_width": g.pcie_width,
                  "compute_capability": ".".join(map(str, g.compute_capability)) if g.compute_capability else None,
                  "driver_version": g.driver_version, "source": g.source, "endpoint": g.endpoint}
                 for g in hardware.gpus],
        "ram_total_bytes": hardware.ram_total_bytes,
        "ram_available_bytes": hardware.ram_available_bytes,
        "ram_bandwidth_bytes_s": hardware.ram_bandwidth_bytes_s,
        "cpu_model": hardware.cpu_model,
        "cpu_physical_cores": hardware.cpu_physical_cores,
        "cpu_logical_cores": hardware.cpu_logical_cores,
        "host_source": hardware.host_source,
        "notes": list(hardware.notes),
        **({"network": hardware.network.to_dict()} if hardware.remote_gpus else {}),
    }


def network_line(net: dict[str, Any]) -> str:
    """The network term of a prediction (``Prediction.to_dict()["network"]``) in one line."""
    tg, link = net["tg_per_token"], net["link"]
    return (f"network (RPC): {net['tg_ms_per_token']:.2f} ms per generated token ({tg['round_trips']:.1f} round trips "
            f"× {link['rtt_ms']:g} ms, {(tg['bytes_up'] + tg['bytes_down']) / 1e3:,.0f} kB over {link['gbit_s']:g} "
            f"Gbit/s at {net['n_kv_tg']} KV cells), {net['pp_ms_per_token']:.3f} ms per prompt token "
            f"({(net['pp_per_ubatch']['bytes_up'] + net['pp_per_ubatch']['bytes_down']) / 1e6:,.1f} MB per ubatch of "
            f"{net['n_ubatch']}); included in the speeds")


def render_hardware(console: Console, result: dict[str, Any]) -> None:
    table = Table(title="GPUs", title_justify="left")
    for col in ("device", "model", "VRAM free / total", "bandwidth", "PCIe", "CC", "source"):
        table.add_column(col)
    for g in result["gpus"]:
        table.add_row(text(g["name"]), text(g["model"]),
                      f"{fmt_bytes(g['vram_free_bytes'])} / {fmt_bytes(g['vram_total_bytes'])}",
                      f"{g['mem_bandwidth_bytes_s'] / 1e9:.0f} GB/s",
                      f"gen{g['pcie_gen']} x{g['pcie_width']}" if g["pcie_gen"] else "-",
                      g["compute_capability"] or "-", g["source"])
    if result["gpus"]:
        console.print(table)
    else:
        console.print("GPUs: none (planning for CPU and RAM only)")
    console.print(f"CPU: {result['cpu_model']} ({result['cpu_physical_cores']} cores, "
                  f"{result['cpu_logical_cores']} threads)")
    console.print(f"RAM: {fmt_bytes(result['ram_available_bytes'])} available of {fmt_bytes(result['ram_total_bytes'])}"
                  f", assumed {result['ram_bandwidth_bytes_s'] / 1e9:.0f} GB/s")
    if "network" in result:
        link = result["network"]
        console.print(f"network to the RPC workers: {link['gbit_s']:g} Gbit/s, {link['rtt_ms']:g} ms round trip")
    for note in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {text(note)}")


def register(app: typer.Typer) -> None:
    @app.command("hardware")
    def hardware_cmd(
        gpu: o.GpuOpt = None,
        vram: o.VramOpt = None,
        rpc: o.PlanRpcOpt = None,
        rpc_gpu: o.RpcGpuOpt = None,
        link_gbit: o.LinkGbitOpt = None,
        link_rtt_ms: o.LinkRttOpt = None,
        server_bin: o.ServerBinOpt = None,
        record: Annotated[Path | None, typer.Option(
            "--record-snapshot", help="Write NVML's answers for this machine to a JSON file.")] = None,
        as_json: o.JsonOpt = False,
    ) -> None:
        """Show the GPUs, RAM and CPU tuner plans for (and the devices of RPC workers, first)."""
        from tuner.rpc import cluster_hardware

        hardware = cluster_hardware(hardware_for(gpu, vram), rpc=rpc, rpc_gpu=rpc_gpu, link_gbit=link_gbit,
                                    link_rtt_ms=link_rtt_ms, server_bin=server_bin)
        result = hardware_dict(hardware)
        if record is not None:
            record.write_text(json.dumps(record_snapshot(), indent=2) + "\n", encoding="utf-8")
            result["snapshot"] = str(record)
        emit(result, as_json=as_json, render=lambda c: render_hardware(c, result))
