"""Loads the compiled extension and checks that it matches the running torch."""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

_REBUILD_HINT = (
    "Rebuild mblm-cpp against the installed torch: "
    "pip install --no-build-isolation --force-reinstall --no-deps mblm-cpp "
    "(or, in a source checkout, bash tools/dev_build.sh)"
)


def _torch_release(version: str) -> str:
    return version.split("+")[0]


@functools.cache
def load_extension() -> Any:
    """Imports ``mblm._C`` (registering ``torch.ops.mblm``) and validates its build."""
    try:
        module = importlib.import_module("mblm._C")
    except ImportError as err:
        raise ImportError(
            f"mblm-cpp: the compiled extension mblm._C failed to load ({err}). {_REBUILD_HINT}"
        ) from err
    info = module.build_info()
    if _torch_release(info["torch"]) != _torch_release(torch.__version__):
        raise ImportError(
            f"mblm-cpp: mblm._C was built against torch {info['torch']} but torch "
            f"{torch.__version__} is installed. {_REBUILD_HINT}"
        )
    _check_cpu_arch(info["cpu_arch"])
    return module


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_ARCH_FLAGS = {"x86-64-v3": {"avx2", "fma", "f16c", "bmi2"}}


def _check_cpu_arch(arch: str) -> None:
    needed = _ARCH_FLAGS.get(arch)
    flags = _cpu_flags()
    if needed and flags and not needed <= flags:
        raise ImportError(
            f"mblm-cpp: the CPU kernels were compiled for {arch}, which needs the CPU features "
            f"{sorted(needed)}; this CPU lacks {sorted(needed - flags)}. Rebuild with "
            "-Ccmake.define.MBLM_CPU_ARCH= (empty) to target the compiler's default."
        )


def build_info() -> dict[str, Any]:
    """How the loaded extension was built: version, torch, CUDA on/off and archs, CPU arch."""
    return dict(load_extension().build_info())


def ssd_cpu_isa() -> str:
    """Instruction set of the CPU SSD kernels in this process: "avx512", "avx2" or "portable".

    The AVX-512 build is chosen where the CPU has it; the environment variable
    ``MBLM_CPU_ISA=avx2`` forces the base (AVX2) build. Raises RuntimeError for an invalid value.
    """
    return str(load_extension().ssd_cpu_isa())


def cuda_kernels_available() -> bool:
    return bool(build_info()["cuda"])
