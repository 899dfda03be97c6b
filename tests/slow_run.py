"""The command line with a deliberately slow step, for tests of what waits on what under torchrun:

    python tests/slow_run.py prune SECONDS [arguments ...]     # the main process prunes SECONDS longer
    python tests/slow_run.py barrier SECONDS [arguments ...]   # after optimizer step 1, rank 1 reaches a
                                                               # barrier SECONDS after rank 0
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from extreme_compression_experiment import main  # noqa: E402
from utils.pipeline import prune_step  # noqa: E402


class LateBarrier:
    """Rank 1 sleeps, then both meet in a barrier: it must fail when the wait exceeds --dist-timeout."""

    def __init__(self, seconds: float):
        self.seconds, self.done = seconds, False

    def on_step_end(self, trainer) -> None:
        if not self.done:
            self.done = True
            if dist.get_rank() == 1:
                time.sleep(self.seconds)
            dist.barrier()


if __name__ == "__main__":
    mode, seconds, *argv = sys.argv[1:]
    callbacks = []
    if mode == "prune":
        prune_now = prune_step._prune_now

        def slow_prune(*args, **kwargs):
            time.sleep(float(seconds))
            return prune_now(*args, **kwargs)
        prune_step._prune_now = slow_prune
    else:
        callbacks.append(LateBarrier(float(seconds)))
    sys.exit(main(argv, callbacks=callbacks))
