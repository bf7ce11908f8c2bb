"""The SSD CPU kernels' instruction-set builds: the AVX-512 copy chosen where the CPU has it and
the base (AVX2) build forced by ``MBLM_CPU_ISA=avx2`` compute the same forward and backward.

The forced build runs in a subprocess (the choice is made once per process), on inputs and
upstream gradients written by this process; both results are compared within float32 / float64
tolerance. On a CPU without AVX-512 both sides run the base build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mblm.ops import build_info, ssd_cpu_isa
from mblm.ops._loader import _cpu_flags
from mblm.ops.ssd import CHECKPOINT_STEPS

ROOT = Path(__file__).resolve().parents[2]
AVX512_FLAGS = {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512cd"}

# (B, L, H, P, G, N): lanes of 16/32 with a partial tile, groups, several checkpoint blocks
CASES = [
    (1, 70, 2, 64, 1, 128),
    (2, CHECKPOINT_STEPS + 45, 4, 24, 2, 16),
    (1, 2 * CHECKPOINT_STEPS + 3, 3, 40, 3, 40),
]

CHILD = """
import sys, torch
import mblm.ops  # noqa: F401
from mblm.ops import ssd_cpu_isa
cases = torch.load(sys.argv[1])
out = []
for a in cases:
    y, s, ck = torch.ops.mblm.ssd_fwd(*a["fwd"])
    g = torch.ops.mblm.ssd_bwd(a["gy"], a["gs"], *a["fwd"], ck)
    out.append([y, s, *g])
torch.save({"isa": ssd_cpu_isa(), "out": out}, sys.argv[2])
"""


def _inputs(shape, dtype, seed):
    b, length, h, p, g, n = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)

    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    A = -(torch.rand(h, generator=gen, dtype=torch.float64) * 3.0 + 0.1).to(pdt)
    fwd = [rand(b, length, h, p), rand(b, length, h) - 1.0, A, rand(b, length, g, n),
           rand(b, length, g, n), rand(h).to(pdt), (rand(h) * 0.5).to(pdt), True,
           rand(b, h, p, n).to(pdt)]  # fmt: skip
    return {"fwd": fwd, "gy": rand(b, length, h, p), "gs": rand(b, h, p, n).to(pdt)}


def _run_child(tmp_path, cases, isa):
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(cases, src)
    env = dict(os.environ, MBLM_CPU_ISA=isa)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return torch.load(dst)


def test_active_isa_follows_the_cpu():
    isa = ssd_cpu_isa()
    assert isa in ("avx512", "avx2", "portable")
    forced = os.environ.get("MBLM_CPU_ISA")
    if forced:
        assert isa == forced
    elif build_info()["cpu_arch"] == "x86-64-v3" and AVX512_FLAGS <= _cpu_flags():
        assert isa == "avx512"
    elif not AVX512_FLAGS <= _cpu_flags():
        assert isa != "avx512"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_avx2_build_matches_the_default(tmp_path, dtype):
    cases = [_inputs(shape, dtype, seed) for seed, shape in enumerate(CASES)]
    child = _run_child(tmp_path, cases, "avx2")
    if build_info()["cpu_arch"] == "x86-64-v3":
        assert child["isa"] == "avx2"
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for shape, a, theirs in zip(CASES, cases, child["out"], strict=True):
        y, s, ck = torch.ops.mblm.ssd_fwd(*a["fwd"])
        ours = [y, s, *torch.ops.mblm.ssd_bwd(a["gy"], a["gs"], *a["fwd"], ck)]
        names = ["y", "final_state", "gx", "gdt", "gA", "gB", "gC", "gD", "g_dt_bias", "g_init"]
        for name, o, t in zip(names, ours, theirs, strict=True):
            # relative to the output's scale: the builds sum in different orders
            scale = max(1.0, t.abs().max().item())
            torch.testing.assert_close(o / scale, t / scale, **tol, msg=f"{name} at {shape}")


def test_invalid_isa_names_the_variable(tmp_path):
    env = dict(os.environ, MBLM_CPU_ISA="sse2")
    code = "import mblm.ops; mblm.ops.ssd_cpu_isa()"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "MBLM_CPU_ISA" in result.stderr and "sse2" in result.stderr


# EVEX-only encodings: 512-bit or mask registers, the upper 16 vector registers, AVX-512-only ops
_EVEX = re.compile(r"zmm|%k[0-7]|[xy]mm(1[6-9]|2\d|3[01])\b|vpternlog|kmov|vpermt2|vrndscale")
_LABEL = re.compile(r"^[0-9a-f]+ <(.+)>:$")


def _evex_functions(obj: Path) -> set[str]:
    """Mangled names of the functions of ``obj`` with AVX-512-only instructions."""
    out = subprocess.run(["objdump", "-d", "-w", str(obj)], capture_output=True, text=True)
    found, current = set(), None
    for line in out.stdout.splitlines():
        label = _LABEL.match(line)
        if label:
            current = label.group(1)
        elif current is not None and "\t" in line and _EVEX.search(line):
            found.add(current)
    return found


def _shared_functions(obj: Path) -> set[str]:
    """Global and weak function symbols of ``obj``: what the linker may share between objects."""
    out = subprocess.run(["objdump", "-t", "-w", str(obj)], capture_output=True, text=True)
    names = set()
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 6 and "F" in fields[1:3] and fields[1] in ("g", "w"):
            names.add(fields[-1])
    return names


def test_avx512_objects_share_no_avx512_code():
    """Inline library code (std, c10, ATen) that the AVX-512 copy instantiates is shared with the
    base build through the linker (one copy per module): no such shared function may contain
    AVX-512 instructions, or CPUs without AVX-512 would crash. AVX-512 code must be local or in
    namespace mblm::cpu_ssd::avx512 (mangled ``6avx512``)."""
    build = ROOT / os.environ.get("MBLM_BUILD_DIR", "build/dev")
    objects = sorted(build.glob("CMakeFiles/mblm_ops.dir/csrc/cpu/avx512/*.o"))
    if not objects or shutil.which("objdump") is None:
        pytest.skip("no AVX-512 SSD objects in the build directory (or no objdump)")
    for obj in objects:
        offenders = {
            name for name in _evex_functions(obj) & _shared_functions(obj) if "6avx512" not in name
        }
        assert not offenders, f"{obj.name}: shared functions with AVX-512 code: {sorted(offenders)}"
