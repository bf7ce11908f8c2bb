"""Per-dtype tolerances for comparing kernels with the reference (written once, used everywhere)."""

import torch

VALUE_TOL = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}

GRAD_TOL = {dt: {k: v * 2 for k, v in tol.items()} for dt, tol in VALUE_TOL.items()}
