"""The running Hessian of a layer's inputs: collected as its diagonal alone (what Wanda and k-means read), and
summed in float64 so that the order and batching of the samples do not change it."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import free_port
from safetensors.torch import load_file

from hfcompress.core.hessian import Hessian, hessian_diagonal
from tests.core.hessian_ranks import samples as ranked_samples


def test_the_diagonal_collected_alone_is_the_full_hessians_diagonal():
    g = torch.Generator().manual_seed(0)
    full, diagonal = Hessian(16, "cpu"), Hessian(16, "cpu", diagonal=True)
    for rows in (5, 0, 9):
        x = torch.randn(rows, 16, generator=g)
        full.add(x)
        diagonal.add(x)
    d = diagonal.full()
    assert d.shape == (16,) and torch.allclose(d, hessian_diagonal(full.full()), rtol=1e-5)
    assert torch.equal(hessian_diagonal(d), d) and torch.allclose(diagonal.abs_mean, full.abs_mean)


def _collected(batches, dtype):
    hessian = Hessian(batches[0].shape[-1], "cpu", dtype=dtype)
    for batch in batches:
        hessian.add(batch)
    return hessian.full()


def test_a_float64_sum_gives_the_same_hessian_whatever_the_order_and_batching_of_the_samples():
    g = torch.Generator().manual_seed(1)
    samples = ranked_samples()
    shuffled = samples[torch.randperm(12, generator=g)]
    in_fours, in_threes = samples.split(4), shuffled.split(3)

    H = _collected(in_fours, torch.float64)
    assert H.dtype == torch.float32 and torch.equal(H, _collected(in_threes, torch.float64))
    assert torch.equal(H, H.t())
    float32 = _collected(in_fours, torch.float32)
    torch.testing.assert_close(float32, H, rtol=1e-5, atol=1e-5)
    assert not torch.equal(float32, _collected(in_threes, torch.float32))  # what the float64 sum is for


def test_two_processes_sum_the_hessian_of_one_in_float64(tmp_path):
    script, env = Path(__file__).parent / "hessian_ranks.py", {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    runs = {}
    for processes, command in ((1, [str(script)]), (2, [*launcher, str(script)])):
        out = tmp_path / f"{processes}.safetensors"
        result = subprocess.run(
            [sys.executable, *command, str(out)], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = load_file(out)
    assert torch.equal(runs[1]["torch.float64"], runs[2]["torch.float64"])
    assert not torch.equal(runs[1]["torch.float32"], runs[2]["torch.float32"])  # the ranks' sums, added otherwise
