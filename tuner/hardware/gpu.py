"""A GPU as the planner sees it (:class:`Gpu`), whether NVML detected it, the catalog named it or ``--vram`` made
it up.

GPU numbering: :attr:`Gpu.index` is NVML's index (PCI bus order). llama.cpp's ``CUDAn`` is the same GPU only when
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and ``CUDA_VISIBLE_DEVICES`` is unset; :func:`tuner.hardware.detect_hardware`
notes when that may not hold.
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

    @property
    def llama_name(self) -> str:
        """How llama.cpp names the device (``--device``, ``--tensor-split`` order)."""
        return f"CUDA{self.index}"
