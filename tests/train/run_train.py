"""Worker script for the torchrun tests: trains the tiny config into argv[1].

Env: KILL_AT_ITER=n makes the first attempt (TORCHELASTIC_RESTART_COUNT 0) of global rank 1 kill
itself with SIGKILL at its n-th training forward.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mblm.train.core.trainer import CoreTrainerOptions  # noqa: E402
from mblm.train.mblm import MegabyteTrainer, train_mblm  # noqa: E402
from mblm.utils.seed import seed_everything  # noqa: E402
from train.helpers import tiny_config  # noqa: E402

kill_at = int(os.environ.get("KILL_AT_ITER", "0"))
if (
    kill_at
    and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    and os.environ["RANK"] == "1"
):
    calls = {"n": 0}
    forward = MegabyteTrainer.model_forward

    def killing_forward(self, model, batch, device):
        if model.training:
            calls["n"] += 1
            if calls["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return forward(self, model, batch, device)

    MegabyteTrainer.model_forward = killing_forward

_write_state = MegabyteTrainer._write_state_file


def reporting_write_state(self, loop, *args, finished, **kwargs):
    if finished:  # every rank, before the main rank loads the best model: the latest weights
        model = self._unpack_distributed_model(self._model_dist)
        checksum = sum(float(p.double().sum()) for p in model.parameters())
        print(f"FINAL_WEIGHTS rank={os.environ['RANK']} sum={checksum!r}", flush=True)
    return _write_state(self, loop, *args, finished=finished, **kwargs)


MegabyteTrainer._write_state_file = reporting_write_state

seed_everything(0)
config = tiny_config(sys.argv[1])
config.io.enabled_loss_log_for_gpus = [0, 1]
trainer = train_mblm(config, options=CoreTrainerOptions(display_progress=False))
print(f"RUN_DIR={trainer.output_dir}", flush=True)
