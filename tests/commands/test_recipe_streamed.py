"""`hfcompress recipe --offload disk`: every step streams its model from the previous step's shards, gives the
weights of the recipe run in memory, resumes a killed step from its last block, and what cannot stream is refused
before any step starts."""

import contextlib
import json

import pytest
import torch
from helpers import read_safetensors, save_sharded_model

from hfcompress.commands.cli import main
from hfcompress.core.shard_writer import ShardWriter
from hfcompress.recipes import Recipe, run_recipe

STEPS = [
    {"prune": {"method": "sparsegpt", "sparsity": 0.3, "num_samples": 8, "seq_len": 64}},
    {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "num_samples": 8, "seq_len": 64}},
]


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return save_sharded_model(tmp_path_factory.mktemp("sharded") / "model")


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, text_file):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(Recipe.from_dict({"steps": STEPS, "dataset": str(text_file)}).to_yaml(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def streamed(sharded, recipe_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("streamed") / "out"
    assert run("recipe", recipe_file, sharded, output, "--offload", "disk", "-q") == 0
    return output


def streamed_steps(output) -> list:
    record = json.loads((output / "hfcompress_record.json").read_text(encoding="utf-8"))
    return [step["config"].get("offload") for step in record["steps"]]


def test_every_step_streams_and_gives_the_weights_of_the_recipe_in_memory(sharded, recipe_file, streamed, tmp_path):
    assert run("recipe", recipe_file, sharded, tmp_path / "whole", "--offload", "none", "-q") == 0
    assert streamed_steps(streamed) == ["disk", "disk"]
    assert streamed_steps(tmp_path / "whole") == [None, None]
    for step in ("steps/01-prune-sparsegpt", "steps/02-quantize-gptq", "."):
        written, whole = read_safetensors(streamed / step), read_safetensors(tmp_path / "whole" / step)
        assert written.keys() == whole.keys()
        for name, tensor in whole.items():
            torch.testing.assert_close(written[name], tensor, rtol=0, atol=0, msg=name)


@contextlib.contextmanager
def shards_written_by(step: str, killed_at: int | None = None):
    """The shard indices `step` writes in the block (a streamed recipe that dies as it writes shard `killed_at`)."""
    write, written = ShardWriter.write, []

    def recording(self, index, tensors):
        if step in str(self.folder):
            if index == killed_at:
                raise RuntimeError("killed")
            written.append(index)
        write(self, index, tensors)

    ShardWriter.write = recording
    try:
        yield written
    finally:
        ShardWriter.write = write


def test_a_killed_recipe_resumes_from_the_last_block_of_its_streamed_step(sharded, recipe_file, streamed, tmp_path):
    out, kept = tmp_path / "out", tmp_path / ".out.partial"
    with shards_written_by("02-quantize-gptq", killed_at=2) as before, pytest.raises(RuntimeError, match="killed"):
        run_recipe(recipe_file, str(sharded), out, quiet=True, dtype="auto", offload="disk")
    assert before == [0, 1]
    assert not out.exists()
    pruned = kept / "steps" / "01-prune-sparsegpt" / "recipe_step.json"
    assert pruned.is_file() and (kept / "steps" / ".02-quantize-gptq.partial").is_dir()
    finished = pruned.stat().st_mtime

    with shards_written_by("02-quantize-gptq") as after:
        run_recipe(recipe_file, str(sharded), out, resume=True, quiet=True, dtype="auto", offload="disk")
    assert after and min(after) == 2  # the shards written before are kept
    assert not kept.exists()
    assert (out / "steps" / "01-prune-sparsegpt" / "recipe_step.json").stat().st_mtime == finished  # not rerun
    written, wanted = read_safetensors(out), read_safetensors(streamed)  # a run never killed
    assert written.keys() == wanted.keys() and all(torch.equal(written[k], v) for k, v in wanted.items())


@pytest.mark.parametrize(
    "steps, message",
    [
        (
            [{"distill": {"student_layers": 1, "max_steps": 2}}, STEPS[1]],
            "step 1 (distill) cannot run with --offload disk: it trains with the whole model in memory",
        ),
        ([STEPS[0], {"quantize": {"method": "bnb"}}], "step 2 (quantize-bnb): bnb cannot run with --offload disk"),
    ],
)
def test_a_step_that_cannot_stream_is_refused_before_any_step_starts(
    sharded, text_file, tmp_path, capsys, steps, message
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(Recipe.from_dict({"steps": steps, "dataset": str(text_file)}).to_yaml(), encoding="utf-8")
    assert run("recipe", recipe, sharded, tmp_path / "out", "--offload", "disk", "-q") == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_a_step_after_factorize_streams_the_factors(sharded, text_file, tmp_path):
    """The skeleton rebuilds a factorized checkpoint's layers as loading does, so GPTQ after factorize streams their
    factors (an `up` factor whose rank 32 does not divide gets one group per row), with the weights of the recipe
    run in memory; factorizing the factorized model again is refused, streamed or not, with nothing written."""
    factorize = {"method": "whiten", "param_ratio": 0.85, "allocation": "uniform", "num_samples": 8, "seq_len": 64}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        Recipe.from_dict({"steps": [{"factorize": factorize}, STEPS[1]], "dataset": str(text_file)}).to_yaml()
    )
    assert run("recipe", recipe, sharded, tmp_path / "disk", "--offload", "disk", "-q") == 0
    assert run("recipe", recipe, sharded, tmp_path / "none", "--offload", "none", "-q") == 0
    assert streamed_steps(tmp_path / "disk") == ["disk", "disk"]
    written, whole = read_safetensors(tmp_path / "disk"), read_safetensors(tmp_path / "none")
    assert written.keys() == whole.keys() and all(torch.equal(written[k], v) for k, v in whole.items())
    manifest = json.loads((tmp_path / "disk" / "config.json").read_text())["quantization_config"]
    up = "model.layers.0.self_attn.q_proj.up"
    assert manifest["lowrank"] and up in manifest["modules"] and manifest["overrides"][up]["group_size"] == -1
    factorized = tmp_path / "disk" / "steps" / "01-factorize-whiten"
    for offload in ("disk", "none"):
        argv = (
            "factorize",
            factorized,
            tmp_path / "again",
            "--method",
            "svd",
            "--allocation",
            "uniform",
            "--param-ratio",
            0.7,
        )
        assert run(*argv, "--offload", offload, "-q") == 2
        assert not (tmp_path / "again").exists() and not (tmp_path / ".again.partial").exists()


def test_a_dtype_a_streamed_step_cannot_apply_is_warned_about(sharded, tmp_path, caplog):
    """A streamed step holds each block as stored (float16 here), whatever `dtype` asks for."""
    rtn = Recipe.from_dict({"steps": [{"quantize": {"method": "rtn", "group_size": 32}}]})
    run_recipe(rtn, str(sharded), tmp_path / "auto", quiet=True, offload="disk", dtype="auto")
    assert "does not apply with --offload disk" not in caplog.text
    run_recipe(rtn, str(sharded), tmp_path / "float32", quiet=True, offload="disk", dtype="float32")
    assert "--dtype float32 does not apply with --offload disk: each block is held as stored (float16)" in caplog.text
    assert read_safetensors(tmp_path / "float32").keys() == read_safetensors(tmp_path / "auto").keys()
