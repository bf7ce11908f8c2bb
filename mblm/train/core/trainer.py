"""``CoreTrainer``: the generic training loop shared by MBLM's trainers.

A subclass provides the model (``init_model``), one forward pass returning the loss
(``model_forward``) and the optimizer (``configure_optimizer``); the core trainer runs the rest:

- processes: one per device under torchrun (DDP over Gloo on CPU, NCCL on GPU), or a single
  process; the training data is sharded by global rank and only global rank 0 writes files;
- the loop: ``target_elements`` spread over the processes, gradient accumulation (no DDP
  all-reduce on the accumulating micro-batches), gradient clipping, bf16 autocast on GPU, the LR
  schedule, training-loss rows and evenly spaced validations (sharded over the processes);
- files of a run, in ``<output_dir>/<name_model>_<run id>/``: ``config.yaml`` (the output config,
  a valid entry config to chain a next run), ``loss.csv``, ``timemem.csv``, ``train.log``,
  ``<name_model>_top<k>.pth`` (the best validated models), ``training_state.pt`` (for an exact
  resume) and ``<name_model>_top1.safetensors`` at the end;
- robustness: every checkpoint is written atomically; a run whose directory holds an unfinished
  training state continues from it exactly (model, optimizer, scheduler, gradient scaler, RNG
  states, data position, logs), which is what happens when torchrun restarts a failed worker
  (``--max-restarts``) or a job is relaunched with the same ``JOB_ID``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from time import perf_counter, time
from typing import Any, Generic, Literal, TypeVar, cast

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from mblm.data.datasets import DistributedDataset
from mblm.data.types import ModelMode
from mblm.model.utils import count_params
from mblm.train.core.config import (
    CoreIoConfig,
    CSVLossEntry,
    CSVTimeAndMemSnapshotEntry,
    GenericEntryConfig,
    GenericOutputConfig,
    ResumeConfig,
    SummaryStats,
    TIoConfig,
    TModelParams,
    TTrainConfig,
)
from mblm.train.core.iter import epoch_cycler
from mblm.train.core.state import (
    STATE_FILE_NAME,
    STATE_VERSION,
    EpochSampler,
    capture_rng_state,
    restore_rng_state,
)
from mblm.utils.cuda import IS_BF16_AVAILABLE, cuda_memory_snapshot, cuda_properties
from mblm.utils.distributed import (
    ElasticRunVars,
    all_gather_objects,
    barrier,
    broadcast_object,
    is_distributed,
)
from mblm.utils.io import (
    CSVWriter,
    StateDict,
    atomic_torch_save,
    atomic_write,
    dump_yml,
    load_model_state,
    save_model_state,
    torch_load,
)
from mblm.utils.logging import create_logger
from mblm.utils.misc import retry
from mblm.utils.top_n import TopN

TModel = TypeVar("TModel", bound=torch.nn.Module)
TBatch = TypeVar("TBatch", bound=torch.Tensor | Sequence[torch.Tensor])

_LN2 = math.log(2.0)
_RESUMED_CHECKPOINT_ID = -1  # top-n id of the checkpoint a chained run starts from


def _progress_default() -> bool:
    """Progress bars on when ``DISPLAY_PROGRESS`` says so (1/0), else when stderr is a tty."""
    env = os.environ.get("DISPLAY_PROGRESS")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in {"0", "false", "no", "off"}
    return sys.stderr.isatty()


@dataclass
class CoreTrainerOptions:
    """Options of ``CoreTrainer`` that are not part of the YAML config."""

    config_file_name: str = "config.yaml"
    loss_file_name: str = "loss.csv"
    timemem_file_name: str = "timemem.csv"
    max_train_restarts: int = 0
    skip_validation: bool = False
    display_progress: bool = field(default_factory=_progress_default)
    train_prog_min_interval_seconds: int = 1
    valid_prog_min_interval_seconds: int = 1
    track_first_fw_bw_exec_times: int | None = 30
    # autocast dtype on GPU (CPU runs in float32)
    amp_dtype: torch.dtype = torch.bfloat16 if IS_BF16_AVAILABLE else torch.half
    # beyond the original
    save_training_state: bool = True
    export_safetensors: bool = True


@dataclass
class _Loop:
    """Position and counters of the training loop (all of it goes into the training state)."""

    epoch: int
    batch: int
    iters_done: int
    local_batch_iters: int
    start_cum_batch: int
    elements_seen: int = 0
    avg_grad: float = -1.0
    avg_grad_clipped: float = -1.0
    shuffle_seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class CoreTrainer(ABC, Generic[TModel, TBatch, TModelParams, TTrainConfig, TIoConfig]):
    """Generic trainer (see the module docstring).

    Must implement: ``init_model``, ``model_forward``, ``configure_optimizer``. May override:
    ``configure_scheduler``, ``configure_logger``, ``configure_count_parameters``,
    ``configure_run_id``, ``migrate_embeddings_if_enabled``, ``rename_modules_if_enabled``,
    ``get_train_dataloader`` / ``get_valid_dataloader`` / ``get_test_dataloader``.
    """

    config: GenericEntryConfig[TModelParams, TTrainConfig, TIoConfig]
    options: CoreTrainerOptions

    def __init__(
        self,
        config: GenericEntryConfig[TModelParams, TTrainConfig, TIoConfig],
        run_vars: ElasticRunVars,
        options: CoreTrainerOptions | None = None,
    ):
        self.config = config
        self.options = options or CoreTrainerOptions()
        self._world_size = run_vars.world_size
        self._local_rank = run_vars.local_rank
        self._rank = run_vars.global_rank
        self._is_cuda = run_vars.is_cuda
        self._device = f"cuda:{self._local_rank}" if run_vars.is_cuda else "cpu"
        self._device_type: Literal["cuda", "cpu"] = "cuda" if run_vars.is_cuda else "cpu"
        self._is_main_worker = self._rank == 0

        if config.io.validate_amount <= 0:
            raise ValueError("io.validate_amount must be strictly positive")
        if config.io.num_models_to_save < 0:
            raise ValueError("io.num_models_to_save can't be negative")

        # Everything that can fail on bad input (a run directory holding another config's
        # state, a checkpoint that does not fit) is checked before any file is written.
        self._output_dir = self._resolve_output_dir(config.io)
        self._state_file = self._output_dir / STATE_FILE_NAME
        self._resume_state = self._find_resumable_state()

        model = self.init_model().to(self._device)
        resumed_entry: tuple[float, StateDict] | None = None
        if config.resume and self._resume_state is None:
            model, loss = load_model_state(
                config.resume.checkpoint_file,
                model,
                map_location=self._device,
                map_extend_embeddings=(
                    self.migrate_embeddings_if_enabled()
                    if config.resume.migrate_embeddings
                    else None
                ),
                map_rename_modules=(
                    self.rename_modules_if_enabled() if config.resume.rename_modules else None
                ),
            )
            resumed_entry = (loss, model.state_dict())

        if self._is_main_worker:
            self._output_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        self._log = self.configure_logger(self._output_dir, self._is_main_worker)
        if self._resume_state is not None:
            self._log.info(f"Resuming the run in {self._output_dir} from its training state")
        elif config.resume:
            self._log.info(f"Loaded model from checkpoint {config.resume.checkpoint_file}")
        else:
            self._log.info("Creating new model")
        if config.io.num_models_to_save == 0:
            self._log.warning("No model of this training will be saved!")
        if config.io.validate_amount < config.io.num_models_to_save:
            self._log.warning(
                f"validate_amount ({config.io.validate_amount}) is less than "
                f"num_models_to_save ({config.io.num_models_to_save}): at most "
                f"{config.io.validate_amount} models will be saved"
            )

        csv_sizes = self._resume_state["csv_sizes"] if self._resume_state else {}
        self._csv_loss_writer: CSVWriter[CSVLossEntry] = CSVWriter(
            self._output_dir,
            self.options.loss_file_name,
            noop=self._rank not in set(config.io.enabled_loss_log_for_gpus),
            resume_size=csv_sizes.get("loss"),
        )
        self._csv_timemem_writer: CSVWriter[CSVTimeAndMemSnapshotEntry] = CSVWriter(
            self._output_dir,
            self.options.timemem_file_name,
            noop=not self._is_main_worker,
            resume_size=csv_sizes.get("timemem"),
        )

        # the best validated models (main worker only), as CPU copies; ids tell entries apart
        self._top_n_models: TopN[tuple[int, StateDict]] = TopN(config.io.num_models_to_save)
        self._top_file_ids: dict[int, int] = {}  # slot k (1-based) -> id of the model in it
        if resumed_entry is not None and self._is_main_worker:
            self._top_n_models.add(
                (resumed_entry[0], (_RESUMED_CHECKPOINT_ID, _cpu_copy(resumed_entry[1])))
            )

        self._model_dist = self._init_distributed_model(model)
        self._running_resume_conf = ResumeConfig(
            checkpoint_file="",
            next_batch_index=-1,
            next_epoch_index=-1,
            resumed_from=config.resume.checkpoint_file if config.resume else None,
        )
        cuda_info = cuda_properties()
        main_params, sub_params = self.configure_count_parameters(model)
        self._running_summary_stats = SummaryStats(
            parameter_count=main_params,
            num_workers=self._world_size,
            cuda_devices=cuda_info.cuda_devices,
            training_start="",
            training_end="",
            error=None,
        )
        if self._resume_state is not None:
            saved = self._resume_state
            self._running_resume_conf = ResumeConfig.model_validate(saved["running_resume"])
            self._running_summary_stats.training_start = saved["training_start"]
        self._dump_output_config()
        self._log.info("Trainer initialized successfully")
        self._log.info(f"Model parameters: {main_params}, ({sub_params})")
        self._log.info(f"Configuration: {config}")
        self._log.info(f"CUDA: {cuda_info}")

    # -----------------------------------------------------------------------------------------
    # Hooks
    # -----------------------------------------------------------------------------------------

    @abstractmethod
    def init_model(self) -> TModel:
        """A new model (moved to the device by the trainer)."""
        ...

    @abstractmethod
    def model_forward(self, model: TModel, batch: TBatch, device: str) -> torch.Tensor:
        """One forward pass; moves the batch to ``device`` and returns a scalar loss tensor.
        ``model`` may be wrapped in DistributedDataParallel: call only its ``forward``."""
        ...

    @abstractmethod
    def configure_optimizer(self, parameters: Iterator[torch.nn.Parameter]) -> Optimizer: ...

    def configure_scheduler(self, optimizer: Optimizer, local_gradient_steps: int) -> LRScheduler:
        """The LR scheduler, stepped once per optimizer step (``local_gradient_steps`` in all)."""
        return torch.optim.lr_scheduler.PolynomialLR(
            optimizer, total_iters=local_gradient_steps, power=1.0
        )

    def configure_logger(self, output_dir: Path, is_main_worker: bool) -> logging.Logger:
        return create_logger("train", log_dir=output_dir, noop=not is_main_worker)

    def configure_count_parameters(self, model: TModel) -> tuple[int, dict[str, int]]:
        return count_params(model)

    def configure_run_id(self) -> str:
        """Suffix of the run directory; by default the start time in seconds."""
        return f"{time():.0f}"

    def migrate_embeddings_if_enabled(self) -> set[str] | None:
        """Names of embeddings a checkpoint may hold fewer rows of (``resume.migrate_embeddings``)."""
        return None

    def rename_modules_if_enabled(self) -> Iterable[tuple[str, str]] | None:
        """``(from_prefix, to_prefix)`` renames applied to a checkpoint (``resume.rename_modules``)."""
        return None

    # -----------------------------------------------------------------------------------------
    # Data loaders
    # -----------------------------------------------------------------------------------------

    def _get_dataloader(
        self,
        dataset: DistributedDataset[TBatch],
        data_loader_kwargs: dict[str, Any],
        **additional_data_loader_kwargs: Any,
    ) -> DataLoader:
        return DataLoader(dataset, **{**data_loader_kwargs, **additional_data_loader_kwargs})

    def get_train_dataloader(
        self, dataset: DistributedDataset[TBatch], **additional_data_loader_kwargs: Any
    ) -> DataLoader:
        """Full batches only, in the order of an ``EpochSampler`` (shuffled per epoch when
        ``shuffle_train``), with a private generator so the global RNG is not consumed."""
        return self._get_dataloader(
            dataset,
            dict(
                batch_size=self.config.train.batch_size,
                pin_memory=self._is_cuda,
                sampler=EpochSampler(dataset, self.config.train.shuffle_train, seed=0),
                drop_last=True,
                generator=torch.Generator(),
            ),
            **additional_data_loader_kwargs,
        )

    def get_valid_dataloader(
        self, dataset: DistributedDataset[TBatch], **additional_data_loader_kwargs: Any
    ) -> DataLoader:
        return self._get_dataloader(
            dataset,
            dict(
                batch_size=self.config.train.batch_size,
                pin_memory=self._is_cuda,
                shuffle=self.config.train.shuffle_eval,
                drop_last=False,
            ),
            **additional_data_loader_kwargs,
        )

    def get_test_dataloader(
        self, dataset: DistributedDataset[TBatch], **additional_data_loader_kwargs: Any
    ) -> DataLoader:
        return self._get_dataloader(
            dataset,
            dict(batch_size=self.config.train.batch_size, pin_memory=self._is_cuda, shuffle=False),
            **additional_data_loader_kwargs,
        )

    # -----------------------------------------------------------------------------------------
    # Run directory and resume detection
    # -----------------------------------------------------------------------------------------

    def _resolve_output_dir(self, io_config: CoreIoConfig) -> Path:
        """``<output_dir>/<name_model>_<run id>``, the same on every rank. Under torchrun, a
        restarted worker group finds the run directory of its first attempt again."""
        output_dir = Path(io_config.output_dir)
        run_id = None
        if self._is_main_worker:
            run_id = self._elastic_run_id(output_dir) or self.configure_run_id()
            self._remember_elastic_run_id(output_dir, run_id)
        run_id = cast(str, broadcast_object(run_id))
        return output_dir / f"{io_config.name_model}_{run_id}"

    @staticmethod
    def _elastic_marker(output_dir: Path) -> Path | None:
        rdzv = os.environ.get("TORCHELASTIC_RUN_ID")
        if not rdzv or rdzv == "none":
            return None
        return output_dir / ".elastic" / rdzv

    def _elastic_run_id(self, output_dir: Path) -> str | None:
        marker = self._elastic_marker(output_dir)
        if marker is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0:
            return None
        try:
            return marker.read_text(encoding="utf8").strip() or None
        except OSError:
            return None

    def _remember_elastic_run_id(self, output_dir: Path, run_id: str) -> None:
        marker = self._elastic_marker(output_dir)
        if marker is not None:
            with atomic_write(marker, "w", encoding="utf8") as f:
                f.write(run_id)

    def _comparable_config(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    def _find_resumable_state(self) -> dict[str, Any] | None:
        """The training state in the run directory if there is one to continue; raises when the
        directory holds a finished run or a state of another config or world size."""
        exists = self._state_file.is_file() if self._is_main_worker else False
        if not broadcast_object(exists) or not self.options.save_training_state:
            return None
        state = torch_load(self._state_file, map_location="cpu", mmap=True)
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"{self._state_file} was written by an incompatible version of the trainer"
            )
        if state["finished"]:
            raise ValueError(
                f"The run directory {self._output_dir} holds a finished run. Launch with another "
                "JOB_ID (or remove that directory) to train again, or chain a new run with its "
                "config.yaml."
            )
        differences = _config_differences(state["config"], self._comparable_config())
        if differences:
            raise ValueError(
                f"The run directory {self._output_dir} holds the training state of a different "
                f"config ({'; '.join(differences)}). Use another JOB_ID or output_dir; nothing "
                "was overwritten."
            )
        if state["world_size"] != self._world_size:
            raise ValueError(
                f"{self._state_file} was written by {state['world_size']} processes; resuming it "
                f"exactly needs the same number (now {self._world_size})"
            )
        return state

    # -----------------------------------------------------------------------------------------
    # Utilities
    # -----------------------------------------------------------------------------------------

    def _init_distributed_model(self, base_model: TModel) -> DistributedDataParallel | TModel:
        """DDP over the process group when there is more than one process, else the model."""
        if not is_distributed():
            return base_model
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(base_model)
        device_ids = [self._local_rank] if self._is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def _unpack_distributed_model(self, module: TModel | DistributedDataParallel) -> TModel:
        if isinstance(module, DistributedDataParallel):
            return cast(TModel, module.module)
        return module

    def _dump_output_config(self) -> None:
        if not self._is_main_worker:
            return
        output_config = GenericOutputConfig(
            io=self.config.io,
            params=self.config.params,
            train=self.config.train,
            resume=self._running_resume_conf,
            summary=self._running_summary_stats,
        )
        dump_yml(self._output_dir / self.options.config_file_name, output_config)

    def _write_csv_loss(
        self,
        kind: ModelMode,
        loss: float,
        epoch: int,
        batch: int,
        cum_batch: int,
        elements_seen: int,
        lr: float,
        avg_grad: float,
        avg_grad_clipped: float,
    ) -> None:
        self._csv_loss_writer.write_row(
            CSVLossEntry(
                gpu_rank=self._rank,
                timestamp=str(datetime.now()),
                elements_seen=elements_seen,
                kind=kind.value,
                epoch=epoch,
                batch=batch,
                cum_batch=cum_batch,
                loss=loss,
                lr=lr,
                avg_grad=avg_grad,
                avg_grad_clipped=avg_grad_clipped,
            )
        )

    def _write_csv_timemem(
        self,
        cum_batch: int,
        num_items: int,
        kind: ModelMode,
        fw_time: float,
        bw_time: float | None,
    ) -> None:
        mem = cuda_memory_snapshot(self._device)
        self._csv_timemem_writer.write_row(
            CSVTimeAndMemSnapshotEntry(
                cum_batch=cum_batch,
                num_items=num_items,
                kind=kind.value,
                fw_time=fw_time,
                bw_time=bw_time,
                allocated=mem.allocated,
                allocated_max=mem.allocated_max,
                reserved=mem.reserved,
                reserved_max=mem.reserved_max,
                total=mem.total,
            )
        )

    def _log_cuda_memory_snapshot(self, cumulative_batch_idx: int | None) -> None:
        if self._is_cuda:
            prefix = f"[{cumulative_batch_idx}] " if cumulative_batch_idx else ""
            self._log.debug(f"{prefix}CUDA memory: {cuda_memory_snapshot(self._device)}")

    def _calc_logging_points(
        self, total_batch_iters: int, start_batch_idx: int
    ) -> tuple[set[int], set[int]]:
        """Cumulative batch indices at which to log the training loss and to validate: each
        amount spread evenly from the first to the last iteration (clipped to the number of
        iterations)."""

        def points(amount: int, what: str) -> set[int]:
            if total_batch_iters < amount:
                self._log.warning(
                    f"Less batch iterations ({total_batch_iters}) than {what} ({amount}). "
                    f"Clipping {what} to {total_batch_iters}"
                )
                amount = total_batch_iters
            last = start_batch_idx + total_batch_iters - 1
            return set(torch.linspace(start_batch_idx, last, amount).long().tolist())

        return (
            points(self.config.io.log_train_loss_amount, "train loss log points"),
            points(self.config.io.validate_amount, "validation runs"),
        )

    def avg_gradient_value(self) -> float:
        """Mean over parameters of each gradient's mean (signed; -1 when there is none)."""
        means = [p.grad.mean() for p in self._model_dist.parameters() if p.grad is not None]
        if not means:
            return -1.0
        return float(torch.stack([m.double() for m in means]).mean().item())

    # -----------------------------------------------------------------------------------------
    # Checkpoints
    # -----------------------------------------------------------------------------------------

    def _checkpoint_name(self, slot: int) -> str:
        return f"{self.config.io.name_model}_top{slot}.pth"

    def _save_best_models(self) -> tuple[int, int, Path]:
        """Writes the best models to ``<name_model>_top<k>.pth`` (k = 1 is the best). Only slots
        whose model changed are written, from the last slot to the first: a kill in between
        leaves files from which a resume rebuilds the same top-n. Returns (written, overwritten,
        path of the best)."""
        written = overwritten = 0
        best = Path()
        if not self._is_main_worker:
            return written, overwritten, best
        ranked = list(self._top_n_models)
        for slot in range(len(ranked), 0, -1):
            loss, (model_id, state) = ranked[slot - 1]
            path = self._output_dir / self._checkpoint_name(slot)
            if self._top_file_ids.get(slot) != model_id or not path.exists():
                did_overwrite, path = save_model_state(
                    self._output_dir,
                    self._checkpoint_name(slot),
                    state,
                    loss,
                    extra={"ID": model_id},
                )
                self._top_file_ids[slot] = model_id
                written += 1
                overwritten += int(did_overwrite)
            if slot == 1:
                best = path
        return written, overwritten, best

    def _reload_best_models(self) -> None:
        """Rebuilds the top-n from the checkpoint files of the run directory (after a resume)."""
        if not self._is_main_worker:
            return
        self._top_n_models = TopN(self.config.io.num_models_to_save)
        self._top_file_ids = {}
        seen: set[int] = set()
        for slot in range(1, self.config.io.num_models_to_save + 1):
            path = self._output_dir / self._checkpoint_name(slot)
            if not path.is_file():
                continue
            snapshot = torch_load(path, map_location="cpu")
            model_id = int(snapshot.get("ID", _RESUMED_CHECKPOINT_ID))
            self._top_file_ids[slot] = model_id
            if model_id in seen:
                continue
            seen.add(model_id)
            self._top_n_models.add((float(snapshot["LOSS"]), (model_id, snapshot["MODEL"])))

    def _top_n_has(self, model_id: int) -> bool:
        return any(entry_id == model_id for _, (entry_id, _) in self._top_n_models)

    def _save_training_state(self, batch_i: int, epoch: int) -> None:
        """After a validation (main worker): the best models and the output config with the
        position to chain from."""
        if not self._is_main_worker:
            return
        written, overwritten, best_path = self._save_best_models()
        self._log.debug(f"Saved {written} best model(s) (overwrote {overwritten})")
        self._running_resume_conf.next_batch_index = batch_i
        self._running_resume_conf.next_epoch_index = epoch
        self._running_resume_conf.checkpoint_file = str(best_path)
        self._dump_output_config()
        self._log.debug(f"Saved training state at epoch {epoch}, batch {batch_i}")

    def _write_state_file(
        self,
        loop: _Loop,
        optimizer: Optimizer,
        scheduler: LRScheduler,
        scaler: torch.amp.GradScaler,
        timemem_left: int | None,
        finished: bool,
    ) -> None:
        """The exact-resume state (collective: every rank contributes its RNG state)."""
        if not self.options.save_training_state:
            return
        rng_states = all_gather_objects(capture_rng_state())
        if not self._is_main_worker:
            return
        model = self._unpack_distributed_model(self._model_dist)
        state = {
            "version": STATE_VERSION,
            "finished": finished,
            "config": self._comparable_config(),
            "world_size": self._world_size,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(),
            "rng": rng_states,
            "loop": loop.as_dict(),
            "timemem_left": timemem_left,
            "csv_sizes": {
                "loss": self._log_size(self.options.loss_file_name),
                "timemem": self._log_size(self.options.timemem_file_name),
            },
            "running_resume": self._running_resume_conf.model_dump(mode="json"),
            "training_start": self._running_summary_stats.training_start,
        }
        atomic_torch_save(state, self._state_file)

    def _load_state_file(
        self,
        state: dict[str, Any],
        optimizer: Optimizer,
        scheduler: LRScheduler,
        scaler: torch.amp.GradScaler,
    ) -> _Loop:
        model = self._unpack_distributed_model(self._model_dist)
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"][self._rank])
        # rows logged after this state was written are logged again by the resumed loop
        self._truncate_logs(state["csv_sizes"]["loss"], state["csv_sizes"]["timemem"])
        self.options.track_first_fw_bw_exec_times = state["timemem_left"]
        self._running_resume_conf = ResumeConfig.model_validate(state["running_resume"])
        self._reload_best_models()
        return _Loop(**state["loop"])

    def _log_size(self, name: str) -> int:
        path = (self._output_dir / name).with_suffix(".csv")
        return path.stat().st_size if path.exists() else 0

    def _truncate_logs(self, loss_size: int, timemem_size: int) -> None:
        """Cuts the CSV logs back (main worker; all ranks wait for it)."""
        if self._is_main_worker:
            for name, size in (
                (self.options.loss_file_name, loss_size),
                (self.options.timemem_file_name, timemem_size),
            ):
                path = (self._output_dir / name).with_suffix(".csv")
                if path.exists() and path.stat().st_size > size:
                    with path.open("r+b") as f:
                        f.truncate(size)
        barrier()

    def export_best_safetensors(self) -> Path | None:
        """Writes the best model as ``<name_model>_top1.safetensors`` (main worker), with the
        loss and the config in its metadata. Returns the path, or None when nothing was saved."""
        if not self._is_main_worker or len(self._top_n_models) == 0:
            return None
        from mblm.utils.safetensors import save_safetensors

        loss, (_, state) = self._top_n_models.get_top(1)[0]
        path = self._output_dir / f"{self.config.io.name_model}_top1.safetensors"
        save_safetensors(
            state,
            path,
            metadata={
                "loss": repr(float(loss)),
                "params": self.config.params.model_dump_json(),
                "format": "mblm",
            },
        )
        return path

    # -----------------------------------------------------------------------------------------
    # Training and evaluation
    # -----------------------------------------------------------------------------------------

    def _autocast(self):
        if not self._is_cuda:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.options.amp_dtype)

    def _evaluate(
        self,
        model: torch.nn.Module,
        loader: DataLoader[TBatch],
        items_seen_so_far: int,
        cumulative_batch_idx: int,
        shard: bool = True,
    ) -> float:
        """Mean of the per-batch losses over the loader's first ``max_eval_steps`` batches. With
        ``shard``, batch i is evaluated by rank ``i % world_size`` and the sums are all-reduced,
        so every rank returns the same value the unsharded evaluation gives."""
        # without the DDP wrapper: its forward would run collectives (buffer broadcasts) that
        # ranks evaluating different numbers of batches could not match
        model = self._unpack_distributed_model(model)
        model.eval()
        max_steps = self.config.train.max_eval_steps
        target = min(max_steps, len(loader)) if max_steps else len(loader)
        distributed = shard and is_distributed()
        total, count, elapsed = 0.0, 0, 0.0
        bar = tqdm(
            total=target,
            desc="Evaluating",
            leave=False,
            disable=not (self.options.display_progress and self._is_main_worker),
            mininterval=self.options.valid_prog_min_interval_seconds,
        )
        with bar, torch.inference_mode(), self._autocast():
            for i, batch in enumerate(loader):
                if i == target:
                    break
                bar.update(1)
                if distributed and i % self._world_size != self._rank:
                    continue
                start = perf_counter()
                loss = self.model_forward(cast(TModel, model), batch=batch, device=self._device)
                total += float(loss.item())
                elapsed += perf_counter() - start
                count += 1
        if distributed:
            sums = torch.tensor([total, float(count)], dtype=torch.float64, device=self._device)
            dist.all_reduce(sums)
            total, count = float(sums[0]), int(sums[1])
        if self.options.track_first_fw_bw_exec_times:
            self._write_csv_timemem(
                cum_batch=cumulative_batch_idx,
                kind=ModelMode.VALID,
                fw_time=elapsed,
                bw_time=None,
                num_items=items_seen_so_far,
            )
        return total / max(count, 1)

    def train(
        self,
        train_dataset: DistributedDataset[TBatch],
        valid_dataset: DistributedDataset[TBatch],
    ) -> TModel | None:
        """Trains (retrying up to ``max_train_restarts`` times, each retry resuming from the
        latest training state) and returns the best model, or None when training failed."""
        if not self._running_summary_stats.training_start:
            self._running_summary_stats.training_start = datetime.now().isoformat()
        self.last_error: Exception | None = None

        def on_error(error: Exception, retries_left: int) -> None:
            self._log.fatal(
                f"Training failed, {retries_left}/{self.options.max_train_restarts} retries left"
            )
            self._log.fatal(error, exc_info=True)
            self._running_summary_stats.error = str(error)
            self.last_error = error
            if self.options.display_progress:
                print(error, file=sys.stderr)

        best_model = retry(self.options.max_train_restarts, on_error=on_error)(self._train)(
            train_dataset, valid_dataset
        )
        self._running_summary_stats.training_end = datetime.now().isoformat()
        if best_model is not None:
            self._running_summary_stats.error = None
        self._log_cuda_memory_snapshot(-99)
        self._dump_output_config()
        return best_model

    def _pending_state(self) -> dict[str, Any] | None:
        """The training state to start this attempt from: the one found at construction, or
        (on a retry) the latest one this run wrote."""
        if self._resume_state is not None:
            state, self._resume_state = self._resume_state, None
            return state
        if not self.options.save_training_state:
            return None
        exists = self._state_file.is_file() if self._is_main_worker else False
        if not broadcast_object(exists):
            return None
        state = torch_load(self._state_file, map_location="cpu", mmap=True)
        return None if state["finished"] else state

    def _train(
        self,
        train_dataset: DistributedDataset[TBatch],
        valid_dataset: DistributedDataset[TBatch],
    ) -> TModel:
        if self._is_cuda:
            torch.cuda.empty_cache()
        train_conf = self.config.train
        train_loader = self.get_train_dataloader(train_dataset)
        valid_loader = self.get_valid_dataloader(valid_dataset)
        sampler = train_loader.sampler if isinstance(train_loader.sampler, EpochSampler) else None

        # the budget: global target elements spread over the processes, whole batches
        local_target = train_conf.target_elements // self._world_size
        if train_conf.target_elements_strategy == "batch":
            elements_per_batch = train_conf.batch_size
        else:
            elements_per_batch = train_conf.batch_size * self.config.params.input_seq_len
        local_batch_iters = math.ceil(local_target / elements_per_batch)
        expected_local = local_batch_iters * elements_per_batch
        self._log.debug(
            f"Global target elements: {train_conf.target_elements}, local: {local_target} "
            f"({self._world_size} workers), elements per batch: {elements_per_batch}, "
            f"expected local elements: {expected_local}"
        )
        self._log.info(f"Running {local_batch_iters} batch iterations")

        optimizer = self.configure_optimizer(self._model_dist.parameters())
        local_gradient_steps = local_batch_iters // train_conf.gradient_accumulate_every
        scheduler = self.configure_scheduler(optimizer, local_gradient_steps)
        # loss scaling is needed for float16 autocast only (not for bfloat16, not on CPU)
        scaler = self._scaler = torch.amp.GradScaler(
            self._device_type,
            enabled=self._is_cuda and self.options.amp_dtype == torch.float16,
        )
        # a retry must not accumulate into gradients left by the failed attempt
        optimizer.zero_grad(set_to_none=True)

        state = self._pending_state()
        if state is not None:
            loop = self._load_state_file(state, optimizer, scheduler, scaler)
            self._log.info(
                f"Resumed from the training state at epoch {loop.epoch}, batch {loop.batch} "
                f"({loop.iters_done}/{loop.local_batch_iters} iterations done)"
            )
        else:
            # a retry without a training state starts over: drop the failed attempt's rows
            self._truncate_logs(0, 0)
            epoch = batch = 0
            if self.config.resume:
                epoch = self.config.resume.next_epoch_index
                batch = self.config.resume.next_batch_index
                self._log.debug(f"Chained run: starting at epoch {epoch}, batch {batch}")
            train_dataset.offset_to(epoch)
            seed = int(broadcast_object(torch.initial_seed() % 2**31))
            loop = _Loop(
                epoch=epoch,
                batch=batch,
                iters_done=0,
                local_batch_iters=local_batch_iters,
                start_cum_batch=len(train_loader) * epoch + batch,
                shuffle_seed=seed,
            )
        if sampler is not None:
            sampler.seed = loop.shuffle_seed
        self._log_cuda_memory_snapshot(None)
        log_points, valid_points = self._calc_logging_points(
            loop.local_batch_iters, start_batch_idx=loop.start_cum_batch
        )

        bar = tqdm(
            total=loop.local_batch_iters * elements_per_batch,
            initial=loop.iters_done * elements_per_batch,
            desc="Training",
            unit="B" if train_conf.target_elements_strategy == "sequence" else " samples",
            unit_scale=True,
            mininterval=self.options.train_prog_min_interval_seconds,
            disable=not (self.options.display_progress and self._is_main_worker),
        )
        state_save_due = False
        last_valid_bpb: float | None = None
        with bar:
            while loop.iters_done < loop.local_batch_iters:
                self._log.info(f"Initializing epoch {loop.epoch}")
                train_dataset.offset_to(loop.epoch)
                batches = self._epoch_batches(train_loader, sampler, loop)
                num_batches = len(train_dataset) // train_conf.batch_size
                for batch in batches:
                    epoch, batch_idx = loop.epoch, loop.batch
                    cum = num_batches * epoch + batch_idx
                    is_last_of_epoch = batch_idx == num_batches - 1
                    next_epoch = epoch + 1 if is_last_of_epoch else epoch
                    next_batch = 0 if is_last_of_epoch else batch_idx + 1
                    steps = (batch_idx + 1) % train_conf.gradient_accumulate_every == 0

                    loss_value = self._forward_backward(batch, steps, cum, loop)
                    loop.elements_seen += elements_per_batch
                    loop.iters_done += 1
                    loop.epoch, loop.batch = next_epoch, next_batch
                    bar.update(elements_per_batch)

                    if cum in log_points:
                        self._log.info(f"[{cum}] Training loss: {loss_value}")
                        self._write_csv_loss(
                            ModelMode.TRAIN,
                            loss=loss_value,
                            epoch=epoch,
                            batch=batch_idx,
                            cum_batch=cum,
                            elements_seen=loop.elements_seen,
                            lr=scheduler.get_last_lr()[0],
                            avg_grad=loop.avg_grad,
                            avg_grad_clipped=loop.avg_grad_clipped,
                        )
                    if steps:
                        self._optimizer_step(optimizer, scheduler, loop)
                    postfix = {"loss": f"{loss_value:.3f}"}
                    if last_valid_bpb is not None:
                        postfix["valid_bpb"] = f"{last_valid_bpb:.3f}"
                    bar.set_postfix(postfix, refresh=False)

                    if not self.options.skip_validation and cum in valid_points:
                        valid_loss = self._validate(
                            valid_loader, loop.elements_seen, cum, epoch, batch_idx
                        )
                        last_valid_bpb = valid_loss / _LN2
                        self._save_training_state(next_batch, next_epoch)
                        state_save_due = True

                    done = loop.iters_done == loop.local_batch_iters
                    if state_save_due and (steps or done):
                        # only between optimizer steps: no partly accumulated gradients to keep
                        self._write_state_file(
                            loop,
                            optimizer,
                            scheduler,
                            scaler,
                            self.options.track_first_fw_bw_exec_times,
                            finished=False,
                        )
                        state_save_due = False
                    if done:
                        break

        if loop.elements_seen != expected_local:
            self._log.fatal(
                f"Mismatch between expected and actual elements seen: {expected_local}, "
                f"{loop.elements_seen}"
            )
        self._log.info("Finished training")
        self._log.info(f"Stats (local): Elements seen: {loop.elements_seen}")
        self._write_state_file(
            loop,
            optimizer,
            scheduler,
            scaler,
            self.options.track_first_fw_bw_exec_times,
            finished=True,
        )

        best_model = self._unpack_distributed_model(self._model_dist)
        if self._is_main_worker and len(self._top_n_models) > 0:
            ((least_loss, (_, best_state)),) = self._top_n_models.get_top(1)
            best_model.load_state_dict(best_state)
            self._log.info(f"Returning model with least loss ({least_loss})")
            if self.options.export_safetensors:
                path = self.export_best_safetensors()
                self._log.info(f"Exported the best model to {path}")
        self._log_cuda_memory_snapshot(None)
        return best_model

    def _epoch_batches(
        self, loader: DataLoader, sampler: EpochSampler | None, loop: _Loop
    ) -> Iterator[Any]:
        """The batches of ``loop.epoch`` from ``loop.batch`` on."""
        batch_size = self.config.train.batch_size
        num_batches = len(loader.dataset) // batch_size  # type: ignore[arg-type]
        if num_batches == 0:
            raise ValueError(
                f"The training data of rank {self._rank} has {len(loader.dataset)} samples "  # type: ignore[arg-type]
                f"in epoch {loop.epoch}, fewer than one batch of {batch_size}"
            )
        if loop.batch >= num_batches:
            raise IndexError(
                f"start_batch ({loop.batch}) is larger than the length of the sequence "
                f"({num_batches})"
            )
        if sampler is not None:
            sampler.set_epoch(loop.epoch, start=loop.batch * batch_size)
            return iter(loader)
        # a custom loader without an EpochSampler: skip by iterating (the batches are read)
        items = iter(loader)
        for _ in range(loop.batch):
            next(items)
        return items

    def _forward_backward(self, batch: TBatch, steps: bool, cum: int, loop: _Loop) -> float:
        """Forward and backward of one micro-batch (gradients accumulate). Returns the
        undivided loss."""
        self._model_dist.train()
        # DDP all-reduces gradients only on the micro-batch that completes an accumulation
        sync = (
            nullcontext()
            if steps or not isinstance(self._model_dist, DistributedDataParallel)
            else self._model_dist.no_sync()
        )
        with sync:
            with self._autocast():
                start_fw = perf_counter()
                loss = self.model_forward(
                    cast(TModel, self._model_dist), batch=batch, device=self._device
                )
                fw_time = perf_counter() - start_fw
            loss_value = float(loss.item())
            if math.isnan(loss_value):
                shape = batch.shape if isinstance(batch, torch.Tensor) else batch[0].shape
                self._log.error(
                    f"Invalid loss at batch {loop.batch}, epoch {loop.epoch}. "
                    f"Train loss (raw): {loss_value}, batch: {shape}"
                )
            start_bw = perf_counter()
            self._scaler.scale(loss / self.config.train.gradient_accumulate_every).backward()
            bw_time = perf_counter() - start_bw

        if self.options.track_first_fw_bw_exec_times:
            self.options.track_first_fw_bw_exec_times -= 1
            self._write_csv_timemem(
                cum_batch=cum,
                num_items=self.config.train.batch_size,
                kind=ModelMode.TRAIN,
                fw_time=fw_time,
                bw_time=bw_time,
            )
        return loss_value

    def _optimizer_step(self, optimizer: Optimizer, scheduler: LRScheduler, loop: _Loop) -> None:
        """Unscale, record the mean gradient before and after clipping, step, schedule."""
        scaler = self._scaler
        scaler.unscale_(optimizer)
        loop.avg_grad = self.avg_gradient_value()
        if (max_norm := self.config.train.gradient_clipping) is not None:
            torch.nn.utils.clip_grad_norm_(self._model_dist.parameters(), max_norm)
        loop.avg_grad_clipped = self.avg_gradient_value()
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        # a skipped (inf/NaN) fp16 step lowers the scale: do not advance the schedule then
        if scheduler is not None and not scale_before > scaler.get_scale():
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def _validate(
        self, valid_loader: DataLoader, elements_seen: int, cum: int, epoch: int, batch_idx: int
    ) -> float:
        valid_loss = self._evaluate(
            self._model_dist,
            valid_loader,
            items_seen_so_far=elements_seen,
            cumulative_batch_idx=cum,
        )
        self._log.info(
            f"[{cum}] Validation loss: {valid_loss} ({valid_loss / _LN2:.4f} bits per element)"
        )
        self._write_csv_loss(
            ModelMode.VALID,
            loss=valid_loss,
            epoch=epoch,
            batch=batch_idx,
            cum_batch=cum,
            elements_seen=elements_seen,
            lr=-1,
            avg_grad=-1,
            avg_grad_clipped=-1,
        )
        barrier()
        if self._is_main_worker and not self._top_n_has(cum):
            model = self._unpack_distributed_model(self._model_dist)
            self._top_n_models.add((valid_loss, (cum, _cpu_copy(model.state_dict()))))
        self.last_valid_loss = valid_loss
        return valid_loss

    def test(self, test_dataset: DistributedDataset[TBatch], model: torch.nn.Module) -> None:
        """Evaluates ``model`` on the test set (main worker only) and logs a ``test`` row."""
        if not self._is_main_worker:
            return
        test_loader = self.get_test_dataloader(test_dataset)
        self._log.info("Started testing")
        model.eval()
        test_loss = self._evaluate(model, test_loader, -1, -1, shard=False)
        self.last_test_loss = test_loss
        self._log.info(f"Test loss: {test_loss} ({test_loss / _LN2:.4f} bits per element)")
        self._write_csv_loss(
            ModelMode.TEST,
            loss=test_loss,
            elements_seen=-1,
            epoch=-1,
            batch=-1,
            cum_batch=-1,
            lr=-1,
            avg_grad=-1,
            avg_grad_clipped=-1,
        )
        self._log.info("Finished testing")

    @property
    def output_dir(self) -> Path:
        """The run directory."""
        return self._output_dir


def _cpu_copy(state: StateDict) -> StateDict:
    return {
        k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
        for k, v in state.items()
    }


def _config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Paths (``params.hidden_dims``) where two config dumps differ, with both values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(current), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += _config_differences(saved.get(key), current.get(key), path)
        return out
    if saved != current:
        return [f"{prefix}: saved {saved!r}, now {current!r}"]
    return []


__all__ = ["CoreTrainer", "CoreTrainerOptions", "epoch_cycler", "TModel", "TBatch"]
