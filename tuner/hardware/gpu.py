"""A GPU as the planner sees it (:class:`Gpu`), whether NVML detected it, the catalog named it or ``--vram`` made
it up.

GPU numbering: :attr:`Gpu.index` is NVML's index (PCI bus order). llama.cpp's ``CUDAn`` is the same GPU only when
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and ``CUDA_VISIBLE_DEVICES`` is unset (the CUDA runtime numbers the fastest card
first otherwise); tuner launches llama-server with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (``tuner.server.CHILD_ENV``) and
:func:`tuner.hardware.detect_hardware` notes when the user's own environment may differ.

A device that is not a local CUDA GPU (an RPC worker's device) sets :attr:`Gpu.device_name` to the buffer name
llama.cpp gives it (``RPC0[10.0.0.2:50052]``), :attr:`Gpu.select_name` to its device name (``RPC0``, what
``--device`` takes), :attr:`Gpu.endpoint` to ``host:port``, and :attr:`Gpu.backend` to the worker's backend
(``CUDA`` or ``CPU``). The planner takes the devices in llama.cpp's model order (RPC devices first,
src/llama.cpp:275-285): the order of :attr:`tuner.hardware.Hardware.gpus`.
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
    """``nvml`` (detected), ``catalog`` (named with --gpu) or ``manual`` (made up from --vram)."""
    device_name: str | None = None
    """llama.cpp's buffer name when it is not ``CUDA<index>`` (an RPC device: ``RPC0[host:port]``)."""
    select_name: str | None = None
    """llama.cpp's device name (``--device``) when it differs from the buffer name (an RPC device: ``RPC<g>``)."""
    backend: str = "CUDA"
    """The ggml backend that runs the device: ``CUDA`` (CUDA row padding, f16 KV conversion) or ``CPU``."""
    endpoint: str | None = None
    """``host:port`` of the RPC worker holding the device; None for a local GPU."""

    @property
    def llama_name(self) -> str:
        """How llama.cpp names the device's buffers (its logs, ``-ot`` targets); the planner's key for it."""
        return self.device_name or f"CUDA{self.index}"

    @property
    def is_remote(self) -> bool:
        return self.endpoint is not None
