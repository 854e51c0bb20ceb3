"""`glmjax train` with faults injected through the trainer's hooks (production code reads no test
switches): `python train_with_faults.py [--kill-after-step N] [--kill-during-save N]
[--spike-at-step N] EXPERIMENT [section.key=value ...]`.

--kill-after-step N   SIGKILL right after step N's metrics are known, once the saves dispatched before
                      it are committed (so the test knows which checkpoint the restart finds)
--kill-during-save N  SIGKILL right after the save of step N is dispatched, its files still being written
--spike-at-step N     multiply step N's loss by 100 (the spike guard must roll back)
"""
import argparse
import os
import signal
import sys

from glmjax.experiment import load_experiment
from glmjax.train import loop


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kill-after-step", type=int)
    p.add_argument("--kill-during-save", type=int)
    p.add_argument("--spike-at-step", type=int)
    p.add_argument("experiment")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()

    def after_step(trainer, m):
        if a.spike_at_step and m["step"] == a.spike_at_step:
            m["loss"] *= 100.0
        if a.kill_after_step and m["step"] >= a.kill_after_step:
            trainer.checkpoints.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    def after_save(trainer, step):
        if a.kill_during_save and step >= a.kill_during_save:
            print(f"killing during the save of step {step}: in flight {trainer.checkpoints.saving()}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    hooks = loop.Hooks(after_step=after_step, after_save=after_save)
    return loop.main(load_experiment(a.experiment, a.overrides), hooks)


if __name__ == "__main__":
    sys.exit(main())
