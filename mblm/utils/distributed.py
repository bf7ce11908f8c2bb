"""Process groups for training under torchrun (or as a single process without it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel


class ElasticRunVars(BaseModel):
    """Where this process sits in the run.

    ``local_rank`` is the rank on this node (it picks the GPU), ``rank`` the global rank (it
    picks the data shard and decides who writes files; None means "same as local_rank", as for
    a single node), ``world_size`` the number of processes of all nodes.
    """

    local_rank: int
    world_size: int
    is_cuda: bool
    rank: int | None = None

    @property
    def global_rank(self) -> int:
        return self.local_rank if self.rank is None else self.rank


def _torchrun_env_variables(is_cuda: bool) -> ElasticRunVars:
    """The run variables torchrun exports (LOCAL_RANK, RANK, WORLD_SIZE)."""
    local_rank = os.environ.get("LOCAL_RANK")
    world_size = os.environ.get("WORLD_SIZE")
    if not local_rank or not world_size:
        raise RuntimeError("LOCAL_RANK and WORLD_SIZE are not set: not started by torchrun")
    rank = os.environ.get("RANK")
    return ElasticRunVars(
        local_rank=int(local_rank),
        world_size=int(world_size),
        is_cuda=is_cuda,
        rank=int(rank) if rank else None,
    )


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextmanager
def process_group(*, backend: Literal["gloo", "nccl"] | None = None) -> Iterator[ElasticRunVars]:
    """Initialises the default process group for the duration of the block and yields the run
    variables.

    ``backend`` defaults to NCCL when CUDA is available, else Gloo (CPU). Under torchrun the
    group spans all its processes; without torchrun (``python train.py``) the block runs as a
    single process (world size 1, no process group), so the same script works both ways.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    is_cuda = backend == "nccl"
    if not launched_by_torchrun():
        yield ElasticRunVars(local_rank=0, world_size=1, is_cuda=is_cuda, rank=0)
        return
    run_vars = _torchrun_env_variables(is_cuda)
    if is_cuda:
        torch.cuda.set_device(run_vars.local_rank)
    _init_from_torchrun_env(backend, run_vars)
    try:
        yield run_vars
    finally:
        dist.destroy_process_group()


def _init_from_torchrun_env(backend: str, run_vars: ElasticRunVars) -> None:
    """``init_process_group`` from torchrun's environment, with the store keys of every restart
    attempt under their own prefix.

    torchrun's agent keeps one store (same address) across restarts of the worker group, and a
    process group's keys are the same in every attempt: a restarted group could then read the
    addresses of the previous attempt's dead workers and fail (or hang) while connecting. The
    attempt prefix keeps them apart.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        dist.init_process_group(backend=backend)
        return
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=run_vars.world_size,
        is_master=not agent_store and run_vars.global_rank == 0,
        timeout=timedelta(minutes=30),
        multi_tenant=not agent_store,
    )
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore(f"mblm/attempt_{attempt}", store),
        rank=run_vars.global_rank,
        world_size=run_vars.world_size,
    )


def is_distributed() -> bool:
    """A process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank (itself when not distributed)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
