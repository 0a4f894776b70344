"""What the machine has: GPUs (through NVML), RAM, CPU cores, and the memory bandwidths speed estimates rest on.

One job per module, bottom up:

- :mod:`tuner.hardware.gpu`: :class:`Gpu`, a GPU as the planner sees it (and how it is numbered).
- :mod:`tuner.hardware.catalog`: the GPU catalog (``profiles/gpus.yaml``), names matched, ``--gpu`` parsed.
- :mod:`tuner.hardware.nvml`: NVML access (:class:`NvmlApi`): GPUs, free memory, a process's GPU memory.
- :mod:`tuner.hardware.snapshot`: NVML's answers recorded as JSON, and replayed through :class:`NvmlApi`.
- :mod:`tuner.hardware.host`: RAM (cgroup limits applied), CPU cores (affinity applied), RAM bandwidth.
- :mod:`tuner.hardware.cluster`: RPC endpoints, ``--rpc-gpu`` what-if workers, the network link to them.
- :mod:`tuner.hardware.machine`: :class:`Hardware`, this machine or what ``--gpu`` / ``--vram`` ask for, with the
  devices of RPC workers in front.

Everything here returns data; nothing prints or exits. The rest of tuner imports from ``tuner.hardware``; the
modules of this package import from each other.
"""

from tuner.hardware.catalog import (
    GENERIC_GPU_BANDWIDTH_BYTES_S,
    CatalogGpu,
    catalog_entry_for_name,
    catalog_gpu,
    find_catalog_gpu,
    load_gpu_catalog,
    parse_gpu_spec,
)
from tuner.hardware.cluster import (
    DEFAULT_LINK,
    DEFAULT_RPC_PORT,
    NetworkLink,
    parse_endpoint,
    parse_endpoints,
    parse_rpc_gpu_spec,
    rpc_endpoints,
)
from tuner.hardware.gpu import GB, Gpu
from tuner.hardware.host import HostInfo, read_host
from tuner.hardware.machine import (
    Hardware,
    HostSpec,
    assumed_host,
    detect_hardware,
    gpu_split,
    hardware_for,
    override_vram,
    with_remote_devices,
)
from tuner.hardware.nvml import NvmlApi, gpu_free_bytes, gpu_process_memory_bytes, read_gpus
from tuner.hardware.snapshot import record_snapshot

__all__ = [
    "DEFAULT_LINK",
    "DEFAULT_RPC_PORT",
    "GB",
    "GENERIC_GPU_BANDWIDTH_BYTES_S",
    "CatalogGpu",
    "Gpu",
    "Hardware",
    "HostInfo",
    "HostSpec",
    "NetworkLink",
    "NvmlApi",
    "assumed_host",
    "catalog_entry_for_name",
    "catalog_gpu",
    "detect_hardware",
    "find_catalog_gpu",
    "gpu_free_bytes",
    "gpu_process_memory_bytes",
    "gpu_split",
    "hardware_for",
    "load_gpu_catalog",
    "override_vram",
    "parse_endpoint",
    "parse_endpoints",
    "parse_gpu_spec",
    "parse_rpc_gpu_spec",
    "read_gpus",
    "read_host",
    "record_snapshot",
    "rpc_endpoints",
    "with_remote_devices",
]
