"""GPTQ and round-to-nearest on a mixture-of-experts model built from a trained one, scored on held-out text.

The model is ../shared/refmodel (a trained Llama) upcycled into a Mixtral (sparse upcycling, Komatsuzaki et al.
2022): its embeddings, attention and norms as they are, each of the E experts a copy of its MLP with independent
noise (`--noise`, relative to each weight's standard deviation, so the experts differ), and a random router that
sends each token to `--top-k` experts. It is saved to a folder and loaded back like any checkpoint, so every
figure comes from transformers' own Mixtral with its fused experts.

Rows: float32, RTN w4 g128, GPTQ w4 g128 with every calibration token through every expert (the default), and
GPTQ with each expert calibrated on the tokens routed to it. Every row is scored on the held-out texts of
scripts/bench_gptq.py (non-overlapping windows); the per-expert calibration token counts of both GPTQ rows are
printed after the table.

    python scripts/bench_moe.py
    python scripts/bench_moe.py --experts 8 --top-k 2 --num-samples 64 --max-windows 40
    python scripts/bench_moe.py --tiny-size      # only the checkpoint size of a tiny Mixtral, float32 and RTN w4 g128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_gptq import SHARED, add_data_arguments, prepare_data, score
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM
from transformers.utils import logging as hf_logging

import hfcompress
from hfcompress.evaluation import weights_size_bytes
from hfcompress.hub.record import hardware_description


def upcycle(dense, experts: int, top_k: int, noise: float, seed: int = 0) -> MixtralForCausalLM:
    """A Mixtral whose every expert is `dense`'s MLP plus noise, everything else `dense`'s own weights."""
    c = dense.config
    config = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, num_local_experts=experts, num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    moe = MixtralForCausalLM(config).eval()
    state = {k: v.float() for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, _ = moe.load_state_dict(state, strict=False)
    for i, layer in enumerate(dense.model.layers):
        mlp, block = layer.mlp, moe.model.layers[i].mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float()
        down = mlp.down_proj.weight.float()
        with torch.no_grad():
            for e in range(experts):
                block.experts.gate_up_proj[e] = gate_up + noise * gate_up.std() * torch.randn(
                    gate_up.shape, generator=generator
                )
                block.experts.down_proj[e] = down + noise * down.std() * torch.randn(down.shape, generator=generator)
            block.gate.weight.normal_(0.0, 0.02, generator=generator)
    left = [k for k in missing if ".mlp." not in k and not k.endswith("lm_head.weight")]
    if left:
        raise RuntimeError(f"upcycling left weights unset: {left[:3]}")
    return moe


def tiny_size() -> None:
    """A tiny Mixtral (8 experts, 2 layers, hidden 128, experts of 256, vocabulary 256) saved in float32 and after
    RTN w4 g128: its experts hold most weights, so their quantization decides the checkpoint's size."""
    config = MixtralConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "float")
        hfcompress.quantize(model, hfcompress.RTNConfig(bits=4, group_size=128))
        model.save_pretrained(Path(tmp) / "rtn")
        size = {name: weights_size_bytes(Path(tmp) / name) for name in ("float", "rtn")}
    print(f"tiny Mixtral: float32 {size['float']:,} bytes, RTN w4 g128 {size['rtn']:,} bytes "
          f"({size['rtn'] / size['float']:.3f}x)")  # fmt: skip


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def run(folder, config, heldout, out_dir) -> dict:
    model = load(folder)
    start = time.perf_counter()
    hfcompress.quantize(model, config)
    seconds = time.perf_counter() - start
    row = {"perplexity": score(model, heldout), "seconds": seconds}
    row["experts"] = model.hfcompress_coverage.get("experts", {})
    model.save_pretrained(out_dir)
    row["size_bytes"] = weights_size_bytes(out_dir)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"), help="the dense model to upcycle")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.05, help="expert noise, relative to each weight's std")
    add_data_arguments(parser, num_samples=64, max_windows=40)
    parser.add_argument("--tiny-size", action="store_true", help="only the checkpoint size of a tiny Mixtral")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.tiny_size:
        return tiny_size()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    heldout, calibration = prepare_data(args, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "moe"
        dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        upcycle(dense, args.experts, args.top_k, args.noise).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        rows = [{"method": "dense (refmodel)", "perplexity": score(dense, heldout), "seconds": 0.0, "size_bytes": None}]
        del dense
        rows.append({"method": "float32", "perplexity": score(load(folder), heldout), "seconds": 0.0})
        rows[-1]["size_bytes"] = weights_size_bytes(folder)
        runs = {
            "RTN w4 g128": hfcompress.RTNConfig(bits=4, group_size=128),
            "GPTQ w4 g128 (all tokens to every expert)": hfcompress.GPTQConfig(
                bits=4, group_size=128, dataset=calibration, num_samples=len(calibration)
            ),
            "GPTQ w4 g128 (routed tokens only)": hfcompress.GPTQConfig(
                bits=4, group_size=128, dataset=calibration, num_samples=len(calibration), calibrate_all_experts=False
            ),
        }
        for name, config in runs.items():
            rows.append({"method": name} | run(folder, config, heldout, Path(tmp) / name.replace(" ", "_")))
    report(args, rows, heldout, len(calibration))


def report(args, rows, heldout, calibration_windows: int) -> None:
    texts = list(heldout)
    print(f"# mixture-of-experts: {Path(args.model).name} upcycled to {args.experts} experts, top-{args.top_k}, "
          f"noise {args.noise}\n")  # fmt: skip
    print(f"{hardware_description()}; calibration {calibration_windows} x {args.seq_len} tokens of "
          f"{Path(args.calib).name}; held-out: {', '.join(f'{len(w)} windows of {n}' for n, w in heldout.items())}\n")  # fmt: skip
    float_row = next(r for r in rows if r["method"] == "float32")
    print("| method | " + " | ".join(f"ppl {t}" for t in texts) + " | vs float32 | seconds | weights MB |")
    print("| --- |" + " --- |" * (len(texts) + 3))
    for row in rows:
        ppl = row["perplexity"]
        rel = statistics.mean(ppl[t] / float_row["perplexity"][t] - 1 for t in texts)
        size = f"{row['size_bytes'] / 1e6:.1f}" if row.get("size_bytes") else "-"
        print(f"| {row['method']} | " + " | ".join(f"{ppl[t]:.3f}" for t in texts) + f" | {100 * rel:+.2f}% | "
              f"{row['seconds']:.1f} | {size} |")  # fmt: skip
    for row in rows:
        if row.get("experts"):
            print(f"\n{row['method']}: calibration tokens per expert, by layer")
            for name, entry in row["experts"].items():
                tokens = entry["tokens"]
                print(
                    f"- {name}: {tokens} (min {min(tokens)}, max {max(tokens)}; fewer than the inputs: {entry['few']})"
                )
    gptq = next(r for r in rows if r["method"].startswith("GPTQ w4 g128 (all"))
    rtn = next(r for r in rows if r["method"].startswith("RTN"))
    checks = {
        "GPTQ w4 g128 within 2% of float32 on every text": all(
            gptq["perplexity"][t] <= 1.02 * float_row["perplexity"][t] for t in texts
        ),
        "GPTQ beats RTN on every text": all(gptq["perplexity"][t] < rtn["perplexity"][t] for t in texts),
    }
    print()
    for check, ok in checks.items():
        print(f"- {'PASS' if ok else 'FAIL'}: {check}")
    print("\n" + json.dumps({"rows": [{k: v for k, v in r.items() if k != "experts"} for r in rows]}))


if __name__ == "__main__":
    sys.exit(main())
