"""GPTQ, one-shot pruning and factorization across two processes (torchrun, gloo on CPU): each rank calibrates
half the windows, the Hessians (and sensitivity losses) are summed over ranks, rank 0 writes, and the model
computes what the one-process model on all the windows does (with float64 Hessians, the very same codes), in
memory or streamed from disk block by block. The commands of every case run in one launch (run_commands.py) with
one process and in one with two, rather than two launches a case: the interpreters' start is most of a small run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, kill_halfway, python_text, save_deep_model, save_tiny_model, token_windows
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (registers the checkpoint format)

SPARSEGPT = ("prune", "oneshot", "--method", "sparsegpt", "--sparsity", "0.5", "--storage", "dense")
AWQ = ("quantize", "awq", "--bits", "4", "--group-size", "32", "--hessian-dtype", "float64")
COMPENSATED = ("quantize", "gptq", "--group-size", "32", "--lowrank-compensation", "8", "--hessian-dtype", "float64")
TOO_FEW_TOKENS = ("--num-samples", "2", "--seq-len", "8", "--batch-size", "1")  # 2 windows of 8 tokens, one per rank
STREAMED = ("--offload", "disk")
# name: (architecture, command, what the two-process run adds to it, launcher); each runs once in one process and
# once in two
CASES = {
    "sparsegpt": ("llama", SPARSEGPT, (), "torchrun"),
    "sparsegpt-float64": ("llama", (*SPARSEGPT, "--hessian-dtype", "float64"), (), "torchrun"),
    "asvd": ("llama", ("factorize", "--method", "asvd", "--param-ratio", "0.7"), (), "torchrun"),
    "gptq-float32": ("llama", ("quantize", "gptq", "--group-size", "32", "--hessian-dtype", "float32"), (), "torchrun"),
    "gptq-float64": ("llama", ("quantize", "gptq", "--group-size", "32", "--hessian-dtype", "float64"), (), "torchrun"),
    "awq": ("llama", AWQ, (), "torchrun"),
    "w8a8-gptq": ("llama", ("quantize", "w8a8", "--smoothquant", "0.5", "--weights", "gptq", "--hessian-dtype",
                            "float64"), (), "torchrun"),
    # each rank's window leaves other experts unreached, and the ranks must still agree which groups are scaled
    # (they once did not: a collective mismatch)
    "w8a8-moe": ("mixtral", ("quantize", "w8a8", "--smoothquant", "0.5", *TOO_FEW_TOKENS), (), "torchrun"),
    "kmeans": ("llama", ("quantize", "kmeans", "--bits", "3", "--hessian-dtype", "float64"), (), "torchrun"),
    # Taylor importance summed in float64 over every rank's batches
    "structured": ("llama", ("prune", "structured", "--heads", "0.5", "--ffn", "0.5"), (), "torchrun"),
    "streamed-gptq-compensated": ("llama", COMPENSATED, STREAMED, "torchrun"),
    "streamed-gptq-compensated-accelerate": ("llama", COMPENSATED, STREAMED, "accelerate"),
    "streamed-sparsegpt": ("llama", (*SPARSEGPT, "--hessian-dtype", "float64"), STREAMED, "torchrun"),
    "streamed-awq": ("llama", (*AWQ, "--clip"), STREAMED, "torchrun"),  # the clipping search too (off by default)
    "streamed-w8a8": ("llama", ("quantize", "w8a8", "--smoothquant", "0.5"), STREAMED, "torchrun"),
    # streamed as hfcompress's format, rewritten by rank 0 before publishing
    "streamed-w8a8-ct": ("llama", ("quantize", "w8a8", "--smoothquant", "0.5", "--format", "compressed-tensors"),
                         STREAMED, "torchrun"),
    "streamed-vq": ("llama", ("quantize", "vq", "--bits", "2", "--dim", "2", "--hessian-dtype", "float64"),
                    STREAMED, "torchrun"),
    # two passes: rank 0 writes the smoothed copy, every rank calibrates GPTQ on it
    "streamed-awq-gptq": ("llama", (*AWQ, "--weights", "gptq"), STREAMED, "torchrun"),
    "moe-warnings": ("mixtral", ("quantize", "gptq", "--group-size", "32", *TOO_FEW_TOKENS), (), "torchrun"),
}  # fmt: skip


def _launcher(name: str, processes: int) -> list[str]:
    """The arguments that start `processes` copies of a script under the launcher `name`."""
    if name == "accelerate":  # on CPUs too accelerate starts several processes with --multi_gpu
        return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]  # fmt: skip
    return ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", str(free_port())]


class Runs:
    """Every selected case run in one process and in two, each set of runs in one launch of run_commands.py (about
    four seconds of starting interpreters saved per command)."""

    def __init__(self, folder: Path, names: list[str]):
        self.folder = folder
        save_tiny_model(folder / "llama")
        save_tiny_model(folder / "mixtral", arch="mixtral")
        (folder / "calib.txt").write_text(python_text()[:60_000])
        self._launch("one", names)
        for launcher in ("torchrun", "accelerate"):
            self._launch(f"two-{launcher}", [name for name in names if CASES[name][3] == launcher], launcher)

    def _argv(self, name: str, output: Path, extra=()) -> list[str]:
        arch, command, *_ = CASES[name]
        first = next(i for i, word in enumerate(command) if word.startswith("--"))  # the command's words, its options
        return [*command[:first], str(self.folder / arch), str(output), "--dataset", str(self.folder / "calib.txt"),
                "--num-samples", "16", "--seq-len", "64", *command[first:], *extra, "-q"]  # fmt: skip

    def _launch(self, label: str, names: list[str], launcher: str | None = None) -> None:
        if not names:
            return
        folder = self.folder / label
        folder.mkdir()
        plan = [{"name": n, "argv": self._argv(n, folder / n, CASES[n][2] if launcher else ())} for n in names]
        (folder / "plan.json").write_text(json.dumps(plan))
        script = [str(Path(__file__).parent / "run_commands.py"), str(folder / "plan.json"), str(folder)]
        command = [sys.executable, *(_launcher(launcher, 2) if launcher else []), *script]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) as launch:  # fmt: skip
            try:
                _, stderr = launch.communicate(timeout=600)
            except subprocess.TimeoutExpired:  # the launcher and its ranks: none left waiting on a collective
                os.killpg(launch.pid, signal.SIGKILL)
                _, stderr = launch.communicate()
        (folder / "launch.stderr").write_text(stderr)

    def outputs(self, name: str) -> tuple[Path, Path]:
        """The output folders of case `name`'s one-process and two-process runs, once both succeeded on every rank."""
        one = self.folder / "one"
        two = self.folder / f"two-{CASES[name][3]}"
        for folder, ranks in ((one, 1), (two, 2)):
            for rank in range(ranks):
                statuses = folder / f"statuses.rank{rank}.json"
                ran = {s["name"]: s for s in json.loads(statuses.read_text())} if statuses.exists() else {}
                stderr = folder / f"{name}.rank{rank}.stderr"
                said = stderr.read_text()[-3000:] if stderr.exists() else (folder / "launch.stderr").read_text()[-3000:]
                assert name in ran and ran[name]["status"] == 0, f"{folder.name}, rank {rank}: {said}"
                assert ran[name]["group_up"] == (ranks == 2)  # the script's process group outlives each command
        return one / name, two / name

    def stderr(self, name: str, rank: int) -> str:
        return (self.folder / f"two-{CASES[name][3]}" / f"{name}.rank{rank}.stderr").read_text()


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> Runs:
    """The cases that the selected tests of this module ask for, run before the first of them."""
    selected = {item.callspec.params.get("case") for item in request.session.items
                if getattr(item, "module", None) is request.module and hasattr(item, "callspec")}  # fmt: skip
    return Runs(tmp_path_factory.mktemp("runs"), [name for name in CASES if name in selected])


def _logits(folder):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder)(token_windows(4, 32)).logits


def _tensors(folder):
    """Every tensor of the checkpoint in `folder`, one file or shards."""
    return {k: v for file in sorted(folder.glob("model*.safetensors")) for k, v in load_file(file).items()}


@pytest.mark.parametrize("case", ["sparsegpt", "sparsegpt-float64", "asvd"])  # asvd: sensitivity losses reduced
def test_pruning_and_factorizing_across_two_processes_match_one(runs, case):
    one, two = runs.outputs(case)
    one_tensors, two_tensors = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert one_tensors.keys() == two_tensors.keys()
    assert all(one_tensors[k].shape == two_tensors[k].shape for k in one_tensors)  # the same ranks chosen
    if case == "sparsegpt-float64":  # each rank's float64 sums of per-window products: the one process's Hessians
        assert all(torch.equal(one_tensors[key], two_tensors[key]) for key in one_tensors)
    if case.startswith("sparsegpt"):  # the same number of zeros in every layer
        assert all(int((one_tensors[k] == 0).sum()) == int((two_tensors[k] == 0).sum())
                   for k in one_tensors if "layers" in k)  # fmt: skip
    a, b = _logits(one), _logits(two)
    assert (a - b).abs().mean() <= 0.05 * a.std()
    record = json.loads((two / "hfcompress_record.json").read_text())
    assert record["steps"][-1]["config"]["processes"] == 2


@pytest.mark.parametrize("case", ["gptq-float32", "gptq-float64"])
def test_two_processes_write_the_codes_of_one(runs, case):
    one_folder, two_folder = runs.outputs(case)
    one, two = load_file(one_folder / "model.safetensors"), load_file(two_folder / "model.safetensors")
    assert one.keys() == two.keys()
    record = json.loads((two_folder / "hfcompress_record.json").read_text())
    assert record["steps"][-1]["config"]["processes"] == 2 and record["steps"][-1]["data"]["num_samples"] == 16
    if case == "gptq-float64":  # each rank's float64 sum of per-window products: the one process's Hessians
        assert all(torch.equal(one[key], two[key]) for key in one)
        return
    # the ranks' Hessian sums are added in another order: float32 rounding (~1e-7 relative), as a different number
    # of threads gives. GPTQ can carry one flipped rounding on through a row (on refmodel, 1 and 2 threads in one
    # process differ in half the packed words), so the codes are compared through what the model computes
    for key in one:
        if one[key].is_floating_point():  # scales and zero points come from the weights (static groups)
            torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-6)
    a, b = _logits(one_folder), _logits(two_folder)
    assert (a - b).abs().mean() <= 0.05 * a.std()


@pytest.mark.parametrize("case", ["awq", "w8a8-gptq", "w8a8-moe", "kmeans", "structured"])
def test_scaled_and_codebook_quantization_across_two_processes_write_the_codes_of_one(runs, case):
    # AWQ's scales and clipping and the codebooks' weights come from the summed Hessians, SmoothQuant's scales
    # from the largest input of every rank (a maximum: exact in any order)
    one_folder, two_folder = runs.outputs(case)
    one, two = _tensors(one_folder), _tensors(two_folder)
    assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)
    step = json.loads((two_folder / "hfcompress_record.json").read_text())["steps"][-1]
    assert step["config"]["processes"] == 2
    peaks = step["memory"]["peak_rss_bytes_ranks"]  # each rank's peak, rank 0's the step's own
    assert len(peaks) == 2 and peaks[0] == step["memory"]["peak_rss_bytes"] and peaks[1] > 50 * 2**20


@pytest.mark.parametrize(
    "case",
    ["streamed-gptq-compensated", "streamed-gptq-compensated-accelerate", "streamed-sparsegpt", "streamed-awq",
     "streamed-w8a8", "streamed-w8a8-ct", "streamed-vq", "streamed-awq-gptq"],
)  # fmt: skip
def test_two_processes_streaming_from_disk_write_the_model_of_one_in_memory(runs, case):
    one_folder, two_folder = runs.outputs(case)
    one, two = _tensors(one_folder), _tensors(two_folder)
    assert len(list(two_folder.glob("model-*.safetensors"))) > 1  # written block by block
    assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)
    step = json.loads((two_folder / "hfcompress_record.json").read_text())["steps"][-1]
    assert step["config"]["processes"] == 2 and step["config"]["offload"] == "disk"
    # each rank's peak, rank 0's the step's own; the card adds them up
    peaks = step["memory"]["peak_rss_bytes_ranks"]
    assert len(peaks) == 2 and peaks[0] == step["memory"]["peak_rss_bytes"] and peaks[1] > 50 * 2**20
    assert f"the 2 processes together {sum(peaks) / 2**20:,.0f} MiB" in (two_folder / "README.md").read_text()
    assert not list(two_folder.glob(".hfcompress-*"))  # rank 1's activations (and a rewrite's source) removed


@pytest.mark.parametrize("case", ["moe-warnings"])
def test_rank_0_alone_logs_the_warnings(runs, case):
    runs.outputs(case)
    # 16 tokens are too few for any expert: one warning per block (2), said by rank 0 alone
    warned = [line.split(":")[1].strip() for rank in (0, 1) for line in runs.stderr(case, rank).splitlines()
              if "saw fewer calibration tokens" in line]  # fmt: skip
    assert warned == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert "saw fewer calibration tokens" in runs.stderr(case, 0)


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
