"""The machine to plan for (:class:`Hardware`): this one (GPUs through NVML, the host live), or catalog cards / a
``--vram`` size (:func:`hardware_for`, what ``--gpu`` and ``--vram`` mean), on a host described by ``--ram``,
``--ram-bandwidth`` and ``--cpu-cores`` (:class:`HostSpec`), and the devices of RPC workers in front of them
(:func:`with_remote_devices`, what ``--rpc`` and ``--rpc-gpu`` add).

**Which host.** Planning for this machine's GPUs (or ``--gpu none``, or ``--vram`` alone), the host is this one, with
whatever ``--ram`` / ``--ram-bandwidth`` / ``--cpu-cores`` change. Planning for a catalog card, the host is a what-if
too: what those options say, and for what they leave out :func:`assumed_host` — a desktop built around that card
(64 GiB of RAM, or twice the cards' VRAM rounded up to a power of two when that is more; 8 cores; the conservative
RAM bandwidth of :func:`~tuner.hardware.host.default_ram_bandwidth_bytes_s`), named in a note. This machine's RAM
would be wrong there: a card one does not have is rarely meant for the box one plans on (a 24 GiB laptop planning an
RTX 4090 got Q2_K of the 122B model at 5,376 tokens, silently). 64 GiB is what MoE offloading builds use (two 32 GB
DDR5 modules) and the smallest common size that holds a 35B-A3B Q4_K_M's experts beside a 64K-token prompt cache.

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
from tuner.hardware.host import HostInfo, cpu_busy_logical, default_ram_bandwidth_bytes_s, read_host_noted
from tuner.hardware.nvml import NvmlApi, read_gpus_noted
from tuner.units import GiB, fmt_bytes, parse_size_bytes

ASSUMED_RAM_MIN_BYTES = 64 * GiB
"""The smallest RAM :func:`assumed_host` pairs with a catalog card (see the module doc)."""
ASSUMED_PHYSICAL_CORES = 8
"""Cores of the assumed desktop (Ryzen 7 / Core i7 class); twice as many threads."""
OS_RESERVED_BYTES = 4 * GiB
"""What a described host's OS and desktop session keep of its RAM: ``--ram 64G`` plans with 60 GiB available."""


@dataclass(frozen=True)
class HostSpec:
    """A host as ``--ram``, ``--ram-bandwidth`` and ``--cpu-cores`` describe it; None = not given."""

    ram_bytes: int | None = None  # installed RAM
    ram_bandwidth_bytes_s: int | None = None
    cpu_cores: int | None = None  # physical

    def __post_init__(self) -> None:
        if self.ram_bytes is not None and self.ram_bytes <= OS_RESERVED_BYTES:
            raise TunerError(f"--ram must be more than the {fmt_bytes(OS_RESERVED_BYTES)} an OS keeps for itself")
        if self.ram_bandwidth_bytes_s is not None and self.ram_bandwidth_bytes_s <= 0:
            raise TunerError("--ram-bandwidth must be more than 0")
        if self.cpu_cores is not None and self.cpu_cores < 1:
            raise TunerError("--cpu-cores must be 1 or more")

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.ram_bytes, self.ram_bandwidth_bytes_s, self.cpu_cores))

    @classmethod
    def from_options(cls, ram: str | None = None, ram_bandwidth_gb_s: float | None = None,
                     cpu_cores: int | None = None) -> HostSpec:
        """From the option values: ``--ram 64G`` (a bare number is GiB), ``--ram-bandwidth`` in GB/s."""
        return cls(parse_size_bytes(ram, default_unit="g") if ram is not None else None,
                   round(ram_bandwidth_gb_s * GB) if ram_bandwidth_gb_s is not None else None, cpu_cores)


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
    cpu_busy_logical: float = 0.0
    """Logical CPUs other work keeps busy on this machine (:func:`~tuner.hardware.host.cpu_busy_logical`); 0 for a
    host that is described or assumed."""
    host_source: str = "detected"
    """Where RAM, cores and bandwidth come from: ``detected`` (this machine), ``given`` (--ram, --ram-bandwidth,
    --cpu-cores over this machine or over the assumed host), ``assumed`` (:func:`assumed_host`, for a catalog card)."""
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


def _with_host(gpus: tuple[Gpu, ...], notes: tuple[str, ...], *, busy: bool = True) -> Hardware:
    host, host_notes = read_host_noted()
    return Hardware(
        cpu_busy_logical=cpu_busy_logical() if busy else 0.0,
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


def assumed_host(gpus: Sequence[Gpu]) -> HostInfo:
    """The host a catalog card is planned on when ``--ram`` is not given (see the module doc): the larger of
    :data:`ASSUMED_RAM_MIN_BYTES` and twice the cards' VRAM rounded up to a power of two, :data:`OS_RESERVED_BYTES`
    of it kept by the OS; :data:`ASSUMED_PHYSICAL_CORES` cores (four times as many past 128 GiB: a server)."""
    vram = sum(g.vram_total_bytes for g in gpus)
    ram = ASSUMED_RAM_MIN_BYTES
    while ram < 2 * vram:
        ram *= 2
    cores = ASSUMED_PHYSICAL_CORES * (4 if ram > 128 * GiB else 1)
    kind = "server" if ram > 128 * GiB else "desktop"
    return HostInfo(ram, ram - OS_RESERVED_BYTES, cores, 2 * cores, f"assumed {kind} CPU")


def with_host(hardware: Hardware, spec: HostSpec, *, assume: bool) -> Hardware:
    """``hardware`` on the host ``spec`` describes: over :func:`assumed_host` when ``assume`` (a catalog card),
    else over this machine's; what ``spec`` leaves out stays. One note says which host the plan is for."""
    if not assume and not spec.given:
        return hardware
    base = hardware
    if assume:
        host = assumed_host(hardware.gpus)
        base = replace(hardware, ram_total_bytes=host.ram_total_bytes, ram_available_bytes=host.ram_available_bytes,
                       cpu_physical_cores=host.cpu_physical_cores, cpu_logical_cores=host.cpu_logical_cores,
                       cpu_model=host.cpu_model,
                       ram_bandwidth_bytes_s=default_ram_bandwidth_bytes_s(host.cpu_physical_cores))
    out = base
    if spec.ram_bytes is not None:
        out = replace(out, ram_total_bytes=spec.ram_bytes, ram_available_bytes=spec.ram_bytes - OS_RESERVED_BYTES)
    if spec.cpu_cores is not None:
        out = replace(out, cpu_physical_cores=spec.cpu_cores, cpu_busy_logical=0.0,
                      cpu_logical_cores=max(spec.cpu_cores, 2 * spec.cpu_cores if assume else out.cpu_logical_cores))
        if spec.ram_bandwidth_bytes_s is None:  # the default follows the core count
            out = replace(out, ram_bandwidth_bytes_s=default_ram_bandwidth_bytes_s(spec.cpu_cores))
    if spec.ram_bandwidth_bytes_s is not None:
        out = replace(out, ram_bandwidth_bytes_s=spec.ram_bandwidth_bytes_s)

    parts = ((f"{fmt_bytes(out.ram_total_bytes)} of RAM ({fmt_bytes(out.ram_available_bytes)} available)",
              spec.ram_bytes is not None), (f"{out.cpu_physical_cores} cores", spec.cpu_cores is not None),
             (f"{out.ram_bandwidth_bytes_s / GB:g} GB/s of RAM bandwidth", spec.ram_bandwidth_bytes_s is not None))
    if assume and not spec.given:
        kind = out.cpu_model.removeprefix("assumed ").removesuffix(" CPU")
        note = (f"host assumed: {', '.join(p for p, _ in parts)}: a {kind} built for this GPU, not this machine "
                f"({fmt_bytes(hardware.ram_total_bytes)} of RAM); --ram, --ram-bandwidth and --cpu-cores describe "
                "yours")
        source = "assumed"
    else:
        tag = {True: " (given)", False: " (assumed)" if assume else ""}
        note = (f"host: {'' if assume else 'this machine with '}"
                + ", ".join(p + tag[g] for p, g in parts if assume or g))
        if not assume and spec.ram_bytes is not None and spec.ram_bytes > hardware.ram_total_bytes:
            note += f"; more than its {fmt_bytes(hardware.ram_total_bytes)}: a plan for it may not launch here"
        source = "given"
    return replace(out, notes=(*out.notes, note), host_source=source)


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


def hardware_for(gpu: str | None, vram: str | None = None, nvml: NvmlApi | None = None,
                 host: HostSpec | None = None) -> Hardware:
    """The hardware to plan for, from ``--gpu``, ``--vram`` and the host options.

    ``gpu``: ``None`` → this machine (NVML); ``"none"`` → CPU only; a catalog card, optionally ``xN`` of it
    (``rtx-3090x2``) → that card, on the host ``host`` describes over :func:`assumed_host` (see the module doc).
    ``vram`` (``24G``; a bare number is GiB) replaces GPU 0's memory, or makes up a generic GPU when there is none.
    """
    spec = host or HostSpec()
    catalog = False
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
        hardware = _with_host(gpus, (f"GPU from the catalog ({what}), not detected: all its memory counted free",),
                              busy=False)
        catalog = True
    if vram is not None:
        hardware = override_vram(hardware, parse_size_bytes(vram, default_unit="g"))
    return with_host(hardware, spec, assume=catalog)
