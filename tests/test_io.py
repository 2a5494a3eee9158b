"""Nothing lost: an OUTPUT that is, contains or lies inside an input is refused with or without --overwrite, one run
writes an OUTPUT at a time, and interrupted runs' temporary folders are cleaned up by their marker only."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_tiny_model

from hfcompress.commands.cli import main
from hfcompress.hub.card import generate_card
from hfcompress.hub.record import CompressionRecord, Step
from hfcompress.io import STAGING_MARKER

HOLD_LOCK = """
import sys, time
from hfcompress.io import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def run(*argv) -> int:
    return main([str(a) for a in argv])


def tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture()
def sandbox(tmp_path):
    """sandbox/parent/model (a model folder), sandbox/parent/notes.txt (an unrelated file), sandbox/calib.txt."""
    parent = tmp_path / "parent"
    save_tiny_model(parent / "model")
    (parent / "notes.txt").write_text("the user's own file")
    (tmp_path / "calib.txt").write_text("calibration text " * 200)
    return tmp_path


@pytest.mark.parametrize(
    "output, problem",
    [
        ("parent/model", "is the input"),
        ("parent", "contains the input"),
        ("parent/model/out", "lies inside the input"),
        ("parent/model/deeper/out", "lies inside the input"),  # no folder is made inside the model either
    ],
)
def test_an_output_over_an_input_is_refused_and_nothing_changes(sandbox, capsys, output, problem):
    before = tree_hash(sandbox)
    model = sandbox / "parent" / "model"
    for overwrite in ([], ["--overwrite"]):
        assert run("quantize", "rtn", model, sandbox / output, "--group-size", 32, "-q", *overwrite) == 2
        assert problem in capsys.readouterr().err
    assert tree_hash(sandbox) == before


def test_calibration_data_and_recipes_are_inputs_too(sandbox, capsys):
    before = tree_hash(sandbox)
    model = sandbox / "parent" / "model"
    args = ["--dataset", sandbox / "calib.txt", "--num-samples", 2, "--seq-len", 16, "-q", "--overwrite"]
    assert run("quantize", "gptq", model, sandbox, "--group-size", 32, *args) == 2
    assert "contains the input" in capsys.readouterr().err
    recipe = sandbox / "recipe.yaml"
    recipe.write_text("steps:\n  - quantize: {method: rtn, group_size: 32}\n")
    before = tree_hash(sandbox)
    # before: `recipe --overwrite` emptied OUTPUT first, here the model itself
    assert run("recipe", recipe, model, model, "--overwrite", "-q") == 2
    assert "is the input" in capsys.readouterr().err
    assert tree_hash(sandbox) == before


def test_a_second_writer_of_the_same_output_is_refused_at_once(sandbox, capsys):
    out = sandbox / "out"
    holder = subprocess.Popen(  # another run, writing `out`
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        assert run("quantize", "rtn", sandbox / "parent" / "model", out, "--group-size", 32, "-q") == 2
    finally:
        holder.kill()
        holder.wait()
    assert "another hfcompress run is writing" in capsys.readouterr().err
    assert not out.exists()
    assert run("quantize", "rtn", sandbox / "parent" / "model", out, "--group-size", 32, "-q") == 0  # released
    assert sorted(p.name for p in sandbox.iterdir()) == ["calib.txt", "out", "parent"]  # no lock file left


def test_temporary_folders_of_interrupted_runs_are_removed_by_their_marker_only(sandbox, caplog):
    stale = sandbox / ".out.tmp-abc123"
    stale.mkdir()
    (stale / STAGING_MARKER).write_text("12345\n")
    (stale / "model.safetensors").write_bytes(b"half")
    unmarked = sandbox / ".out.tmp-mine"  # not ours: kept
    unmarked.mkdir()
    assert run("quantize", "rtn", sandbox / "parent" / "model", sandbox / "out", "--group-size", 32) == 0
    assert not stale.exists() and unmarked.exists()
    assert (sandbox / "out" / "model.safetensors").exists() and not (sandbox / "out" / STAGING_MARKER).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write a read-only folder")
def test_an_unwritable_output_is_refused_before_any_work(sandbox, capsys):
    locked = sandbox / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert run("quantize", "rtn", sandbox / "parent" / "model", locked / "out", "-q") == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_card_templates_render_in_a_sandbox(tmp_path):
    CompressionRecord(base_model="base", steps=[Step("quantization", "rtn", {}, None, 1.0)]).save(tmp_path)
    template = tmp_path / "evil.jinja"
    template.write_text("---\n{{ card_data }}\n---\n{{ ''.__class__.__mro__[1].__subclasses__() }}\n")
    with pytest.raises(ValueError, match="tried something unsafe"):
        generate_card(tmp_path, template=template)


def test_an_output_that_is_a_file_is_named_as_one(tmp_path):
    from hfcompress.io import check_output_dir

    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is a file, not a folder"):
        check_output_dir(target, overwrite=True)
    assert target.read_text() == "mine"
