"""The machine to plan for (:class:`Hardware`): this one (GPUs through NVML, the host live), or catalog cards / a
``--vram`` size with this machine's CPU and RAM (:func:`hardware_for`, what ``--gpu`` and ``--vram`` mean), and the
devices of RPC workers in front of them (:func:`with_remote_devices`, what ``--rpc`` and ``--rpc-gpu`` add).

Everything here returns data; nothing prints or exits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from tuner.errors import TunerError
from tuner.hardware.catalog import GENERIC_GPU_BANDWIDTH_BYTES_S, parse_gpu_spec
from tuner.hardware.cluster import DEFAULT_LINK, NetworkLink
from tuner.hardware.gpu import GB, Gpu
from tuner.hardware.host import default_ram_bandwidth_bytes_s, read_host_noted
from tuner.hardware.nvml import NvmlApi, read_gpus_noted
from tuner.units import fmt_bytes, parse_size_bytes


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[Gpu, ...]
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_physical_cores: int
    cpu_logical_cores: int
    cpu_model: str
    ram_bandwidth_bytes_s: int
    """:func:`~tuner.hardware.host.default_ram_bandwidth_bytes_s` unless a caller measured it
    (:func:`~tuner.hardware.host.measure_ram_bandwidth_bytes_s`)."""
    notes: tuple[str, ...] = ()
    """One line each, for the user: what could not be read, what was assumed instead."""
    link: NetworkLink | None = None
    """The network to the RPC workers whose devices are in :attr:`gpus` (None: no workers, or
    :data:`~tuner.hardware.cluster.DEFAULT_LINK` assumed)."""

    @property
    def cpu_only(self) -> bool:
        return not self.gpus

    @property
    def local_gpus(self) -> tuple[Gpu, ...]:
        """The GPUs of this machine (not behind RPC)."""
        return tuple(g for g in self.gpus if not g.is_remote)

    @property
    def remote_gpus(self) -> tuple[Gpu, ...]:
        """The devices of RPC workers, in llama.cpp's order (they come first in :attr:`gpus`)."""
        return tuple(g for g in self.gpus if g.is_remote)

    @property
    def network(self) -> NetworkLink:
        """The link to the workers: :attr:`link`, or the default one."""
        return self.link or DEFAULT_LINK


def detect_hardware(nvml: NvmlApi | None = None) -> Hardware:
    """This machine: GPUs through NVML (or none, with a note), the host live, RAM bandwidth by default."""
    gpus, gpu_notes = read_gpus_noted(nvml)
    return _with_host(gpus, gpu_notes + _cuda_numbering_notes(gpus, os.environ))


def _with_host(gpus: tuple[Gpu, ...], notes: tuple[str, ...]) -> Hardware:
    host, host_notes = read_host_noted()
    return Hardware(
        gpus=gpus,
        ram_total_bytes=host.ram_total_bytes,
        ram_available_bytes=host.ram_available_bytes,
        cpu_physical_cores=host.cpu_physical_cores,
        cpu_logical_cores=host.cpu_logical_cores,
        cpu_model=host.cpu_model,
        ram_bandwidth_bytes_s=default_ram_bandwidth_bytes_s(host.cpu_physical_cores),
        notes=notes + host_notes,
    )


def _cuda_numbering_notes(gpus: Sequence[Gpu], environ: Mapping[str, str]) -> tuple[str, ...]:
    notes = []
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if gpus and visible is not None:
        notes.append(
            f"CUDA_VISIBLE_DEVICES={visible!r} is set: llama.cpp numbers only the visible GPUs, "
            "so CUDAn may not be NVML GPU n"
        )
    if len({gpu.name for gpu in gpus}) > 1 and environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        notes.append(
            "the GPUs differ and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA numbers the fastest first, "
            "so CUDAn may not be NVML GPU n"
        )
    return tuple(notes)


def override_vram(hardware: Hardware, vram_bytes: int) -> Hardware:
    """GPU 0 with ``vram_bytes`` total and free (nothing else on it); a generic GPU if there is none."""
    if vram_bytes <= 0:
        raise TunerError("--vram must be more than 0")
    size = fmt_bytes(vram_bytes)
    if not hardware.gpus:
        gb_s = GENERIC_GPU_BANDWIDTH_BYTES_S / GB
        gpu = Gpu(
            index=0,
            name="generic GPU",
            vram_total_bytes=vram_bytes,
            vram_free_bytes=vram_bytes,
            vram_used_bytes=0,
            mem_bandwidth_bytes_s=GENERIC_GPU_BANDWIDTH_BYTES_S,
            pcie_gen=None,
            pcie_width=None,
            compute_capability=None,
            source="manual",
        )
        note = f"no GPU known: planning for a generic GPU with {size} (--vram), assuming {gb_s:g} GB/s"
        return replace(hardware, gpus=(gpu,), notes=(*hardware.notes, note))
    first = hardware.gpus[0]
    note = f"{first.llama_name} ({first.name}) planned with {size} (--vram)"
    if first.source == "nvml" and vram_bytes > first.vram_free_bytes:
        note += f", more than the {fmt_bytes(first.vram_free_bytes)} free now"
    first = replace(first, vram_total_bytes=vram_bytes, vram_free_bytes=vram_bytes, vram_used_bytes=0)
    return replace(hardware, gpus=(first, *hardware.gpus[1:]), notes=(*hardware.notes, note))


def with_remote_devices(hardware: Hardware, devices: Sequence[Gpu], link: NetworkLink | None = None,
                        notes: Sequence[str] = ()) -> Hardware:
    """``hardware`` with the devices of RPC workers (each with its ``endpoint``) in front of its own GPUs, as
    llama.cpp orders them (src/llama.cpp:275-285), and the link to those workers (None: the default one, noted)."""
    if not devices:
        return hardware
    if any(not d.is_remote for d in devices):
        raise TunerError("internal: a remote device without an endpoint")
    taken = {g.llama_name for g in hardware.remote_gpus}
    if any(d.llama_name in taken for d in devices):
        raise TunerError("the same RPC worker is named twice (--rpc and --rpc-gpu?)")
    said = list(notes)
    if link is None and hardware.link is None:
        said.append(f"network to the RPC workers assumed: {DEFAULT_LINK.describe()} (--link-gbit, --link-rtt-ms)")
    return replace(hardware, gpus=(*hardware.remote_gpus, *devices, *hardware.local_gpus),
                   link=link or hardware.link, notes=(*hardware.notes, *said))


def gpu_split(hardware: Hardware) -> list[float] | None:
    """How llama.cpp splits layers across GPUs: in proportion to their free memory (None for one GPU)."""
    if len(hardware.gpus) < 2:
        return None
    return [float(g.vram_free_bytes) for g in hardware.gpus]


def hardware_for(gpu: str | None, vram: str | None = None, nvml: NvmlApi | None = None) -> Hardware:
    """The hardware to plan for, from ``--gpu`` and ``--vram``.

    ``gpu``: ``None`` → this machine (NVML); ``"none"`` → CPU only; a catalog card, optionally ``xN`` of it
    (``rtx-3090x2``) → that card, with this machine's CPU and RAM. ``vram`` (``24G``; a bare number is GiB)
    replaces GPU 0's memory, or makes up a generic GPU when there is none.
    """
    if gpu is None:
        hardware = detect_hardware(nvml)
    elif gpu.strip().lower() in {"none", "cpu"}:
        if vram is not None:
            raise TunerError("--gpu none plans for no GPU, so --vram has nothing to apply to")
        hardware = _with_host((), ("no GPU: --gpu none",))
    else:
        entry, count = parse_gpu_spec(gpu)
        gpus = tuple(entry.to_gpu(index) for index in range(count))
        what = entry.name if count == 1 else f"{count} × {entry.name}"
        hardware = _with_host(gpus, (f"GPU from the catalog ({what}), not detected: all its memory counted free",))
    if vram is not None:
        hardware = override_vram(hardware, parse_size_bytes(vram, default_unit="g"))
    return hardware
