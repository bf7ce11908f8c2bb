import pytest
import torch

from mblm.data.datasets import DatasetConfigError, DistributedDataset


class Seq(DistributedDataset[torch.Tensor]):
    def __init__(self, n: int, sequential: bool = True, **config):
        self.data = torch.arange(n)
        super().__init__(data_size=n, is_sequential=sequential, **config)

    def get_sample(self, from_idx: int) -> torch.Tensor:
        return self.data[from_idx : from_idx + (self.seq_len if self.is_sequential else 1)]


def test_sequential_windows_per_worker():
    ds = [Seq(100, seq_len=10, worker_id=w, num_workers=3) for w in range(3)]
    # 33 elements per worker (1 dropped), 3 windows each
    assert [len(d) for d in ds] == [3, 3, 3]
    assert ds[1][0].tolist() == list(range(33, 43))
    assert ds[2][2].tolist() == list(range(86, 96))


def test_offset_shifts_windows_and_length():
    d = Seq(40, seq_len=10, worker_id=0, num_workers=1)
    assert len(d) == 4
    d.offset_to(13)  # 13 % 10
    assert d.sample_offset == 3 and len(d) == 3
    assert d[0].tolist() == list(range(3, 13))
    d.offset_one()
    assert d.sample_offset == 4
    assert d.offset_to(10).sample_offset == 0


def test_non_sequential_ignores_offset():
    d = Seq(10, sequential=False, seq_len=5, worker_id=1, num_workers=2)
    assert len(d) == 5 and d[0].tolist() == [5]
    assert d.offset_to(3).sample_offset == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(seq_len=10, worker_id=0, num_workers=0), "num_workers must be positive"),
        (dict(seq_len=10, worker_id=2, num_workers=2), r"worker_id \(2\) must be smaller"),
        (dict(seq_len=60, worker_id=0, num_workers=2), "Worker's data is too small"),
    ],
)
def test_bad_split_raises(kwargs, match):
    with pytest.raises(DatasetConfigError, match=match):
        Seq(100, **kwargs)
    with pytest.raises(AssertionError):  # the original asserted
        Seq(100, **kwargs)
