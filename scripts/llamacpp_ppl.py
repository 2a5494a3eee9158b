"""Run by `bench_gguf.py` in a Python that has llama-cpp-python: a GGUF file's perplexity on given token windows
(the same ids transformers sees, no re-tokenization) and its decode speed, printed as one JSON line.

    /path/to/venv/bin/python scripts/llamacpp_ppl.py MODEL.gguf WINDOWS.json [--decode-tokens 64] [--logits OUT.npy]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import numpy as np
from llama_cpp import Llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("windows", help="JSON list of token-id lists")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--logits", help="also write the first window's logits here (.npy, float32)")
    args = parser.parse_args()
    windows = json.load(open(args.windows, encoding="utf-8"))
    seq_len = len(windows[0])
    llm = Llama(args.model, n_ctx=seq_len, logits_all=True, n_threads=args.threads, n_batch=seq_len, verbose=False)
    nll, count = 0.0, 0
    for index, window in enumerate(windows):
        llm.reset()
        llm.eval(window)
        if index == 0 and args.logits:
            np.save(args.logits, np.asarray(llm.scores[: len(window)], dtype=np.float32), allow_pickle=False)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll -= float(log_probs[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    llm.reset()
    start = time.perf_counter()
    generated = 0
    for _ in llm.generate(windows[0][:8], temp=0.0):
        generated += 1
        if generated >= args.decode_tokens:
            break
    seconds = time.perf_counter() - start
    print(json.dumps({"perplexity": math.exp(nll / count), "tokens": count, "decode_tokens_per_s": generated / seconds,
                      "machine": platform.processor() or platform.machine()}))  # fmt: skip


if __name__ == "__main__":
    main()
