"""benchmarks/run_gpu.sh's logic that runs on the CPU: which processes its `watch` waits for."""
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _running(tmp_path) -> str:
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "run_gpu.sh"), "running"], capture_output=True,
                          text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    return done.stdout


def test_watch_waits_for_the_runs_and_not_for_a_call_that_names_them(tmp_path):
    # a lent machine's call: its command line names the experiment and the script, but it is no run
    # (one such call waited out its own limit on the device, 300 s of the lease)
    call = subprocess.Popen(["bash", "-c", "sleep 30; : bash benchmarks/run_gpu.sh watch 560; "
                             "pgrep -f extreme_compression_experiment; run_gpu.sh sweep"])
    # a run as `recipe` starts it, and a `sweep` as `detach` starts it (exec -a: the command line alone)
    run = subprocess.Popen(["bash", "-c", 'exec -a "timeout 505 python3 extreme_compression_experiment.py" sleep 30'])
    sweep = subprocess.Popen(["bash", "-c", 'exec -a "bash benchmarks/run_gpu.sh sweep a@0.1" sleep 30'])
    try:
        time.sleep(0.5)
        pids = {int(line.split()[0]) for line in _running(tmp_path).splitlines()}
        assert run.pid in pids and sweep.pid in pids
        assert call.pid not in pids
    finally:
        for process in (call, run, sweep):
            process.kill()
            process.wait()
    assert not {run.pid, sweep.pid} & {int(line.split()[0]) for line in _running(tmp_path).splitlines()}
