"""Placeholder for the BEEP dataset of the original package: registered as ``"beep"`` in the
masked dataset registry when this module is imported, but it has no data reader yet."""

from __future__ import annotations

from pathlib import Path

from typing_extensions import Unpack

from mblm.data.datasets import DistributedDataset, DistributedDatasetConfig
from mblm.data.types import BatchMaskedForMLM, ModelMode
from mblm.train.mblm import TrainMaskedEntryConfig, masked_dataset_registry


@masked_dataset_registry.register("beep")
class Beep(DistributedDataset[BatchMaskedForMLM]):
    """Stub: sized like a real dataset (10,000 train / 2,000 validation elements), but
    ``get_sample`` raises NotImplementedError."""

    def __init__(
        self,
        mode: ModelMode,
        data_dir: str | Path,
        **args: Unpack[DistributedDatasetConfig],
    ):
        if mode == ModelMode.TEST:
            raise ValueError("Beep has no test split")
        self.data_dir = Path(data_dir)
        self._data = list(range(10_000 if mode == ModelMode.TRAIN else 2_000))
        super().__init__(data_size=len(self._data), is_sequential=True, **args)

    def get_sample(self, from_idx: int) -> BatchMaskedForMLM:
        raise NotImplementedError("The Beep dataset has no data reader yet")

    @staticmethod
    def from_train_entry_config(
        config: TrainMaskedEntryConfig,
        mode: ModelMode,
        worker_id: int,
        num_workers: int,
    ) -> DistributedDataset[BatchMaskedForMLM]:
        return Beep(
            mode=mode,
            data_dir=config.io.dataset_dir,
            seq_len=config.params.input_seq_len,
            worker_id=worker_id,
            num_workers=num_workers,
        )

    @staticmethod
    def supports_test_mode() -> bool:
        return False
