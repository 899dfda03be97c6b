"""benchmarks/run_gpu.sh's logic that runs on the CPU: which processes its `watch` waits for."""
import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _running(tmp_path) -> set[int]:
    """The pids `run_gpu.sh running` lists (what `watch` waits for)."""
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "run_gpu.sh"), "running"], capture_output=True,
                          text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    return {int(line.split()[0]) for line in done.stdout.splitlines()}


def _start(command: str) -> subprocess.Popen:
    # a session of its own: the kill at the end takes its children too
    return subprocess.Popen(["bash", "-c", command], start_new_session=True)


def test_watch_waits_for_the_runs_and_not_for_a_call_that_names_them(tmp_path):
    # a lent machine's call: its command line names the experiment and the script, but it is no run
    # (one such call waited out its own limit on the device, 300 s of the lease)
    call = _start("sleep 30; : bash benchmarks/run_gpu.sh watch 560; pgrep -f extreme_compression_experiment; "
                  "run_gpu.sh sweep")
    # runs as `recipe` starts them (with and without RUN_LIMIT's timeout), and a `sweep` as `detach` starts
    # it (exec -a: the command line alone)
    runs = [_start('exec -a "python3 extreme_compression_experiment.py --sparsity 0.1" sleep 30'),
            _start('exec -a "timeout 505 python3 extreme_compression_experiment.py" sleep 30'),
            _start('exec -a "bash benchmarks/run_gpu.sh sweep a@0.1" sleep 30')]
    try:
        deadline, seen = time.monotonic() + 20, set()
        while time.monotonic() < deadline and not {run.pid for run in runs} <= seen:
            time.sleep(0.2)
            seen = _running(tmp_path)
        assert {run.pid for run in runs} <= seen
        assert call.pid not in seen
    finally:
        for process in (call, *runs):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
