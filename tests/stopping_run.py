"""The command line with a StopAfter callback, for tests that interrupt a run in another process
(under torchrun, or to see SIGTERM handled as a scheduler sends it):

    python tests/stopping_run.py STEP SIGNAL [the command line's arguments ...]    # SIGNAL: int | term
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from extreme_compression_experiment import main  # noqa: E402
from helpers import StopAfter  # noqa: E402

if __name__ == "__main__":
    step, signal_name, *argv = sys.argv[1:]
    sys.exit(main(argv, callbacks=[StopAfter(int(step), signal_name)]))
