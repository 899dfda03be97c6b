"""Several processes and machines on the CPU (gloo): two "machines" of two processes each through
torchrun's own c10d rendezvous, --parallel hsdp's mesh, and a prune longer than the collective timeout."""
import json
import os
import socket
import subprocess
import sys

import pytest

from extreme_compression_experiment import main
from helpers import REPO
from test_cli import CLI, assert_pruned_weights_stayed_zero, job_args, pruned_folder
from utils.training.parallel import MeshError, mesh_shape

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SLOW_RUN = str(REPO / "tests" / "slow_run.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def two_machines(args, cwd, timeout=900) -> list[subprocess.CompletedProcess]:
    """The main job as 2 machines × 2 processes on this host: two torchrun agents, one per "machine",
    meeting at a c10d rendezvous endpoint on localhost (what two hosts would do over the network)."""
    endpoint = f"localhost:{free_port()}"
    agents = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
                                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-machines",
                                CLI, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
              for node in (0, 1)]
    results = []
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    return results


@pytest.mark.parametrize("parallel", ["ddp", "hsdp"])
def test_two_machines_of_two_processes_equal_one_process(parallel, tmp_path, tiny_llama_dir, text_file):
    args = ("--epochs", "1", "--batch-size", "4", "--eval-batch-size", "5", "--loss", "ce", "--sparsity", "0.3")
    assert main(job_args(tiny_llama_dir, text_file, tmp_path / "one", *args)) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())["final"]
    out = tmp_path / "machines"
    results = two_machines(job_args(tiny_llama_dir, text_file, out, *args, "--parallel", parallel), tmp_path)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    printed = "".join(result.stdout for result in results)
    assert f"parallel: {parallel} × 4 processes" in printed
    if parallel == "hsdp":
        assert "2 machines × 2 processes" in printed
    final = json.loads((out / "results.json").read_text())["final"]
    assert final == pytest.approx(one, rel=1e-5)  # the tolerance of the two-process tests
    assert assert_pruned_weights_stayed_zero(out / "best", pruned_folder(tmp_path / "pruned", tiny_llama_dir)) > 0


def test_the_hsdp_mesh_is_whole_machines():
    assert mesh_shape(4, 2) == (2, 2) and mesh_shape(8, 8) == (1, 8) and mesh_shape(3, None) == (1, 3)
    with pytest.raises(MeshError, match="not whole machines of 2 processes"):
        mesh_shape(3, 2)


def slow_run(mode: str, seconds: int, args, cwd) -> subprocess.CompletedProcess:
    """The job in 2 gloo processes with one step made `seconds` slower (tests/slow_run.py)."""
    command = [*TORCHRUN, "--nproc-per-node", "2", SLOW_RUN, mode, str(seconds), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=600)


def test_a_prune_longer_than_the_collective_timeout_completes(tmp_path, tiny_llama_dir, text_file):
    short = ("--epochs", "1", "--parallel", "ddp", "--dist-timeout", "0.1")  # 6 s for any collective
    slow = slow_run("prune", 12, job_args(tiny_llama_dir, text_file, tmp_path / "run", *short), tmp_path)
    assert slow.returncode == 0, slow.stderr[-3000:]  # rank 1 waited 12 s+ for the prune, outside any collective
    assert "pruning now" in slow.stdout
    # ... and the timeout is real: a barrier that waits as long fails
    late = slow_run("barrier", 12, job_args(tiny_llama_dir, text_file, tmp_path / "late", *short), tmp_path)
    assert late.returncode != 0 and "timed out" in late.stderr.lower(), late.stderr[-3000:]


def test_the_overlapped_gradient_exchange_averages_exactly(tmp_path):
    import torch
    import torch.multiprocessing as mp
    from helpers import exchange_worker
    mp.spawn(exchange_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{rank}") for rank in (0, 1)]
    for grads in ranks:
        for name, by_hand in grads["None"].items():
            # the same sums of two numbers, in other buckets: equal to the last bit
            assert torch.equal(grads["True"][name], by_hand) and torch.equal(grads["False"][name], by_hand), name
    assert all(torch.equal(ranks[0]["True"][name], ranks[1]["True"][name]) for name in ranks[0]["True"])
