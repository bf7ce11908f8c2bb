"""CUDA availability, device descriptions and memory snapshots (all zeros without CUDA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.types import Device

IS_CUDA_AVAILABLE = torch.cuda.is_available()
IS_BF16_AVAILABLE = IS_CUDA_AVAILABLE and torch.cuda.is_bf16_supported()

_GIB = 1024**3


@dataclass
class CudaProperties:
    cuda_available: bool
    cuda_version: str | None
    cuda_devices: list[str]  # "<name>_<total memory>_<major>.<minor>"


def cuda_properties() -> CudaProperties:
    devices = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return CudaProperties(
        cuda_available=torch.cuda.is_available(),
        cuda_version=torch.version.cuda,
        cuda_devices=[f"{d.name}_{d.total_memory}_{d.major}.{d.minor}" for d in devices],
    )


@dataclass
class CudaMemorySnapshot:
    allocated: float
    allocated_max: float
    reserved: float
    reserved_max: float
    total: float
    unit: Literal["GB"] = "GB"


def cuda_memory_snapshot(device: Device | None, dec_prec: int = 3) -> CudaMemorySnapshot:
    """Allocator statistics of ``device`` in GiB, rounded to ``dec_prec`` decimals."""
    if not torch.cuda.is_available() or device == "cpu":
        return CudaMemorySnapshot(0.0, 0.0, 0.0, 0.0, 0.0)

    def gib(num_bytes: int) -> float:
        return round(num_bytes / _GIB, dec_prec)

    return CudaMemorySnapshot(
        allocated=gib(torch.cuda.memory_allocated(device)),
        allocated_max=gib(torch.cuda.max_memory_allocated(device)),
        reserved=gib(torch.cuda.memory_reserved(device)),
        reserved_max=gib(torch.cuda.max_memory_reserved(device)),
        total=gib(torch.cuda.get_device_properties(device).total_memory),
    )
