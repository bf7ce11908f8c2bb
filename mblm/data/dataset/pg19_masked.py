"""PG19 for masked language modelling (MBLMEncoder): random positions are replaced by a mask id.

Same directory layout and reading as ``mblm.data.dataset.pg19``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from typing_extensions import Unpack

from mblm.data.dataset.pg19 import _BookAccess, _BookSplit
from mblm.data.datasets import DistributedDataset, DistributedDatasetConfig
from mblm.data.types import BatchMaskedForMLM, ModelMode

if TYPE_CHECKING:
    from mblm.train.mblm import TrainMaskedEntryConfig


class PG19Masked(_BookAccess, DistributedDataset[BatchMaskedForMLM]):
    """Sequential dataset of ``(masked ids, mask, labels)``: each byte is masked with
    probability ``masking_proba`` (drawn from torch's global generator). A window shorter than
    ``seq_len`` is right-padded with ``padding_token_id`` (mask False there)."""

    def __init__(
        self,
        data_dir: str | Path,
        mode: ModelMode,
        masked_token_id: int = -100,
        masking_proba: float = 0.15,
        load_mininterval: int = 30,
        display_load_progress: bool = True,
        padding_token_id: int = -101,
        **config: Unpack[DistributedDatasetConfig],
    ):
        if masked_token_id == padding_token_id:
            raise ValueError("You can't set the padding and the mask with the same value")
        split = _BookSplit(data_dir, mode, "PG19Masked")
        self.txt_files: list[Path] = split.files
        self.masking_proba = masking_proba
        self.masked_token_id = masked_token_id
        self.padding_token_id = padding_token_id
        super().__init__(data_size=split.total, is_sequential=True, **config)
        self.data = split.read(
            self._worker_range_start,
            self._worker_range_end,
            load_mininterval,
            display_load_progress,
        )

    @staticmethod
    def from_train_entry_config(
        config: TrainMaskedEntryConfig,
        mode: ModelMode,
        worker_id: int,
        num_workers: int,
    ) -> DistributedDataset[BatchMaskedForMLM]:
        return PG19Masked(
            data_dir=config.io.dataset_dir,
            mode=mode,
            masked_token_id=config.params.mask_token_id,
            masking_proba=config.train.masking_proba,
            padding_token_id=config.params.mblm_config.pad_token_id,
            seq_len=config.params.input_seq_len,
            worker_id=worker_id,
            num_workers=num_workers,
        )

    @staticmethod
    def supports_test_mode() -> bool:
        return True

    def get_sample(self, from_idx: int) -> BatchMaskedForMLM:
        start = from_idx - self._worker_range_start
        labels = self.data[start : start + self.seq_len].long()
        mask = torch.rand(labels.shape) < self.masking_proba
        masked = labels.masked_fill(mask, self.masked_token_id)
        missing = self.seq_len - labels.numel()
        if missing > 0:
            pad = torch.full((missing,), self.padding_token_id, dtype=torch.long)
            masked = torch.cat([masked, pad])
            labels = torch.cat([labels, pad])
            mask = torch.cat([mask, torch.zeros(missing, dtype=torch.bool)])
        return masked.long(), mask.bool(), labels.long()
