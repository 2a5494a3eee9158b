"""GPTQ, one-shot pruning and factorization across two processes (torchrun, gloo on CPU): each rank calibrates
half the windows, the Hessians (and sensitivity losses) are summed over ranks, rank 0 writes, and the model
computes what the one-process model on all the windows does (with float64 Hessians, the very same codes), in
memory or streamed from disk block by block."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import free_port, kill_halfway, python_text, save_deep_model, save_tiny_model, token_windows
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (registers the checkpoint format)


def _quantize(
    tmp_path, output, processes: int, command=("quantize", "gptq", "--group-size", "32"), launcher="torchrun"
):
    first = next(i for i, word in enumerate(command) if word.startswith("--"))  # the command's words, its options
    command = ["-m", "hfcompress", *command[:first], str(tmp_path / "model"), str(output), "--dataset",
               str(tmp_path / "calib.txt"), "--num-samples", "16", "--seq-len", "64", *command[first:], "-q"]  # fmt: skip
    if processes > 1 and launcher == "accelerate":  # on CPUs too accelerate starts several processes with --multi_gpu
        command = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), *command]  # fmt: skip
    elif processes > 1:
        command = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", str(free_port()),
                   *command]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=300)


def _logits(folder):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder)(token_windows(4, 32)).logits


SPARSEGPT = ("prune", "oneshot", "--method", "sparsegpt", "--sparsity", "0.5", "--storage", "dense")


@pytest.mark.parametrize(
    "command",
    [
        SPARSEGPT,
        (*SPARSEGPT, "--hessian-dtype", "float64"),  # the one process's weights exactly
        ("factorize", "--method", "asvd", "--param-ratio", "0.7"),  # sensitivity allocation: losses reduced
    ],
    ids=["sparsegpt", "sparsegpt-float64", "asvd"],
)
def test_pruning_and_factorizing_across_two_processes_match_one(tmp_path, command):
    save_tiny_model(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(python_text()[:60_000])
    for output, processes in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        result = _quantize(tmp_path, output, processes, command)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys() and all(one[k].shape == two[k].shape for k in one)  # the same ranks chosen
    if "float64" in command:  # each rank's float64 sums of per-window products: the one process's Hessians
        assert all(torch.equal(one[key], two[key]) for key in one)
    if command[0] == "prune":  # the same number of zeros in every layer
        assert all(int((one[k] == 0).sum()) == int((two[k] == 0).sum()) for k in one if "layers" in k)
    a, b = _logits(tmp_path / "one"), _logits(tmp_path / "two")
    assert (a - b).abs().mean() <= 0.05 * a.std()
    record = json.loads((tmp_path / "two" / "hfcompress_record.json").read_text())
    assert record["steps"][-1]["config"]["processes"] == 2


@pytest.mark.parametrize("hessian_dtype", ["float32", "float64"])
def test_two_processes_write_the_codes_of_one(tmp_path, hessian_dtype):
    save_tiny_model(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(python_text()[:60_000])
    command = ("quantize", "gptq", "--group-size", "32", "--hessian-dtype", hessian_dtype)
    for output, processes in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        result = _quantize(tmp_path, output, processes, command)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    record = json.loads((tmp_path / "two" / "hfcompress_record.json").read_text())
    assert record["steps"][-1]["config"]["processes"] == 2 and record["steps"][-1]["data"]["num_samples"] == 16
    if hessian_dtype == "float64":  # each rank's float64 sum of per-window products: the one process's Hessians
        assert all(torch.equal(one[key], two[key]) for key in one)
        return
    # the ranks' Hessian sums are added in another order: float32 rounding (~1e-7 relative), as a different number
    # of threads gives. GPTQ can carry one flipped rounding on through a row (on refmodel, 1 and 2 threads in one
    # process differ in half the packed words), so the codes are compared through what the model computes
    for key in one:
        if one[key].is_floating_point():  # scales and zero points come from the weights (static groups)
            torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-6)
    ids = token_windows(4, 32)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "one")(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "two")(ids).logits
    assert (a - b).abs().mean() <= 0.05 * a.std()


def _tensors(folder):
    """Every tensor of the checkpoint in `folder`, one file or shards."""
    return {k: v for file in sorted(folder.glob("model*.safetensors")) for k, v in load_file(file).items()}


AWQ = ("quantize", "awq", "--bits", "4", "--group-size", "32", "--hessian-dtype", "float64")


@pytest.mark.parametrize(
    ("command", "arch"),
    [
        (AWQ, "llama"),
        (("quantize", "w8a8", "--smoothquant", "0.5", "--weights", "gptq", "--hessian-dtype", "float64"), "llama"),
        # 2 windows of 8 tokens, one per rank: each rank's window leaves other experts unreached, and the ranks
        # must still agree which groups are scaled (they once did not: a collective mismatch)
        (("quantize", "w8a8", "--smoothquant", "0.5", "--num-samples", "2", "--seq-len", "8", "--batch-size", "1"),
         "mixtral"),
        (("quantize", "kmeans", "--bits", "3", "--hessian-dtype", "float64"), "llama"),
        # Taylor importance summed in float64 over every rank's batches
        (("prune", "structured", "--heads", "0.5", "--ffn", "0.5"), "llama"),
    ],
    ids=["awq", "w8a8-gptq", "w8a8-moe", "kmeans", "structured"],
)  # fmt: skip
def test_scaled_and_codebook_quantization_across_two_processes_write_the_codes_of_one(tmp_path, command, arch):
    # AWQ's scales and clipping and the codebooks' weights come from the summed Hessians, SmoothQuant's scales
    # from the largest input of every rank (a maximum: exact in any order)
    save_tiny_model(tmp_path / "model", arch=arch)
    (tmp_path / "calib.txt").write_text(python_text()[:60_000])
    for output, processes in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        result = _quantize(tmp_path, output, processes, command)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)
    step = json.loads((tmp_path / "two" / "hfcompress_record.json").read_text())["steps"][-1]
    assert step["config"]["processes"] == 2
    peaks = step["memory"]["peak_rss_bytes_ranks"]  # each rank's peak, rank 0's the step's own
    assert len(peaks) == 2 and peaks[0] == step["memory"]["peak_rss_bytes"] and peaks[1] > 50 * 2**20


COMPENSATED = ("quantize", "gptq", "--group-size", "32", "--lowrank-compensation", "8", "--hessian-dtype", "float64")


@pytest.mark.parametrize(
    ("command", "launcher"),
    [
        (COMPENSATED, "torchrun"),
        (COMPENSATED, "accelerate"),
        ((*SPARSEGPT, "--hessian-dtype", "float64"), "torchrun"),
        ((*AWQ, "--clip"), "torchrun"),  # the clipping search too (off by default)
        (("quantize", "w8a8", "--smoothquant", "0.5"), "torchrun"),
        (("quantize", "vq", "--bits", "2", "--dim", "2", "--hessian-dtype", "float64"), "torchrun"),
        # two passes: rank 0 writes the smoothed copy, every rank calibrates GPTQ on it
        ((*AWQ, "--weights", "gptq"), "torchrun"),
    ],
    ids=["gptq-compensated", "gptq-compensated-accelerate", "sparsegpt", "awq", "w8a8", "vq", "awq-gptq"],
)
def test_two_processes_streaming_from_disk_write_the_model_of_one_in_memory(tmp_path, command, launcher):
    save_tiny_model(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(python_text()[:60_000])
    assert _quantize(tmp_path, tmp_path / "one", 1, command).returncode == 0
    result = _quantize(tmp_path, tmp_path / "two", 2, (*command, "--offload", "disk"), launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert len(list((tmp_path / "two").glob("model-*.safetensors"))) > 1  # written block by block
    assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)
    step = json.loads((tmp_path / "two" / "hfcompress_record.json").read_text())["steps"][-1]
    assert step["config"]["processes"] == 2 and step["config"]["offload"] == "disk"
    # each rank's peak, rank 0's the step's own; the card adds them up
    peaks = step["memory"]["peak_rss_bytes_ranks"]
    assert len(peaks) == 2 and peaks[0] == step["memory"]["peak_rss_bytes"] and peaks[1] > 50 * 2**20
    assert f"the 2 processes together {sum(peaks) / 2**20:,.0f} MiB" in (tmp_path / "two" / "README.md").read_text()
    assert not list((tmp_path / "two").glob(".hfcompress-rank*"))  # rank 1's activations removed before publishing


def test_a_run_across_processes_killed_halfway_resumes_to_the_same_output(tmp_path):
    from hfcompress.io import partial_dir

    model = save_deep_model(tmp_path / "model")
    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), "-m",
        "hfcompress", "quantize", "gptq", str(model), "OUT", "--group-size", "64", "--hessian-dtype", "float64",
        "--dataset", str(model / "calib.txt"), "--num-samples", "32", "--seq-len", "128", "--offload", "disk", "-q",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(output, *extra):
        cmd = [str(output) if c == "OUT" else c for c in command] + list(extra)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    assert run(tmp_path / "whole").returncode == 0
    killed = tmp_path / "killed"
    assert kill_halfway(command, killed, 3, env) == -signal.SIGKILL, "the run ended before it could be killed halfway"
    assert not killed.exists() and list(partial_dir(killed).glob(".hfcompress-rank1/hfcompress_progress.json"))

    single = [sys.executable, "-m", *command[command.index("hfcompress") :], "--resume"]
    one = subprocess.run([str(killed) if c == "OUT" else c for c in single], env=env, capture_output=True, text=True)
    assert one.returncode != 0 and "cannot resume" in one.stderr and "processes was 2" in one.stderr  # 2 shares
    resumed = run(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not partial_dir(killed).exists()
    whole, again = _tensors(tmp_path / "whole"), _tensors(killed)
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    assert {p.name for p in killed.iterdir()} == {p.name for p in (tmp_path / "whole").iterdir()}


@pytest.mark.parametrize(
    ("words", "options", "message"),
    [
        (["quantize", "bnb"], ["--bits", "4"], "bnb does not run across processes yet"),
        # a command that is no technique's would run whole in each process, racing for OUTPUT
        (["search"], ["--budget", "bits=3.5", "--techniques", "gptq", "--dataset", "calib.txt", "--eval-dataset", "calib.txt"],
         "`hfcompress search` runs in one process, not under a launcher (torchrun or accelerate launch started 2)"),
    ],
    ids=["bnb", "search"],
)  # fmt: skip
def test_what_does_not_run_across_processes_is_refused(tmp_path, words, options, message):
    save_tiny_model(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(python_text()[:60_000])
    options = [str(tmp_path / o) if o == "calib.txt" else o for o in options]
    command = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
               "hfcompress", *words, str(tmp_path / "model"), str(tmp_path / "out"), *options, "-q"]  # fmt: skip
    result = subprocess.run([sys.executable, *command], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_rank_0_alone_logs_the_warnings(tmp_path):
    save_tiny_model(tmp_path / "model", arch="mixtral")
    (tmp_path / "calib.txt").write_text(python_text()[:60_000])
    command = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
               "hfcompress", "quantize", "gptq", str(tmp_path / "model"), str(tmp_path / "out"), "--group-size", "32",
               "--dataset", str(tmp_path / "calib.txt"), "--num-samples", "2", "--seq-len", "8", "--batch-size", "1",
               "-q"]  # fmt: skip
    result = subprocess.run([sys.executable, *command], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # 16 tokens are too few for any expert: one warning per block (2), not one per block and rank
    warned = [line for line in result.stderr.splitlines() if "saw fewer calibration tokens" in line]
    assert [line.split(":")[1].strip() for line in warned] == [
        "model.layers.0.mlp.experts",
        "model.layers.1.mlp.experts",
    ]


RANK_0_FAILS = """
import argparse, sys
import torch
import torch.distributed as dist
from hfcompress.commands import cli
from hfcompress.commands.common import HANDLER


def handler(args):
    if dist.get_rank() == 0:
        raise ValueError("rank 0 refuses")
    dist.all_reduce(torch.ones(1))  # rank 1 waits for rank 0, which leaves


cli.ACROSS_PROCESSES = ("__main__:handler",)
sys.exit(cli.run(argparse.Namespace(command="quantize", quiet=True, **{HANDLER: "__main__:handler"})))
"""


def test_a_rank_whose_peer_failed_says_so_in_one_line(tmp_path):
    # started without a launcher, which would stop rank 1 as soon as rank 0 exits: rank 1 meets the closed connection
    (tmp_path / "fails.py").write_text(RANK_0_FAILS)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, str(tmp_path / "fails.py")], env={**env, "RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]  # fmt: skip
    (_, first), (_, second) = (rank.communicate(timeout=120) for rank in ranks)
    assert [rank.returncode for rank in ranks] == [2, 1]
    assert first.strip() == "hfcompress: error: rank 0 refuses"
    assert second.startswith("hfcompress: error: rank 1 stopped: another process of the run left (")
    assert "Traceback" not in second and len(second.strip().splitlines()) == 1


pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
