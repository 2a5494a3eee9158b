"""Quickstart that needs no network: build a small language model from text that ships with Python, then
quantize it with GPTQ through the `hfcompress` command line and compare it with the original.

    python scripts/quickstart.py                    # trains ./quickstart/tiny-lm (a few minutes), then quantizes
    python scripts/quickstart.py --model PATH_OR_ID --dataset TEXT_FILE   # the same on your own model

The tiny model is a Llama (4 layers, hidden 128) with a BPE tokenizer, trained on the help topics behind
`pydoc` (pydoc_data.topics) with a plain PyTorch loop; the last 10% of that text is held out for evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("quickstart")


def python_help_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def build_tiny_lm(folder: Path, steps: int = 300, seed: int = 0) -> tuple[Path, Path]:
    """Train the tiny model into `folder`; returns the calibration and evaluation text files."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = python_help_text()
    split = int(len(text) * 0.9)
    folder.mkdir(parents=True, exist_ok=True)
    calib, heldout = folder.parent / "train.txt", folder.parent / "heldout.txt"
    calib.write_text(text[:split], encoding="utf-8")
    heldout.write_text(text[split:], encoding="utf-8")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [text[:split]],
        trainers.BpeTrainer(
            vocab_size=2048, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    ids = torch.tensor(tokenizer(text[:split])["input_ids"])

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    seq_len, batch = 128, 16
    model.train()
    start = time.time()
    for step in range(steps):
        offsets = torch.randint(0, len(ids) - seq_len - 1, (batch,))
        x = torch.stack([ids[o : o + seq_len] for o in offsets])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            logger.info("step %d/%d loss %.3f (%.0fs)", step + 1, steps, loss.item(), time.time() - start)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return calib, heldout


def hfcompress(*args) -> str:
    command = [sys.executable, "-m", "hfcompress", *map(str, args)]
    print("$ hfcompress " + " ".join(map(str, args)), flush=True)
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="quickstart", help="where the tiny model and results go")
    parser.add_argument("--model", help="quantize this model instead of building the tiny one")
    parser.add_argument("--dataset", help="calibration and evaluation text (needed with --model)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the tiny model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    workdir = Path(args.workdir)
    if args.model:
        if not args.dataset:
            parser.error("--model needs --dataset")
        model, calib, heldout, seq_len, group = args.model, args.dataset, args.dataset, 512, 128
    else:
        model = workdir / "tiny-lm"
        if (model / "config.json").exists():
            calib, heldout = workdir / "train.txt", workdir / "heldout.txt"
        else:
            calib, heldout = build_tiny_lm(model, steps=args.steps)
        seq_len, group = 128, 128
    quantized = workdir / "gptq-4bit"
    kernels = subprocess.run([sys.executable, "-m", "hfcompress", "build-kernels"], capture_output=True, text=True)
    print(kernels.stdout.strip(), flush=True)  # a machine without a compiler still runs, dequantizing
    hfcompress(
        "quantize", "gptq", model, quantized, "--bits", 4, "--group-size", group, "--dataset", calib,
        "--num-samples", 64, "--seq-len", seq_len, "--overwrite", "-q",
    )  # fmt: skip
    results = {}
    for name, path in (("original", model), ("gptq-4bit", quantized)):
        out = hfcompress(
            "evaluate", path, "--dataset", heldout, "--seq-len", seq_len, "--max-windows", 40, "--json", "-q"
        )
        results[name] = json.loads(out)
    print(f"\n{'model':<10} {'perplexity':>10} {'weights MB':>11} {'bits/weight':>12}")
    for name, r in results.items():
        print(f"{name:<10} {r['perplexity']:>10.2f} {r['size_bytes'] / 1e6:>11.2f} {r['bits_per_weight']:>12.2f}")
    print(
        f"\nquantized model: {quantized} (load it with `import hfcompress` then AutoModelForCausalLM.from_pretrained)"
    )


if __name__ == "__main__":
    main()
