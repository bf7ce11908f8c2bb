"""Prints how this mblm-cpp installation was built: ``python -m mblm.info`` (or ``mblm-info``).

Shows the mblm-cpp and torch versions, whether the CUDA kernels were compiled (and for which
architectures), the operators registered in ``torch.ops.mblm``, the CPU features the kernels
can use and the instruction set the SSD CPU kernels run with (``MBLM_CPU_ISA``).
"""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch

import mblm
from mblm.ops import build_info, ssd_cpu_isa
from mblm.ops._common import CUDA_FAMILIES, cuda_family_enabled

# CPU features that matter for the vectorised kernels, in the order they are reported.
_CPU_FEATURES = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_tile",
    "asimd",
    "sve",
)


def registered_ops() -> list[str]:
    """Names of the operators in the ``mblm`` namespace of the torch dispatcher."""
    names = {
        n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mblm::")
    }
    return sorted(names)


def cpu_features() -> list[str]:
    """The CPU flags of ``_CPU_FEATURES`` this machine has (Linux /proc/cpuinfo)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return [feature for feature in _CPU_FEATURES if feature in flags]


def _cuda_families() -> str:
    """The op families whose CUDA kernels the wrappers use (proven on a GPU, or opted into)."""
    used = [f for f in CUDA_FAMILIES if cuda_family_enabled(f)]
    held = [f for f in CUDA_FAMILIES if f not in used]
    text = ", ".join(used) or "none"
    if held:
        text += f" (not yet proven on a GPU, PyTorch fallback: {', '.join(held)})"
    return text


def collect() -> dict[str, Any]:
    """Everything ``main`` prints, as a dict."""
    info = build_info()
    cuda_device = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cuda_device = f"{props.name} (sm_{props.major}{props.minor})"
    return {
        "mblm-cpp": mblm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "built against torch": info.get("torch"),
        "CUDA kernels": "on" if info.get("cuda") else "off",
        "CUDA archs": info.get("cuda_archs") or "-",
        "CUDA kernels in use": _cuda_families() if info.get("cuda") else "-",
        "CUDA device": cuda_device or "none",
        "CPU arch (build)": info.get("cpu_arch") or "default",
        "SSD CPU kernels": ssd_cpu_isa(),
        "CPU capability (torch)": torch.backends.cpu.get_cpu_capability(),
        "CPU features": " ".join(cpu_features()) or "-",
        "compiler": info.get("compiler", "-"),
        "ops": registered_ops(),
    }


def main() -> int:
    info = collect()
    ops = info.pop("ops")
    width = max(len(key) for key in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    print(f"{'torch.ops.mblm':<{width}}  {len(ops)} ops: {', '.join(ops) if ops else '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
