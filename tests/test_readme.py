"""Every code block of README.md is checked, so no snippet can go stale:

- each ```python block runs, as a user would paste it, in a fresh interpreter, in a folder holding what its
  placeholders name (`path/or/hub-id`: a small Llama with a tokenizer; `calib.txt`, `val.txt`; a LoRA adapter
  at `path/to/adapter`; `recipe.yaml`: the README's own recipe), with the names a block takes from its
  context (`model`, `teacher`, `args`, `train`, ...) defined, and the Hub at a loopback server;
- the ```yaml block is a recipe that validates;
- each `hfcompress ...` line of a ```bash block names real commands and real flags (they are synopses with
  placeholders), and the set-up block's commands are the ones `.ci/run` runs.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_server import HubServer

from hfcompress.commands.cli import build_parser
from hfcompress.recipes import Recipe, validate_recipe

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
TOKEN = "hf_readme_token"


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number, text) of every fenced block of `language`."""
    found = []
    for match in re.finditer(rf"^```{language}\n(.*?)^```$", README, flags=re.S | re.M):
        found.append((README[: match.start()].count("\n") + 1, match.group(1)))
    return found


# what the blocks' placeholders and context names stand for; built once, then each block runs in a copy
CONTEXT = r'''
import os, sys, torch
sys.path.insert(0, {tests!r})
from helpers import python_text, tiny_tokenizer
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer,
                          TrainingArguments)

def build_fixtures():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    for folder in ("path/or/hub-id", "path/to/model"):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    text = python_text()
    with open("calib.txt", "w", encoding="utf-8") as f:
        f.write(text[:60_000])
    with open("val.txt", "w", encoding="utf-8") as f:
        f.write(text[-30_000:])
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
    adapted.save_pretrained("path/to/adapter")

def context():
    """The names README blocks take from their surroundings (the first block's `import hfcompress` included)."""
    import hfcompress

    model = AutoModelForCausalLM.from_pretrained("path/or/hub-id", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained("path/or/hub-id")
    ids = tokenizer(python_text()[:20_000])["input_ids"]
    windows = [torch.tensor(ids[i : i + 32]) for i in range(0, len(ids) - 32, 32)][:64]
    train = [{{"input_ids": w, "labels": w}} for w in windows]
    quiet = dict(report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=100, save_strategy="no",
                 dataloader_pin_memory=False, per_device_train_batch_size=4)
    return dict(
        model=model, tokenizer=tokenizer, teacher=AutoModelForCausalLM.from_pretrained("path/or/hub-id"),
        hfcompress=hfcompress, train=train, val=train[:8], Trainer=Trainer, AutoModelForCausalLM=AutoModelForCausalLM,
        args=TrainingArguments(output_dir="trainer-out", max_steps=320, **quiet),
        training_args=TrainingArguments(output_dir="distill-out", max_steps=4, **quiet),
    )
'''

RUNNER = r"""
import json, sys, traceback
exec(open(sys.argv[1]).read())
build_fixtures()
import hfcompress  # noqa: F401  (what a user's session has after the first block)
failures = []
for line, code in json.load(open(sys.argv[2])):
    namespace = context()
    try:
        exec(compile(code, f"README.md block at line {line}", "exec"), namespace)
    except Exception:
        failures.append(f"README.md block at line {line}:\n" + traceback.format_exc())
print(json.dumps(failures))
"""


def test_every_python_block_runs(tmp_path):
    python = blocks("python")
    assert len(python) >= 8
    (tmp_path / "context.py").write_text(CONTEXT.format(tests=str(ROOT / "tests")))
    (tmp_path / "blocks.json").write_text(json.dumps(python))
    (tmp_path / "recipe.yaml").write_text(blocks("yaml")[0][1])
    (tmp_path / "runner.py").write_text(RUNNER)
    hub = HubServer(tokens={TOKEN: "user"})
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
               HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error")  # fmt: skip
    try:
        done = subprocess.run(
            [sys.executable, "runner.py", "context.py", "blocks.json"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        hub.close()
    assert done.returncode == 0, done.stderr[-4000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)


def test_the_yaml_recipe_validates():
    ((_, text),) = blocks("yaml")
    recipe = Recipe.from_dict(yaml.safe_load(text))
    recipe.dataset = __file__  # stands in for calib.txt: validation checks the data exists
    assert [p.step.kind for p in validate_recipe(recipe)] == ["prune", "factorize", "quantize"]


def _command_lines() -> list[tuple[int, str]]:
    lines = []
    for start, text in blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", text)  # continuation lines
        for offset, line in enumerate(joined.splitlines()):
            line = line.split("#")[0].strip()
            for prefix in ("optimum-cli hfcompress ", "hfcompress "):
                if line.startswith(prefix):
                    lines.append((start + offset, line[len(prefix) :]))
                    break
    return lines


def _subparser(parser, words: list[str]):
    """The parser of the command `words` start with, and how many words that took."""
    used = 0
    while used < len(words):
        actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not actions or words[used] not in actions[0].choices:
            break
        parser = actions[0].choices[words[used]]
        used += 1
    return parser, used


def test_every_command_line_names_real_commands_and_flags():
    parser = build_parser()
    lines = _command_lines()
    assert len(lines) >= 15
    for number, line in lines:
        words = shlex.split(line.replace("|", " "))
        command, used = _subparser(parser, words)
        assert used, f"README.md:{number}: no command in {line!r}"
        flags = {s for a in command._actions for s in a.option_strings}
        for word in words[used:]:
            flag = word.strip("[]").split("=")[0]
            if flag.startswith("--"):
                assert flag in flags, f"README.md:{number}: {' '.join(words[:used])} has no {flag}"


def test_the_set_up_commands_are_what_ci_runs():
    setup = blocks("bash")[0][1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install torch==2.13.0 -e ".[tests]"' in setup and "torch==2.13.0" in ci and '-e ".[tests]"' in ci
    assert "python scripts/quickstart.py" in setup and (ROOT / "scripts" / "quickstart.py").is_file()
    assert "python -m pytest -q" in setup and "python -m pytest -q" in ci


@pytest.mark.parametrize("name", ["save_quantized", "evaluate", "run_recipe", "Recipe", "verify_folder"])
def test_the_names_the_readme_uses_import_from_the_top_level(name):
    import hfcompress

    assert callable(getattr(hfcompress, name))
