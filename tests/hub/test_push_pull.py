"""Push and pull through the real huggingface_hub client and transformers, against the loopback Hub server of
tests/hub_server.py. Pushes run in this process with the endpoint pointed at the server; pulls run in a fresh
interpreter with HF_ENDPOINT and HF_TOKEN set the way a user's shell sets them."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import huggingface_hub
import pytest
import torch
from helpers import python_text, save_tiny_model, token_windows
from hub_server import HubServer
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.commands.cli import main

pytest.importorskip("matplotlib")

TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def hub():
    server = HubServer(tokens={TOKEN: "alice"})
    yield server
    server.close()


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path):
    """This process talks to the loopback server, with TOKEN, over plain HTTP LFS (no Xet)."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One folder per format the project writes: GPTQ and RTN (hfcompress), RTN compressed-tensors, low-rank."""
    root = tmp_path_factory.mktemp("formats")
    source = root / "source"
    save_tiny_model(source)
    text = root / "calib.txt"
    text.write_text(python_text()[:30_000], encoding="utf-8")
    calib = ["--dataset", text, "--num-samples", 4, "--seq-len", 64]
    commands = {
        "gptq": ["quantize", "gptq", source, root / "gptq", "--bits", 4, "--group-size", 32, *calib],
        "rtn": ["quantize", "rtn", source, root / "rtn", "--bits", 8, "--group-size", -1],
        "rtn-ct": ["quantize", "rtn", source, root / "rtn-ct", "--group-size", 32, "--sym", "--format", "compressed-tensors"],
        "lowrank": ["factorize", source, root / "lowrank", "--rank", 8, "--method", "whiten", *calib],
    }  # fmt: skip
    folders = {}
    for name, command in commands.items():
        assert main([str(a) for a in [*command, "-q"]]) == 0
        folders[name] = root / name
    return folders


def _subprocess_env(hub, tmp_path, token=TOKEN):
    env = dict(
        os.environ, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0"
    )
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return env


PULL = """
    import json, sys, torch, hfcompress
    from transformers import AutoModelForCausalLM
    ids = torch.load(sys.argv[1])
    results = {}
    for spec in sys.argv[2:]:
        repo, _, revision = spec.partition("@")
        try:
            model = AutoModelForCausalLM.from_pretrained(repo, revision=revision or None, dtype=torch.float32)
            torch.save(model(input_ids=ids).logits, sys.argv[1] + "." + spec.replace("/", "_") + ".pt")
            results[spec] = "ok"
        except Exception as e:
            results[spec] = f"{type(e).__name__}: {e}"
    print(json.dumps(results))
"""


def _pull(hub, tmp_path, specs, token=TOKEN):
    import json

    ids_file = tmp_path / "ids.pt"
    torch.save(token_windows(2, 16), ids_file)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PULL), str(ids_file), *specs],
        capture_output=True, text=True, env=_subprocess_env(hub, tmp_path, token), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    logits = {s: torch.load(f"{ids_file}.{s.replace('/', '_')}.pt") for s, r in results.items() if r == "ok"}
    return results, logits, torch.load(ids_file)


def test_every_format_pushes_and_pulls_with_identical_logits(outputs, hub_env, tmp_path):
    for name, folder in outputs.items():
        url = hfcompress.push_to_hub(folder, f"alice/tiny-{name}")
        assert f"alice/tiny-{name}" in url
        repo = hub_env.state.repos[f"alice/tiny-{name}"]
        files = repo.commits[repo.branches["main"]]
        assert files["model.safetensors"][1], "weights must go through LFS"
        assert {"config.json", "README.md", "hfcompress_record.json", "tokenizer.json"} <= set(files)
    results, logits, ids = _pull(hub_env, tmp_path, [f"alice/tiny-{name}" for name in outputs])
    for name, folder in outputs.items():
        assert results[f"alice/tiny-{name}"] == "ok", results
        local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        torch.testing.assert_close(logits[f"alice/tiny-{name}"], local(input_ids=ids).logits, rtol=0, atol=0)


def test_push_with_revision_and_private_repo_then_pull_that_revision(outputs, hub_env, tmp_path, capsys):
    commits = hub_env.state.commits_made
    argv = [
        "push",
        outputs["lowrank"],
        "alice/private-lowrank",
        "--private",
        "--revision",
        "v1",
        "--commit-message",
        "first",
    ]
    assert main([str(a) for a in argv]) == 0
    assert "commit" in capsys.readouterr().out
    repo = hub_env.state.repos["alice/private-lowrank"]
    assert hub_env.state.commits_made == commits + 1  # one commit for the whole folder
    assert repo.private and repo.branches["v1"] != repo.branches["main"]
    assert repo.commits[repo.branches["main"]] == {}
    results, _, _ = _pull(hub_env, tmp_path, ["alice/private-lowrank@v1"])
    assert results["alice/private-lowrank@v1"] == "ok"
    results, _, _ = _pull(hub_env, tmp_path, ["alice/private-lowrank@v1"], token=None)
    assert "not a valid model identifier" in results["alice/private-lowrank@v1"]  # a private repo is hidden


def test_the_command_line_pushes_with_hf_endpoint_and_hf_token_from_the_environment(outputs, hub, tmp_path):
    """`--push-to-hub` in a fresh process: the endpoint and the token come from the environment only."""
    source = outputs["gptq"].parent / "source"
    out = tmp_path / "pushed"
    command = [sys.executable, "-m", "hfcompress.commands.cli", "factorize", source, out, "--rank", "8", "--method", "svd",
               "--push-to-hub", "alice/from-cli", "-q"]  # fmt: skip
    done = subprocess.run(
        list(map(str, command)), capture_output=True, text=True, env=_subprocess_env(hub, tmp_path), timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    repo = hub.state.repos["alice/from-cli"]
    files = repo.commits[repo.branches["main"]]
    assert files["README.md"][0] == (out / "README.md").read_bytes()
    assert b"alice/from-cli" in files["README.md"][0]  # the card's loading code names the repo


def test_an_export_pushes_its_output_with_the_card_naming_the_repo(outputs, hub_env, tmp_path, capsys):
    """`export compressed-tensors --push-to-hub`: the (asymmetric) GPTQ checkpoint rewritten, then pushed."""
    out = tmp_path / "exported"
    export = ["export", "compressed-tensors", str(outputs["gptq"])]
    assert main([*export, str(tmp_path / "never"), "--push-to-hub", "alice/bad repo!", "-q"]) == 2
    assert "is not valid" in capsys.readouterr().err and not (tmp_path / "never").exists()  # refused before writing
    assert main([*export, str(out), "--push-to-hub", "alice/exported", "--private", "-q"]) == 0
    repo = hub_env.state.repos["alice/exported"]
    files = repo.commits[repo.branches["main"]]
    assert repo.private and set(files) >= {p.name for p in out.iterdir()}
    for name in ("README.md", "config.json", "hfcompress_record.json"):
        assert files[name][0] == (out / name).read_bytes()
    assert b"alice/exported" in files["README.md"][0] and b'"compressed-tensors"' in files["config.json"][0]
    # pulled back in a fresh process by the reader the card names, whatever compressed-tensors is installed
    ids = token_windows(2, 16)
    torch.save(ids, tmp_path / "ids.pt")
    pull = "import sys, torch, hfcompress; m = hfcompress.load_compressed_tensors(sys.argv[1]); " + (
        "torch.save(m(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])"
    )
    command = [sys.executable, "-c", pull, "alice/exported", tmp_path / "ids.pt", tmp_path / "pulled.pt"]
    done = subprocess.run(list(map(str, command)), capture_output=True, text=True,
                          env=_subprocess_env(hub_env, tmp_path), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    expected = AutoModelForCausalLM.from_pretrained(outputs["gptq"], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.load(tmp_path / "pulled.pt"), expected(input_ids=ids).logits, rtol=0, atol=1e-5
        )


@pytest.mark.parametrize(
    "token,repo,message",
    [
        (None, "alice/x", "no Hugging Face token"),
        ("wrong", "alice/x", "token was refused"),
        (TOKEN, "alice/bad repo!", "is not valid"),
        (TOKEN, "bob/x", "no write access"),
    ],
)
def test_bad_pushes_fail_clearly_and_commit_nothing(outputs, hub_env, monkeypatch, capsys, token, repo, message):
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    folder = outputs["lowrank"]
    before = {p: (folder / p).read_bytes() for p in os.listdir(folder)}
    commits = hub_env.state.commits_made
    assert main(["push", str(folder), repo]) == 2
    assert message in capsys.readouterr().err
    assert hub_env.state.commits_made == commits
    assert {p: (folder / p).read_bytes() for p in os.listdir(folder)} == before


def test_an_interrupted_upload_commits_nothing_and_an_unreachable_hub_says_so(outputs, hub_env, monkeypatch, capsys):
    commits = hub_env.state.commits_made
    hub_env.state.lfs.clear()  # earlier tests uploaded these weights already: make the client upload them again
    hub_env.state.fail_uploads = True
    try:
        assert main(["push", str(outputs["gptq"]), "alice/interrupted"]) == 2
    finally:
        hub_env.state.fail_uploads = False
    assert "Nothing was committed" in capsys.readouterr().err
    assert hub_env.state.commits_made == commits
    repo = hub_env.state.repos["alice/interrupted"]
    assert repo.commits[repo.branches["main"]] == {}
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert main(["push", str(outputs["gptq"]), "alice/unreachable"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_push_refuses_a_folder_that_is_not_a_compressed_model(outputs, hub_env, capsys):
    assert main(["push", str(outputs["gptq"].parent / "source"), "alice/plain"]) == 2
    assert "not a compressed model" in capsys.readouterr().err
    assert "alice/plain" not in hub_env.state.repos


def test_a_hub_that_never_answers_is_given_up_on_with_a_message(outputs, hub_env, monkeypatch, capsys):
    """A server that accepts the connection and never answers: huggingface_hub alone waits for ever."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        start = time.perf_counter()
        assert main(["push", str(outputs["gptq"]), "alice/silent", "--timeout", "1"]) == 2
        assert time.perf_counter() - start < 30
        err = capsys.readouterr().err
        assert "no answer from http://127.0.0.1:" in err and "waits 1 s" in err and "Nothing was committed" in err
        monkeypatch.setenv("HFCOMPRESS_HUB_TIMEOUT", "1")  # the same through the environment, from Python
        with pytest.raises(hfcompress.hub.HubError, match="no answer"):
            hfcompress.push_to_hub(outputs["gptq"], "alice/silent")
        monkeypatch.setenv("HFCOMPRESS_HUB_TIMEOUT", "soon")
        with pytest.raises(ValueError, match="positive number of seconds, got 'soon'"):
            hfcompress.push_to_hub(outputs["gptq"], "alice/silent")
    finally:
        listener.close()
