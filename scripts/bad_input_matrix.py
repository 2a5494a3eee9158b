"""The bad-input and fault matrix: run every case against a small model in a sandbox, as a demanding user would,
and classify each outcome.

    python scripts/bad_input_matrix.py [--python PYTHON] [--json OUT.json]

Each case is a command line (run as `PYTHON -m hfcompress.commands.cli ...`, so another checkout can be measured
with its own interpreter and PYTHONPATH) in a fresh copy of the sandbox, with a note of what a correct tool does.
Outcomes: `clear` (refused with exit status 2 and one `hfcompress: error:` line, no traceback), `ok` (a valid
run that succeeded), `traceback`, `silent` (exit 0 where it must fail, or a failure that printed nothing
useful), `lost` (an input or an earlier output changed). The table at the end is the closing note's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BUILD = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from helpers import save_tiny_model, python_text
import hfcompress
save_tiny_model("model")
open("calib.txt", "w").write(python_text()[:40000])
from hfcompress.commands.cli import main
assert main(["quantize", "rtn", "model", "rtn", "--group-size", "32", "-q"]) == 0
assert main(["quantize", "gptq", "model", "gptq", "--group-size", "32", "--dataset", "calib.txt", "--seq-len", "64",
             "--num-samples", "8", "-q"]) == 0
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
get_peft_model(AutoModelForCausalLM.from_pretrained("model"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained("adapter")
"""


def _edit_config(folder: str, **changes) -> str:
    return (
        f"import json; p = '{folder}/config.json'; c = json.load(open(p)); "
        f"c['quantization_config'].update({changes!r}); json.dump(c, open(p, 'w'))"
    )


def _edit_tensors(folder: str, code: str) -> str:
    return (
        "from safetensors.torch import load_file, save_file; import torch; "
        f"p = '{folder}/model.safetensors'; t = load_file(p); {code}; save_file(t, p, metadata={{'format': 'pt'}})"
    )


Q = "model.layers.0.self_attn.q_proj"
# (name, setup python or None, argv, must fail, protected paths)
CASES = [
    (
        "output is the model, --overwrite",
        None,
        ["quantize", "rtn", "model", "model", "--overwrite", "--group-size", "32"],
        True,
        ["model"],
    ),
    (
        "output is the model's parent, --overwrite",
        None,
        ["quantize", "rtn", "model", ".", "--overwrite", "--group-size", "32"],
        True,
        ["model", "calib.txt"],
    ),
    ("output inside the model", None, ["quantize", "rtn", "model", "model/out", "--group-size", "32"], True, ["model"]),
    (
        "output is the dataset, --overwrite",
        None,
        ["quantize", "gptq", "model", "calib.txt", "--dataset", "calib.txt", "--overwrite", "--group-size", "32"],
        True,
        ["calib.txt"],
    ),
    (
        "output contains the dataset, --overwrite",
        "import os; os.makedirs('d'); os.rename('calib.txt', 'd/calib.txt')",
        ["quantize", "gptq", "model", "d", "--dataset", "d/calib.txt", "--overwrite", "--group-size", "32"],
        True,
        ["d"],
    ),
    ("output exists, no --overwrite", None, ["quantize", "rtn", "model", "rtn", "--group-size", "32"], True, ["rtn"]),
    (
        "output is a file, --overwrite",
        None,
        ["quantize", "rtn", "model", "calib.txt", "--overwrite", "--group-size", "32"],
        True,
        ["calib.txt"],
    ),
    (
        "output folder not writable",
        "import os; os.makedirs('ro'); os.chmod('ro', 0o555)",
        ["quantize", "rtn", "model", "ro/out", "--group-size", "32"],
        True,
        ["model"],
    ),
    ("model path is a file", None, ["quantize", "rtn", "model/config.json", "o", "--group-size", "32"], True, []),
    ("missing relative local model", None, ["quantize", "rtn", "model/missing", "o"], True, []),
    ("missing dotted local model", None, ["quantize", "rtn", "./nope", "o"], True, []),
    (
        "model folder without config.json",
        "import os; os.makedirs('empty')",
        ["quantize", "rtn", "empty", "o"],
        True,
        [],
    ),
    (
        "missing dataset file",
        None,
        ["quantize", "gptq", "model", "o", "--dataset", "nope.txt", "--group-size", "32"],
        True,
        [],
    ),
    (
        "binary dataset",
        "open('b.bin', 'wb').write(bytes(range(256)) * 40)",
        ["quantize", "gptq", "model", "o", "--dataset", "b.bin", "--group-size", "32"],
        True,
        [],
    ),
    (
        "latin-1 dataset",
        "open('l.txt', 'wb').write('caf\\xe9 '.encode('latin-1') * 4000)",
        ["quantize", "gptq", "model", "o", "--dataset", "l.txt", "--group-size", "32"],
        True,
        [],
    ),
    (
        "unreachable Hub dataset (offline)",
        None,
        ["quantize", "gptq", "model", "o", "--dataset", "someorg/no-such-data", "--group-size", "32"],
        True,
        [],
    ),
    (
        "seq-len beyond the positions",
        None,
        ["quantize", "gptq", "model", "o", "--dataset", "calib.txt", "--seq-len", "100000", "--group-size", "32"],
        True,
        [],
    ),
    (
        "evaluate seq-len beyond the positions",
        None,
        ["evaluate", "model", "--dataset", "calib.txt", "--seq-len", "4096"],
        True,
        [],
    ),
    ("bits 5", None, ["quantize", "rtn", "model", "o", "--bits", "5"], True, []),
    ("group size dividing no layer", None, ["quantize", "rtn", "model", "o", "--group-size", "48"], True, []),
    (
        "negative sparsity",
        None,
        ["prune", "oneshot", "model", "o", "--method", "magnitude", "--sparsity", "-0.5"],
        True,
        [],
    ),
    (
        "gptq without a tokenizer",
        "import shutil; shutil.copytree('model', 'bare'); [__import__('os').remove('bare/' + f) for f in ('tokenizer.json', 'tokenizer_config.json')]",
        ["quantize", "gptq", "bare", "o", "--dataset", "calib.txt", "--group-size", "32"],
        True,
        [],
    ),
    (
        "rtn without a tokenizer (valid)",
        "import shutil; shutil.copytree('model', 'bare'); [__import__('os').remove('bare/' + f) for f in ('tokenizer.json', 'tokenizer_config.json')]",
        ["quantize", "rtn", "bare", "o", "--group-size", "32"],
        False,
        [],
    ),
    (
        "inf weight in the model",
        _edit_tensors("model", f"t['{Q}.weight'][0, 0] = float('inf')"),
        ["quantize", "gptq", "model", "o", "--dataset", "calib.txt", "--group-size", "32", "--seq-len", "64"],
        True,
        [],
    ),
    (
        "flipped sym in config",
        _edit_config("gptq", sym=True),
        ["evaluate", "gptq", "--dataset", "calib.txt", "--seq-len", "64"],
        True,
        [],
    ),
    (
        "flipped act_order in config",
        _edit_config("gptq", act_order=True, static_groups=False),
        ["evaluate", "gptq", "--dataset", "calib.txt", "--seq-len", "64"],
        True,
        [],
    ),
    (
        "bits in config disagree",
        _edit_config("rtn", bits=8),
        ["evaluate", "rtn", "--dataset", "calib.txt", "--seq-len", "64"],
        True,
        [],
    ),
    (
        "group size in config disagrees",
        _edit_config("rtn", group_size=64),
        ["evaluate", "rtn", "--dataset", "calib.txt", "--seq-len", "64"],
        True,
        [],
    ),
    (
        "a weight_scale deleted",
        _edit_tensors("rtn", f"del t['{Q}.weight_scale']"),
        ["evaluate", "rtn", "--dataset", "calib.txt", "--seq-len", "64", "--json", "-q"],
        True,
        [],
    ),
    (
        "a packed weight deleted",
        _edit_tensors("rtn", f"del t['{Q}.weight']"),
        ["evaluate", "rtn", "--dataset", "calib.txt", "--seq-len", "64"],
        True,
        [],
    ),
    (
        "a zero point deleted",
        _edit_tensors("rtn", f"del t['{Q}.weight_zero_point']"),
        ["evaluate", "rtn", "--dataset", "calib.txt", "--seq-len", "64"],
        True,
        [],
    ),
    (
        "NaN scales",
        _edit_tensors("rtn", f"t['{Q}.weight_scale'][0] = float('nan')"),
        ["evaluate", "rtn", "--dataset", "calib.txt", "--seq-len", "64", "--json", "-q"],
        True,
        [],
    ),
    (
        "a byte changed inside a tensor",
        "p = 'rtn/model.safetensors'; d = bytearray(open(p, 'rb').read()); d[-10] ^= 0xFF; open(p, 'wb').write(d)",
        ["verify", "rtn"],
        True,
        [],
    ),
    (
        "truncated safetensors",
        "p = 'rtn/model.safetensors'; d = open(p, 'rb').read(); open(p, 'wb').write(d[: len(d) // 2])",
        ["evaluate", "rtn", "--dataset", "calib.txt", "--seq-len", "64"],
        True,
        [],
    ),
    (
        "random bytes as safetensors",
        "open('rtn/model.safetensors', 'wb').write(bytes(range(256)) * 8)",
        ["evaluate", "rtn", "--dataset", "calib.txt", "--seq-len", "64"],
        True,
        [],
    ),
    ("verify a good checkpoint (valid)", None, ["verify", "gptq"], False, []),
    (
        "truncated adapter",
        "p = 'adapter/adapter_model.safetensors'; d = open(p, 'rb').read(); open(p, 'wb').write(d[:100])",
        ["merge-lora", "model", "adapter", "o"],
        True,
        ["model"],
    ),
    (
        "broken adapter config",
        "open('adapter/adapter_config.json', 'w').write('{not json')",
        ["merge-lora", "model", "adapter", "o"],
        True,
        ["model"],
    ),
    ("missing adapter", None, ["merge-lora", "model", "no-adapter", "o"], True, []),
    (
        "unsafe card template",
        "open('t.jinja', 'w').write('{{ ().__class__.__base__.__subclasses__() }}')",
        ["card", "gptq", "--template", "t.jinja"],
        True,
        ["gptq"],
    ),
    ("card on a folder without a record", None, ["card", "model"], True, ["model"]),
    (
        "recipe with an unknown field",
        "open('r.yaml', 'w').write('steps:\\n  - quantize: {method: rtn, grup_size: 32}\\n')",
        ["recipe", "r.yaml", "model", "o"],
        True,
        [],
    ),
    (
        "recipe failing midway with --overwrite",
        "open('r.yaml', 'w').write('steps:\\n  - prune: {method: magnitude, sparsity: 0.3}\\n  - quantize: {method: rtn, group_size: 48}\\n')",
        ["recipe", "r.yaml", "model", "rtn", "--overwrite"],
        True,
        ["rtn"],
    ),
    ("push to a Hub that never answers", None, ["push", "gptq", "user/m"], True, ["gptq"]),
    (
        "Ctrl-C during GPTQ",
        None,
        [
            "quantize",
            "gptq",
            "model",
            "o",
            "--dataset",
            "calib.txt",
            "--group-size",
            "32",
            "--num-samples",
            "512",
            "--seq-len",
            "128",
        ],
        True,
        [],
    ),
]


def _hash(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    if path.is_dir():
        return {
            str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))
            if p.is_file()
        }
    return {}


def _silent_server() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)  # accepts connections (the kernel does) and never answers
    return server


def run_case(python: str, sandbox: Path, case, env: dict) -> dict:
    name, setup, argv, must_fail, protected = case
    work = Path(tempfile.mkdtemp(prefix="case-"))
    shutil.copytree(sandbox, work, dirs_exist_ok=True, symlinks=True)
    if setup:
        subprocess.run([python, "-c", setup], cwd=work, check=True)
    before = {p: _hash(work / p) for p in protected}
    command = [python, "-m", "hfcompress.commands.cli", *argv]
    server = None
    case_env = dict(env)
    if name.startswith("push"):
        server = _silent_server()
        case_env.update(
            HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}", HF_TOKEN="t", HFCOMPRESS_HUB_TIMEOUT="3"
        )
    if name.startswith("unreachable"):
        case_env["HF_HUB_OFFLINE"] = "1"
    start = time.time()
    if name.startswith("Ctrl-C"):  # interrupt once the run is under way (its first progress bar shows)
        process = subprocess.Popen(
            command, cwd=work, env=case_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell ignores SIGINT
        )  # fmt: skip
        seen: list[str] = []
        reader = threading.Thread(target=lambda: seen.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
        reader.start()
        deadline = time.time() + 120
        while "%|" not in "".join(seen) and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        reader.join(timeout=10)
        code, err = process.returncode, "".join(seen)
    else:
        try:
            done = subprocess.run(command, cwd=work, env=case_env, capture_output=True, text=True, timeout=240)
            code, err = done.returncode, done.stderr
        except subprocess.TimeoutExpired:
            code, err = None, "timed out after 240 s"
    seconds = time.time() - start
    if server is not None:
        server.close()
    after = {p: _hash(work / p) for p in protected}
    leftovers = [p.name for p in work.iterdir() if p.name.startswith(".") and ("tmp" in p.name or "staging" in p.name)]
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if before != after:
        outcome = "lost"
    elif "Traceback (most recent call last)" in err:
        outcome = "traceback"
    elif not must_fail:
        outcome = "ok" if code == 0 else "silent"
    elif code == 0 or code is None:
        outcome = "silent"
    elif lines and ("error:" in lines[-1] or "interrupted" in lines[-1]):
        outcome = "clear"
    else:
        outcome = "silent"
    for path in work.rglob("*"):  # the read-only case
        if path.is_dir():
            os.chmod(path, 0o755)
    shutil.rmtree(work, ignore_errors=True)
    return {"case": name, "outcome": outcome, "exit": code, "seconds": round(seconds, 1), "leftovers": leftovers,
            "message": lines[-1][:300] if lines else ""}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="the interpreter (and checkout) to measure")
    parser.add_argument("--json", type=Path, default=None, help="write every case's outcome here")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this")
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="0", TRANSFORMERS_VERBOSITY="error")
    sandbox = Path(tempfile.mkdtemp(prefix="bad-input-sandbox-"))
    subprocess.run(
        [args.python, "-c", BUILD.format(tests=str(HERE.parent / "tests"))], cwd=sandbox, check=True, env=env
    )
    results = []
    for case in CASES:
        if args.only and args.only not in case[0]:
            continue
        if case[0] == "output folder not writable" and os.geteuid() == 0:
            print(f"{'skipped':<10} {case[0]:<45} (running as root, who may write any folder)", flush=True)
            continue
        result = run_case(args.python, sandbox, case, env)
        results.append(result)
        print(
            f"{result['outcome']:<10} {result['case']:<45} exit {result['exit']}  {result['message'][:120]}", flush=True
        )
    shutil.rmtree(sandbox, ignore_errors=True)
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("clear", "ok", "traceback", "silent", "lost")}
    print("\n| cases | clear errors | valid runs ok | tracebacks | silent wrong | data lost |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {len(results)} | {counts['clear']} | {counts['ok']} | {counts['traceback']} | {counts['silent']} | {counts['lost']} |"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
