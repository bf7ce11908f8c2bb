"""Finds mamba_ssm for the GPU comparisons (bench_ssd, bench_scan, bench_mamba_layer and
tests/model/test_mamba2_vs_mamba_ssm.py), with or without its compiled extension.

``load_mamba_ssm(src)`` tries, in order:

1. an installed mamba_ssm that imports as a whole (its package ``__init__`` needs the compiled
   ``selective_scan_cuda``);
2. mamba_ssm's unpacked source (the sdist root or its ``mamba_ssm`` package folder): ``src``,
   else ``$MBLM_MAMBA_SSM_SRC``, else ``build/mamba_ssm_src`` in this checkout. Its package
   ``__init__`` is not run (it imports the compiled extension): a bare module object whose
   ``__path__`` is the source folder stands for the package, so ``mamba_ssm.ops.triton.*`` and
   ``mamba_ssm.modules.mamba2`` import on their own. Modules that are missing get minimal
   stand-ins: ``selective_scan_cuda`` (its functions raise) and ``huggingface_hub`` (a
   ``PyTorchModelHubMixin`` that does nothing, the base class Mamba2 names).

Without a compiled extension the Triton SSD path (``mamba_chunk_scan_combined``) and
``Mamba2(use_mem_eff_path=False)`` run on CUDA; ``selective_scan_fn`` is then None. Nothing loads
without triton, einops and packaging (mamba_ssm imports them at module level).

A GPU machine without internet gets the source by carrying it: ``mkdir -p build && cp -r
/path/to/mamba_ssm-2.3.2.post1 build/mamba_ssm_src`` here, then name ``build/mamba_ssm_src`` in
the run's carried paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_SRC = CHECKOUT / "build" / "mamba_ssm_src"
ENV_SRC = "MBLM_MAMBA_SSM_SRC"

# Marks the modules this file put into sys.modules (the bare package and the stand-ins).
_MARK = "_mblm_stand_in"


@dataclasses.dataclass(frozen=True)
class MambaSsm:
    """What the comparisons use of mamba_ssm."""

    chunk_scan_combined: Callable[..., Any]  # ops.triton.ssd_combined.mamba_chunk_scan_combined
    Mamba2: type  # modules.mamba2.Mamba2
    selective_scan_fn: Callable[..., Any] | None  # None without the compiled extension
    description: str  # what was loaded, from where, with which stand-ins


_loaded: list[MambaSsm] = []


def load_mamba_ssm(src: str | None = None) -> tuple[MambaSsm | None, str]:
    """(MambaSsm, its description) when mamba_ssm can be used, else (None, the reason).

    ``src``: mamba_ssm's source (sdist root or package folder) used when no installed mamba_ssm
    imports; default ``$MBLM_MAMBA_SSM_SRC``, else ``build/mamba_ssm_src``. After a success,
    later calls return the same result whatever ``src`` they name (two mamba_ssm packages cannot
    share ``sys.modules``); a failure leaves nothing behind, so a later call may try again.
    """
    if not _loaded:
        found, why = _load(src)
        if found is None:
            return None, why
        _loaded.append(found)
    return _loaded[0], _loaded[0].description


def _load(src: str | None) -> tuple[MambaSsm | None, str]:
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install failing while it loads
        return None, f"triton is not importable ({exc}); mamba_ssm's SSD path is Triton code"
    triton_note = f"triton {triton.__version__}"

    installed_failure = ""
    if importlib.util.find_spec("mamba_ssm") is not None:
        found, why = _load_installed()
        if found is not None:
            return found, f"{found.description}; {triton_note}"
        installed_failure = f" (installed mamba_ssm did not import: {why})"

    folder = Path(src or os.environ.get(ENV_SRC) or DEFAULT_SRC)
    found, why = _load_source(folder)
    if found is None:
        return None, why + installed_failure
    description = f"{found.description}{installed_failure}; {triton_note}"
    found = dataclasses.replace(found, description=description)
    return found, description


def _load_installed() -> tuple[MambaSsm | None, str]:
    try:
        import mamba_ssm
        from mamba_ssm.modules.mamba2 import Mamba2
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as exc:
        _forget("mamba_ssm")
        return None, f"{type(exc).__name__}: {exc}"
    version = getattr(mamba_ssm, "__version__", "?")
    where = Path(mamba_ssm.__file__).parent
    description = f"installed mamba_ssm {version} ({where})"
    return MambaSsm(mamba_chunk_scan_combined, Mamba2, selective_scan_fn, description), ""


def package_dir(folder: Path) -> Path | None:
    """The mamba_ssm package folder inside ``folder`` (an sdist root) or ``folder`` itself."""
    for candidate in (folder / "mamba_ssm", folder):
        if (candidate / "ops" / "triton" / "ssd_combined.py").is_file() and (
            candidate / "modules" / "mamba2.py"
        ).is_file():
            return candidate
    return None


def _load_source(folder: Path) -> tuple[MambaSsm | None, str]:
    pkg = package_dir(folder)
    if pkg is None:
        return None, (
            f"no mamba_ssm source at {folder} (expected mamba_ssm/ops/triton/ssd_combined.py; "
            f"give the folder as the src argument or ${ENV_SRC})"
        )
    missing = [m for m in ("einops", "packaging") if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"mamba_ssm's source needs {', '.join(missing)} (not importable)"

    stand_ins = []
    if importlib.util.find_spec("selective_scan_cuda") is None:
        sys.modules["selective_scan_cuda"] = _selective_scan_cuda_stand_in()
        stand_ins.append("selective_scan_cuda")
    if importlib.util.find_spec("huggingface_hub") is None:
        sys.modules["huggingface_hub"] = _huggingface_hub_stand_in()
        stand_ins.append("huggingface_hub")
    sys.modules["mamba_ssm"] = _bare_package(pkg)
    try:
        ssd_combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        mamba2 = importlib.import_module("mamba_ssm.modules.mamba2")
    except Exception as exc:
        _forget("mamba_ssm")
        for name in stand_ins:
            sys.modules.pop(name, None)
        return None, f"importing mamba_ssm from {pkg} failed: {type(exc).__name__}: {exc}"

    selective_scan_fn = None
    if "selective_scan_cuda" not in stand_ins:
        try:
            interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
            selective_scan_fn = interface.selective_scan_fn
        except Exception:
            selective_scan_fn = None
    version = sys.modules["mamba_ssm"].__version__
    description = f"mamba_ssm {version} from source {pkg} (package __init__ not run"
    description += f"; stand-ins: {', '.join(stand_ins)})" if stand_ins else ")"
    if selective_scan_fn is None:
        description += "; no selective_scan_fn (compiled extension missing)"
    found = MambaSsm(
        ssd_combined.mamba_chunk_scan_combined, mamba2.Mamba2, selective_scan_fn, description
    )
    return found, description


def chunk_scan_like_ssd_scan(
    chunk_scan: Callable[..., Any],
    chunk_size: int,
    x: Any,
    dt: Any,
    A: Any,
    B: Any,
    C: Any,
    D: Any = None,
    dt_bias: Any = None,
    dt_softplus: bool = False,
    initial_state: Any = None,
    final_state: bool = False,
) -> Any:
    """``mblm.ops.ssd.ssd_scan``'s arguments passed to mamba_ssm's ``mamba_chunk_scan_combined``
    (or anything with its signature): the tensors keep their layouts (x (B, L, H, P), dt
    (B, L, H), A (H,), B/C (B, L, G, N), D (H,) or (H, P), dt_bias (H,), initial state
    (B, H, P, N)) and meaning (dt_eff = softplus?(dt + dt_bias)); mamba_ssm adds ``chunk_size``
    and returns the final state only when asked. Returns y, or (y, final state) with
    ``final_state``."""
    return chunk_scan(
        x, dt, A, B, C, chunk_size, D=D, z=None, dt_bias=dt_bias, initial_states=initial_state,
        dt_softplus=dt_softplus, return_final_states=final_state,
    )  # fmt: skip


def reference_chunk_scan(
    x: Any,
    dt: Any,
    A: Any,
    B: Any,
    C: Any,
    chunk_size: int,
    D: Any = None,
    z: Any = None,
    dt_bias: Any = None,
    initial_states: Any = None,
    seq_idx: Any = None,
    cu_seqlens: Any = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
) -> Any:
    """``mamba_chunk_scan_combined``'s signature and meaning over mamba_ssm's pure-PyTorch
    ``ssd_minimal_discrete`` (modules/ssd_minimal.py, the paper's listing), which runs on CPU and
    differentiates without overflow (``ssd_chunk_scan_combined_ref``, whose masked exponentials
    overflow in backward on long inputs, has no state arguments). Around it, as the Triton path
    does: dt_eff = dt (+ dt_bias), softplus when asked, clamped to dt_limit; head h reads group
    h // (H / G); the scan of dt_eff x with per-step log-decay dt_eff A; then + D x, then
    * silu(z). Float32 (float64 for float64 x); any length (padded with steps that leave the
    state unchanged). No seq_idx or varlen states. Needs a loaded mamba_ssm."""
    import torch
    import torch.nn.functional as F

    given = [
        name
        for name, used in (
            ("seq_idx", seq_idx is not None),
            ("cu_seqlens", cu_seqlens is not None),
            ("return_varlen_states", return_varlen_states),
        )
        if used
    ]
    if given:
        raise NotImplementedError(f"the reference scan does not take {', '.join(given)}")
    minimal = importlib.import_module("mamba_ssm.modules.ssd_minimal").ssd_minimal_discrete
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, length, heads, _ = x.shape
    d = dt.to(cdt) if dt_bias is None else dt.to(cdt) + dt_bias.to(cdt)
    if dt_softplus:
        d = F.softplus(d)
    if tuple(dt_limit) != (0.0, float("inf")):
        d = d.clamp(*dt_limit)
    per_group = heads // B.shape[2]
    Bh = B.to(cdt).repeat_interleave(per_group, dim=2)
    Ch = C.to(cdt).repeat_interleave(per_group, dim=2)
    X = x.to(cdt) * d[..., None]
    decay = d * A.to(cdt)
    pad = -length % chunk_size  # padded steps: no input, decay exp(0) = 1
    if pad:
        X, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, Bh, Ch))
        decay = F.pad(decay, (0, 0, 0, pad))
    initial = None if initial_states is None else initial_states.to(cdt)[:, None]
    y, final = minimal(X, decay, Bh, Ch, chunk_size, initial_states=initial)
    y = y[:, :length]
    if D is not None:
        Dc = D.to(cdt)
        y = y + (Dc[:, None] if Dc.dim() == 1 else Dc) * x.to(cdt)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y


@contextlib.contextmanager
def torch_reference_kernels() -> Iterator[None]:
    """Inside, mamba_ssm's ``Mamba2`` (with ``use_mem_eff_path=False``) runs its scan and gated
    RMSNorm through pure-PyTorch code instead of Triton kernels, so that the module runs on CPU:
    the name ``mamba_chunk_scan_combined`` in ``modules.mamba2`` becomes ``reference_chunk_scan``
    and ``rmsnorm_fn`` in ``ops.triton.layernorm_gated`` mamba_ssm's ``rms_norm_ref``. Its conv
    is nn.Conv1d already when causal_conv1d is not installed. Needs a loaded mamba_ssm."""
    mamba2 = importlib.import_module("mamba_ssm.modules.mamba2")
    gated = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")

    def rmsnorm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        return gated.rms_norm_ref(
            x, weight, bias, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate
        )

    saved = mamba2.mamba_chunk_scan_combined, gated.rmsnorm_fn
    mamba2.mamba_chunk_scan_combined, gated.rmsnorm_fn = reference_chunk_scan, rmsnorm
    try:
        yield
    finally:
        mamba2.mamba_chunk_scan_combined, gated.rmsnorm_fn = saved


def _bare_package(pkg: Path) -> types.ModuleType:
    """A module object for ``mamba_ssm`` whose submodules import from ``pkg``; its version is read
    from the ``__init__`` text, which is not executed."""
    module = types.ModuleType("mamba_ssm")
    spec = importlib.machinery.ModuleSpec("mamba_ssm", None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    module.__spec__ = spec
    module.__path__ = [str(pkg)]
    init = (
        (pkg / "__init__.py").read_text(encoding="utf8") if (pkg / "__init__.py").is_file() else ""
    )
    version = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", init)
    module.__version__ = version.group(1) if version else "unknown"
    setattr(module, _MARK, True)
    return module


def _selective_scan_cuda_stand_in() -> types.ModuleType:
    module = types.ModuleType("selective_scan_cuda")

    def missing(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(
                f"selective_scan_cuda.{name}: mamba_ssm's compiled extension is not installed "
                "(a stand-in registered by benchmarks/_mamba_ssm.py)"
            )

        return call

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):  # keep the import system's and copy's probes ordinary
            raise AttributeError(name)
        return missing(name)

    module.__getattr__ = __getattr__
    setattr(module, _MARK, True)
    return module


def _huggingface_hub_stand_in() -> types.ModuleType:
    module = types.ModuleType("huggingface_hub")

    class PyTorchModelHubMixin:
        """Stand-in: the hub methods are not needed by the comparisons."""

    module.PyTorchModelHubMixin = PyTorchModelHubMixin
    setattr(module, _MARK, True)
    return module


def _forget(package: str) -> None:
    """Drops ``package`` and its submodules from sys.modules (after a failed import)."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
