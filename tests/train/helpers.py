"""A tiny in-memory dataset and a tiny model config for fast trainer tests (also imported by the
torchrun worker script ``run_train.py``)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from mblm import TransformerBlock
from mblm.data.datasets import DistributedDataset, DistributedDatasetConfig
from mblm.data.types import BatchWithLossMask, ModelMode
from mblm.train.core.config import CoreTrainConfig
from mblm.train.mblm import (
    TrainEntryConfig,
    TrainMBLMIoConfig,
    TrainMBLMParams,
    dataset_registry,
)

TEXT = b"".join(
    b"%02d the quick brown fox jumps over the lazy dog\n" % (i % 100) for i in range(55)
)


@dataset_registry.register("tiny_text")
class TinyText(DistributedDataset[BatchWithLossMask]):
    def __init__(self, mode: ModelMode, **config: DistributedDatasetConfig):
        data = TEXT if mode == ModelMode.TRAIN else TEXT[: len(TEXT) // 4]
        self.data = torch.tensor(list(data), dtype=torch.long)
        super().__init__(data_size=len(data), is_sequential=True, **config)

    def get_sample(self, from_idx: int) -> BatchWithLossMask:
        x = self.data[from_idx : from_idx + self.seq_len]
        return x, torch.ones_like(x, dtype=torch.float)

    @staticmethod
    def from_train_entry_config(config, mode, worker_id, num_workers):
        return TinyText(
            mode, seq_len=config.params.input_seq_len, worker_id=worker_id, num_workers=num_workers
        )

    @staticmethod
    def supports_test_mode() -> bool:
        return True


def tiny_config(output_dir: str | Path, **train_overrides) -> TrainEntryConfig:
    train = dict(
        batch_size=4,
        target_elements=4 * 32 * 24,
        target_elements_strategy="sequence",
        learning_rate=1e-2,
        gradient_accumulate_every=2,
        gradient_clipping=1.0,
        shuffle_train=True,
        max_eval_steps=4,
    )
    train.update(train_overrides)
    return TrainEntryConfig(
        io=TrainMBLMIoConfig(
            dataset_dir="unused",
            dataset_id="tiny_text",
            name_model="tiny",
            output_dir=str(output_dir),
            num_models_to_save=2,
            validate_amount=6,
            log_train_loss_amount=24,
        ),
        train=CoreTrainConfig(**train),
        params=TrainMBLMParams(
            input_seq_len=32,
            num_tokens=257,
            hidden_dims=[32, 16],
            seq_lens=[8, 4],
            num_layers=[1, 1],
            pad_token_id=256,
            train_checkpoint_chunks=None,
            block=[
                TransformerBlock(
                    attn_head_dims=8,
                    attn_num_heads=2,
                    attn_use_rot_embs=True,
                    attn_dropout=0.1,
                    pos_emb_type="fixed",
                ),
                TransformerBlock(
                    attn_head_dims=8,
                    attn_num_heads=2,
                    attn_use_rot_embs=True,
                    pos_emb_type="fixed",
                ),
            ],
        ),
    )


def read_loss_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "loss.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def without_timestamps(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "timestamp"} for r in rows]
