"""Bad input gets one clear line and exit status 2, naming the value and what was expected, and changes nothing:
the cases of the bad-input matrix that were tracebacks or misleading messages."""

import gzip

import pytest
from helpers import save_tiny_model
from safetensors.torch import load_file, save_file

from hfcompress.commands.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-input") / "model"
    save_tiny_model(folder)  # a Llama with 128 positions
    return folder


@pytest.fixture()
def text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    return path


def run(*argv) -> int:
    return main([str(a) for a in argv])


def _fails(capsys, message: str, *argv) -> None:
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_model_path_that_is_a_file_or_a_missing_local_folder(model_dir, tmp_path, capsys, monkeypatch):
    _fails(capsys, "is a file; expected a model folder", "quantize", "rtn", model_dir / "config.json", tmp_path / "o")
    monkeypatch.chdir(model_dir.parent)  # 'model/missing': its parent is here, so it is a local path, not a Hub id
    _fails(capsys, "model folder 'model/missing' does not exist (its parent 'model' does)",
           "quantize", "rtn", "model/missing", tmp_path / "o")  # fmt: skip


def test_data_that_is_not_text_is_named(model_dir, tmp_path, capsys):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    _fails(capsys, f"{binary} is not UTF-8 text", "quantize", "gptq", model_dir, tmp_path / "o", "--dataset", binary,
           "--group-size", 32, "--seq-len", 16)  # fmt: skip
    broken = tmp_path / "data.txt.gz"
    broken.write_bytes(gzip.compress(b"text")[:-6])
    _fails(capsys, f"{broken} is not UTF-8 text (or gzip of it)", "quantize", "gptq", model_dir, tmp_path / "o",
           "--dataset", broken, "--group-size", 32, "--seq-len", 16)  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_windows_longer_than_the_model_are_refused(model_dir, text, tmp_path, capsys):
    _fails(capsys, "`seq_len` 256 exceeds the 128 positions of the model; use at most 128",
           "quantize", "gptq", model_dir, tmp_path / "o", "--dataset", text, "--group-size", 32, "--seq-len", 256)  # fmt: skip
    _fails(capsys, "`seq_len` 4096 exceeds the 128 positions", "evaluate", model_dir, "--dataset", text,
           "--seq-len", 4096)  # fmt: skip


def test_the_current_folder_is_never_an_output(model_dir, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for output in (".", ".."):
        _fails(capsys, "is or contains the current folder", "quantize", "rtn", model_dir, output, "--overwrite")
    assert (work / "notes.txt").read_text() == "mine"


def test_non_finite_weights_are_blamed_not_the_calibration_data(model_dir, text, tmp_path, capsys):
    broken = tmp_path / "broken"
    save_tiny_model(broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.input_layernorm.weight"].fill_(float("inf"))
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    _fails(capsys, "the Hessian holds NaN or infinite values: the model's weights or its activations",
           "quantize", "gptq", broken, tmp_path / "o", "--dataset", text, "--group-size", 32, "--seq-len", 16,
           "--num-samples", 2)  # fmt: skip
    assert not (tmp_path / "o").exists()


def _hashes(folder):
    import hashlib

    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_a_damaged_adapter_is_named(model_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)  # fmt: skip
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    before = _hashes(model_dir)
    _fails(capsys, f"adapter weights '{weights}' are not a readable safetensors file", "merge-lora", model_dir,
           adapter, tmp_path / "o")  # fmt: skip
    (adapter / "adapter_config.json").write_text("{not json")
    _fails(capsys, "adapter config", "merge-lora", model_dir, adapter, tmp_path / "o")
    assert _hashes(model_dir) == before and not (tmp_path / "o").exists()


def test_a_hub_dataset_that_cannot_be_reached_says_so(model_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    _fails(capsys, "dataset 'someorg/no-such-data' is no local file or folder, and loading it from the Hub failed",
           "quantize", "gptq", model_dir, tmp_path / "o", "--dataset", "someorg/no-such-data", "--group-size", 32)  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_too_little_free_space_is_refused_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    _fails(capsys, "not enough free space for", "quantize", "rtn", model_dir, tmp_path / "o", "--group-size", 32)
    assert not (tmp_path / "o").exists()


def test_a_disk_that_fills_while_writing_leaves_the_old_output(model_dir, tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "o"
    assert run("quantize", "rtn", model_dir, out, "--group-size", 32, "-q") == 0
    before = _hashes(out)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "staging" / "model.safetensors"))

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", full)
    _fails(
        capsys, "No space left on device", "quantize", "rtn", model_dir, out, "--group-size", 32, "--overwrite", "-q"
    )
    assert _hashes(out) == before  # --overwrite replaces only with a complete folder
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no staging folder, no lock file left
