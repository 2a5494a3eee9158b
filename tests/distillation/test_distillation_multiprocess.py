"""DistillationTrainer under accelerate with two CPU processes (gloo): every rank ends with the same student."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def test_two_process_distillation_keeps_ranks_identical(tmp_path):
    pytest.importorskip("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent.parent)}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()), "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(HERE / "ddp_distill.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank-{r}.safetensors") for r in (0, 1)]
    assert int(ranks[0]["world_size"]) == 2
    assert any(k.startswith("projection.") for k in ranks[0])
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
