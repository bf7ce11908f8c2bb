"""Config schema of a training run (YAML ``params`` / ``train`` / ``io`` / ``resume``, plus the
``summary`` written into a run's output config) and the CSV row types of its logs.

Experiments subclass the core classes to add fields; ``GenericEntryConfig`` ties the three
parts together.
"""

from __future__ import annotations

from typing import Generic, Literal, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field


class CoreModelParams(BaseModel):
    """Model parameters every trainer needs."""

    input_seq_len: int = Field(
        description="Length of one training sample (the context size for language modelling)"
    )


class CoreTrainConfig(BaseModel):
    """Optimisation parameters of ``CoreTrainer``."""

    target_elements: int = Field(
        description="Lower bound of elements to train on across all processes (the run trains "
        "a whole number of batches, so slightly more)"
    )
    target_elements_strategy: Literal["batch", "sequence"] = Field(
        description="How a batch counts towards target_elements: 'batch' = its number of "
        "samples, 'sequence' = samples x input_seq_len (e.g. bytes)"
    )
    warmup_steps_perc: float = Field(
        default=0.1,
        description="Fraction in [0, 1] of the gradient steps used for linear warm-up; cosine "
        "annealing follows",
    )
    batch_size: int = Field(description="Per-process batch size")
    shuffle_train: bool = Field(
        default=False,
        description="Shuffle the training samples (do not when chaining runs)",
    )
    shuffle_eval: bool = Field(default=False, description="Shuffle the validation samples")
    max_eval_steps: int | None = Field(
        default=None, description="At most this many validation batches per validation"
    )
    learning_rate: float = Field(description="Peak learning rate")
    gradient_clipping: float | None = Field(
        default=None, description="Clip the gradient norm to this value"
    )
    gradient_accumulate_every: int = Field(
        description="Batches whose gradients are accumulated per optimizer step"
    )


class TrainMaskedConfig(CoreTrainConfig):
    """Training parameters of masked language modelling (``MaskedTrainer``)."""

    masking_proba: float = Field(description="Probability of masking a token")


class ResumeConfig(BaseModel):
    """Where to resume from. A finished run's output config holds one, so launching that config
    again chains a new run onto it."""

    checkpoint_file: str = Field(description="Model checkpoint (.pth) to start from")
    next_epoch_index: int = Field(description="Epoch to resume at")
    next_batch_index: int = Field(description="Batch index within that epoch to resume at")
    migrate_embeddings: bool = Field(
        default=False, description="Grow smaller embeddings of the checkpoint to the model's"
    )
    rename_modules: bool = Field(
        default=False, description="Rename checkpoint modules to the model's names"
    )
    resumed_from: str | None = Field(
        default=None,
        description="The checkpoint the run that wrote this config had started from (traces "
        "chains of runs)",
    )


class CoreIoConfig(BaseModel):
    """Input/output parameters of ``CoreTrainer``."""

    name_model: str = Field(description="Model name: run directory and checkpoint file prefix")
    output_dir: str = Field(
        description="Directory for all runs; each run gets <output_dir>/<name_model>_<run id>"
    )
    num_models_to_save: int = Field(
        description="How many of the best validated models to keep as checkpoints"
    )
    validate_amount: int = Field(
        description="How many validations (evenly spaced) in a run; should be >= num_models_to_save"
    )
    log_train_loss_amount: int = Field(description="How many training-loss rows in a run")
    enabled_loss_log_for_gpus: list[int] = Field(
        default=[0], description="Global ranks that write their rows to the CSV loss log"
    )


TModelParams = TypeVar("TModelParams", covariant=True, bound=CoreModelParams)
TTrainConfig = TypeVar("TTrainConfig", covariant=True, bound=CoreTrainConfig)
TIoConfig = TypeVar("TIoConfig", covariant=True, bound=CoreIoConfig)


class SummaryStats(BaseModel):
    """Facts about a run, written into its output config."""

    training_start: str
    training_end: str
    num_workers: int
    cuda_devices: list[str]
    parameter_count: int
    error: str | None


class GenericEntryConfig(BaseModel, Generic[TModelParams, TTrainConfig, TIoConfig]):
    """A training config: ``params``, ``train``, ``io`` and an optional ``resume``. Other
    top-level keys (such as an output config's ``summary``) are ignored."""

    model_config = ConfigDict(strict=True)

    params: TModelParams
    train: TTrainConfig
    io: TIoConfig
    resume: ResumeConfig | None = None


class GenericOutputConfig(BaseModel, Generic[TModelParams, TTrainConfig, TIoConfig]):
    """The config a run writes: its entry config plus where to resume and a summary."""

    model_config = ConfigDict(strict=True)

    params: TModelParams
    train: TTrainConfig
    io: TIoConfig
    resume: ResumeConfig
    summary: SummaryStats


class CSVLossEntry(NamedTuple):
    """A row of ``loss.csv``."""

    gpu_rank: int
    timestamp: str
    elements_seen: int
    kind: str
    epoch: int
    batch: int
    cum_batch: int
    loss: float
    lr: float
    avg_grad: float
    avg_grad_clipped: float


class CSVTimeAndMemSnapshotEntry(NamedTuple):
    """A row of ``timemem.csv``."""

    cum_batch: int
    num_items: int
    kind: str
    fw_time: float
    bw_time: float | None
    allocated: float
    allocated_max: float
    reserved: float
    reserved_max: float
    total: float
