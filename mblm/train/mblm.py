"""Training MBLM (and MBLMEncoder): configs, dataset registries, trainers and entry points.

``train_mblm(config)`` is what a training script calls, under ``torchrun`` (one process per
device; DDP over NCCL on GPUs, Gloo on CPUs) or as a plain single process::

    torchrun --standalone --nproc_per_node=gpu train_my_mblm.py   # or: python train_my_mblm.py

Datasets are looked up by ``io.dataset_id`` in ``dataset_registry`` (built in: ``pg19``,
``clevr``, ``python_sources``); register your own with ``@dataset_registry.register("id")``.
"""

from __future__ import annotations

import math
import os
from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import torch
from pydantic import Field
from torch.optim import Adam, Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from mblm.data.dataset.clevr import Clevr
from mblm.data.dataset.pg19 import PG19
from mblm.data.dataset.pg19_masked import PG19Masked
from mblm.data.dataset.python_sources import PythonSourceCorpus
from mblm.data.datasets import DistributedDataset
from mblm.data.types import BatchMaskedForMLM, BatchWithLossMask, ModelMode
from mblm.model.config import MBLMEncoderModelConfig, MBLMModelConfig, MBLMReturnType
from mblm.model.embeddings import MBLM_TOKEN_EMB_MIGRATION
from mblm.model.mblm import MBLM, MBLMEncoder
from mblm.model.utils import count_params
from mblm.train.core.config import (
    CoreIoConfig,
    CoreModelParams,
    CoreTrainConfig,
    GenericEntryConfig,
    GenericOutputConfig,
    TrainMaskedConfig,
)
from mblm.train.core.trainer import CoreTrainer, CoreTrainerOptions
from mblm.utils.distributed import process_group
from mblm.utils.logging import create_logger


class TrainMBLMParams(MBLMModelConfig, CoreModelParams):
    """``params`` of an MBLM training config: the model config plus ``input_seq_len``."""


class TrainMaskedMBLMParams(MBLMEncoderModelConfig, CoreModelParams):
    """``params`` of an MBLMEncoder training config."""


class TrainMBLMIoConfig(CoreIoConfig):
    """``io`` of an MBLM training config: the core fields plus the dataset."""

    dataset_dir: str = Field(description="Path to the dataset folder")
    dataset_id: str = Field(description="Id of the dataset in the dataset registry")
    dataset_args: dict[str, Any] | None = Field(
        default=None, description="Optional arguments passed to the dataset"
    )
    description: str | None = Field(default=None, description="A description of the experiment")


class TrainOutputConfig(GenericOutputConfig[TrainMBLMParams, CoreTrainConfig, TrainMBLMIoConfig]):
    """The ``config.yaml`` an MBLM training run writes."""


class TrainEntryConfig(GenericEntryConfig[TrainMBLMParams, CoreTrainConfig, TrainMBLMIoConfig]):
    """A complete MBLM training config (the YAML schema of ``configs/*.yaml``)."""


class TrainMaskedEntryConfig(
    GenericEntryConfig[TrainMaskedMBLMParams, TrainMaskedConfig, TrainMBLMIoConfig]
):
    """A complete MBLMEncoder (masked LM) training config."""


class MBLMTrainerDatasetImpl(Protocol):
    """What a dataset class provides to be used by ``train_mblm``."""

    @staticmethod
    @abstractmethod
    def from_train_entry_config(
        config: TrainEntryConfig, mode: ModelMode, worker_id: int, num_workers: int
    ) -> DistributedDataset[BatchWithLossMask]:
        """The dataset of split ``mode`` for worker ``worker_id`` of ``num_workers``."""
        ...

    @staticmethod
    @abstractmethod
    def supports_test_mode() -> bool:
        """Whether the dataset has a test split with targets."""
        ...


class MaskedMBLMTrainerDatasetImpl(Protocol):
    """What a dataset class provides to be used by ``train_encoder_mblm``."""

    @staticmethod
    @abstractmethod
    def from_train_entry_config(
        config: TrainMaskedEntryConfig, mode: ModelMode, worker_id: int, num_workers: int
    ) -> DistributedDataset[BatchMaskedForMLM]: ...

    @staticmethod
    @abstractmethod
    def supports_test_mode() -> bool: ...


TDataset = TypeVar("TDataset", bound="MBLMTrainerDatasetImpl")
TMaskedDataset = TypeVar("TMaskedDataset", bound="MaskedMBLMTrainerDatasetImpl")


class _Registry(dict):
    """A dict of dataset classes by id."""

    kind = "dataset"

    def register(self, dataset_id: str) -> Callable[[type], type]:
        """Class decorator registering a dataset under ``dataset_id`` (replacing an earlier
        one)."""

        def decorator(dataset_class: type) -> type:
            self[dataset_id] = dataset_class
            return dataset_class

        return decorator

    def retrieve(self, dataset_id: str):
        """The dataset registered as ``dataset_id``; KeyError naming the known ids otherwise."""
        try:
            return self[dataset_id]
        except KeyError:
            known = ", ".join(sorted(self)) or "none"
            raise KeyError(
                f"no {self.kind} registered as {dataset_id!r} (registered: {known}); register "
                "yours with @dataset_registry.register(...) before training"
            ) from None


class DatasetRegistry(_Registry):
    """Datasets usable by ``train_mblm``, by id."""

    def register(self, dataset_id: str) -> Callable[[type[TDataset]], type[TDataset]]:
        """Class decorator: ``@dataset_registry.register("my_dataset")``."""
        return super().register(dataset_id)

    def retrieve(self, dataset_id: str) -> MBLMTrainerDatasetImpl:
        return super().retrieve(dataset_id)


class MaskedDatasetRegistry(_Registry):
    """Datasets usable by ``train_encoder_mblm``, by id."""

    kind = "masked dataset"

    def register(self, dataset_id: str) -> Callable[[type[TMaskedDataset]], type[TMaskedDataset]]:
        return super().register(dataset_id)

    def retrieve(self, dataset_id: str) -> MaskedMBLMTrainerDatasetImpl:
        return super().retrieve(dataset_id)


def _warmup_cosine(
    optimizer: Optimizer, local_gradient_steps: int, warmup_perc: float
) -> LRScheduler:
    """Linear warm-up from 10% of the LR over ``floor(steps * warmup_perc)`` steps, then cosine
    annealing to 0 over the remaining steps."""
    warmup = math.floor(local_gradient_steps * warmup_perc)
    return SequentialLR(
        optimizer,
        [
            LinearLR(optimizer, start_factor=0.1, end_factor=1, total_iters=warmup),
            # at least one step: a run with no steps after warm-up must not divide by zero
            CosineAnnealingLR(optimizer, T_max=max(local_gradient_steps - warmup, 1)),
        ],
        milestones=[warmup],
    )


class MegabyteTrainer(
    CoreTrainer[MBLM, BatchWithLossMask, TrainMBLMParams, CoreTrainConfig, CoreIoConfig]
):
    """Trains MBLM on ``(inputs, loss_mask)`` batches with Adam (betas 0.9, 0.95) and warm-up +
    cosine LR."""

    def init_model(self) -> MBLM:
        params = self.config.params
        return MBLM(
            MBLMModelConfig(
                num_tokens=params.num_tokens,
                hidden_dims=tuple(params.hidden_dims),
                seq_lens=tuple(params.seq_lens),
                pad_token_id=params.pad_token_id,
                num_layers=tuple(params.num_layers),
                train_checkpoint_chunks=params.train_checkpoint_chunks,
                block=params.block,
            )
        )

    def model_forward(self, model: MBLM, batch: BatchWithLossMask, device: str) -> torch.Tensor:
        inputs, loss_mask = batch
        return model.forward(
            inputs.to(device), return_type=MBLMReturnType.LOSS, loss_mask=loss_mask.to(device)
        )

    def configure_optimizer(self, parameters: Iterator[torch.nn.Parameter]) -> Optimizer:
        return Adam(parameters, lr=self.config.train.learning_rate, betas=(0.9, 0.95))

    def configure_scheduler(self, optimizer: Optimizer, local_gradient_steps: int) -> LRScheduler:
        return _warmup_cosine(optimizer, local_gradient_steps, self.config.train.warmup_steps_perc)

    def configure_run_id(self) -> str:
        return os.getenv("JOB_ID") or super().configure_run_id()

    def configure_count_parameters(self, model: MBLM) -> tuple[int, dict[str, int]]:
        return count_params(model)

    def migrate_embeddings_if_enabled(self) -> set[str]:
        # checkpoints of older mblm versions (trained without modality tokens) have fewer
        # embedding rows
        return MBLM_TOKEN_EMB_MIGRATION


class MaskedTrainer(
    CoreTrainer[
        MBLMEncoder, BatchMaskedForMLM, TrainMaskedMBLMParams, TrainMaskedConfig, CoreIoConfig
    ]
):
    """Trains MBLMEncoder on ``(masked inputs, mask, labels)`` batches."""

    def init_model(self) -> MBLMEncoder:
        return MBLMEncoder(
            MBLMEncoderModelConfig(
                mask_token_id=self.config.params.mask_token_id,
                mblm_config=self.config.params.mblm_config,
            )
        )

    def model_forward(
        self, model: MBLMEncoder, batch: BatchMaskedForMLM, device: str
    ) -> torch.Tensor:
        masked, mask, labels = batch
        return model.forward(  # type: ignore[call-overload]
            input_ids=masked.to(device),
            attention_mask=mask.to(device),
            labels=labels.to(device),
            return_type=MBLMReturnType.LOSS,
        )

    def configure_optimizer(self, parameters: Iterator[torch.nn.Parameter]) -> Optimizer:
        return Adam(parameters, lr=self.config.train.learning_rate, betas=(0.9, 0.95))

    def configure_scheduler(self, optimizer: Optimizer, local_gradient_steps: int) -> LRScheduler:
        return _warmup_cosine(optimizer, local_gradient_steps, self.config.train.warmup_steps_perc)

    def configure_run_id(self) -> str:
        return os.getenv("JOB_ID") or super().configure_run_id()

    def configure_count_parameters(self, model: MBLMEncoder) -> tuple[int, dict[str, int]]:
        return count_params(model)


dataset_registry = DatasetRegistry()
dataset_registry.register("pg19")(PG19)
dataset_registry.register("clevr")(Clevr)
dataset_registry.register("python_sources")(PythonSourceCorpus)

masked_dataset_registry = MaskedDatasetRegistry()
masked_dataset_registry.register("pg19masked")(PG19Masked)


class TrainingFailedError(RuntimeError):
    """Training ended without a model (the cause is chained and in the run's log)."""


def _run(
    config: GenericEntryConfig,
    registry: _Registry,
    trainer_class: type[CoreTrainer],
    options: CoreTrainerOptions | None,
) -> CoreTrainer:
    log = create_logger("mblm.train.mblm", log_dir=config.io.output_dir)
    try:
        with process_group() as run_vars:
            dataset = registry.retrieve(config.io.dataset_id)
            train_dataset = dataset.from_train_entry_config(
                config,
                mode=ModelMode.TRAIN,
                worker_id=run_vars.global_rank,
                num_workers=run_vars.world_size,
            )
            valid_dataset = dataset.from_train_entry_config(
                config, mode=ModelMode.VALID, worker_id=0, num_workers=1
            )
            trainer = trainer_class(config, run_vars=run_vars, options=options)
            best_model = trainer.train(train_dataset, valid_dataset)
            if best_model is None:
                raise TrainingFailedError(
                    f"training failed: {trainer.last_error}"
                ) from trainer.last_error
            if dataset.supports_test_mode():
                test_dataset = dataset.from_train_entry_config(
                    config, mode=ModelMode.TEST, worker_id=0, num_workers=1
                )
                trainer.test(test_dataset, best_model)
            return trainer
    except Exception as error:
        log.fatal(error, exc_info=True)
        raise


def train_mblm(config: TrainEntryConfig, options: CoreTrainerOptions | None = None) -> CoreTrainer:
    """Trains MBLM as ``config`` says, in this process or as one of torchrun's processes.

    Writes the run directory ``<io.output_dir>/<io.name_model>_<run id>`` (run id: ``JOB_ID``
    or the start time) and evaluates the best model on the test split when the dataset has one.
    A run directory holding an unfinished training state (a restarted worker group, the same
    ``JOB_ID`` again) is resumed exactly. Errors are logged to
    ``<io.output_dir>/mblm.train.mblm.log`` and raised (so that torchrun sees the failure).
    Returns the trainer (``trainer.output_dir`` is the run directory).
    """
    return _run(config, dataset_registry, MegabyteTrainer, options)


def train_encoder_mblm(
    config: TrainMaskedEntryConfig, options: CoreTrainerOptions | None = None
) -> CoreTrainer:
    """Trains MBLMEncoder (masked LM) like ``train_mblm`` (datasets from
    ``masked_dataset_registry``)."""
    return _run(config, masked_dataset_registry, MaskedTrainer, options)
