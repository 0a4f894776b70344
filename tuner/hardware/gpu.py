"""A GPU as the planner sees it (:class:`Gpu`), whether NVML detected it, the catalog named it or ``--vram`` made
it up.

GPU numbering: :attr:`Gpu.index` is NVML's index (PCI bus order). llama.cpp's ``CUDAn`` is the same GPU only when
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and ``CUDA_VISIBLE_DEVICES`` is unset; :func:`tuner.hardware.detect_hardware`
notes when that may not hold.

A device on another machine, behind llama.cpp's RPC backend (``ggml-rpc-server`` there, ``llama-server --rpc`` here),
is a :class:`Gpu` with an :attr:`Gpu.endpoint` (``10.0.0.2:50052``); its :attr:`Gpu.index` is the device's index on
that worker, and its :attr:`Gpu.llama_name` the buffer name llama.cpp logs and ``-ot`` takes, ``RPC<i>[host:port]``
(``ggml_backend_rpc_buffer_type``, ggml/src/ggml-rpc/ggml-rpc.cpp:1092, 1120).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1000**3
"""Decimal gigabyte: memory bandwidths are quoted in GB/s (10^9 bytes per second)."""


@dataclass(frozen=True)
class Gpu:
    index: int
    """NVML's index (PCI bus order); see the module docstring for how it relates to llama.cpp's numbering."""
    name: str
    """As NVML says it, e.g. ``NVIDIA GeForce RTX 4090``."""
    vram_total_bytes: int
    vram_free_bytes: int
    vram_used_bytes: int
    mem_bandwidth_bytes_s: int
    """bus_width_bits / 8 × max_mem_clock_hz × 2 (DDR) for detected cards; the catalog value for catalog cards."""
    pcie_gen: int | None
    pcie_width: int | None
    compute_capability: tuple[int, int] | None
    driver_version: str | None = None
    source: str = "nvml"
    """``nvml`` (detected), ``catalog`` (named with --gpu) or ``manual`` (made up from --vram); for a device behind
    RPC, ``rpc`` (asked of a live worker) or ``catalog`` (a card named with --rpc-gpu)."""
    endpoint: str | None = None
    """``host:port`` of the RPC worker that holds the device; None for a device of this machine."""

    @property
    def llama_name(self) -> str:
        """How llama.cpp names the device in its logs: ``CUDA0``, or ``RPC0[10.0.0.2:50052]`` behind RPC."""
        if self.endpoint is not None:
            return f"RPC{self.index}[{self.endpoint}]"
        return f"CUDA{self.index}"

    @property
    def is_remote(self) -> bool:
        return self.endpoint is not None

    @property
    def host(self) -> str | None:
        """The worker's host (the endpoint without its port); None for a device of this machine."""
        return None if self.endpoint is None else self.endpoint.rsplit(":", 1)[0]
