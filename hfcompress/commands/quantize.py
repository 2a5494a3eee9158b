"""Handlers of `hfcompress quantize gptq|rtn`."""

from __future__ import annotations

import argparse
import logging
import time

from ..io import check_output_dir
from ..quantization import GPTQConfig, RTNConfig, quantize
from ..quantization.modules import cast_unquantized
from ..quantization.save import save_quantized
from ..hub.record import Step
from .arguments import config_kwargs
from .recording import base_record, finish_output, push_if_asked, quality_metrics
from .loading import checkpoint_dtype, load_model, load_tokenizer

__all__ = ["run_bnb", "run_codebook", "run_gptq", "run_rtn"]

logger = logging.getLogger(__name__)


def _quantize_and_save(args: argparse.Namespace, config: RTNConfig) -> int:
    # Refuse a non-empty OUTPUT before spending minutes on calibration.
    check_output_dir(args.output, args.overwrite)
    if args.format == "compressed-tensors" and not config.sym:
        raise ValueError("--format compressed-tensors needs a symmetric grid: add --sym (or use --format hfcompress)")
    model = load_model(args.model, args.dtype)
    tokenizer = load_tokenizer(args.model)
    record = base_record(model, args.model, args, tokenizer)
    start = time.perf_counter()
    quantize(model, config, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    logger.info("quantized in %.1fs", seconds)
    quality = quality_metrics(model, args, tokenizer)
    # the layers left in full precision go back to the checkpoint's own dtype (often float16)
    cast_unquantized(model, checkpoint_dtype(args.model))
    settings = config.to_dict()
    data = None
    if "dataset" in settings:
        data = {k: settings.pop(k) for k in ("dataset", "num_samples", "seq_len", "batch_size")}
    step = Step("quantization", config.method, settings, data, seconds)

    def finish(staging):
        finish_output(record, step, model, args, staging, quality, requires_hfcompress=args.format == "hfcompress")

    save_quantized(
        model, args.output, format=args.format, tokenizer=tokenizer, source=args.model, overwrite=args.overwrite, on_staging=finish
    )
    logger.info("wrote %s", args.output)
    push_if_asked(args)
    return 0


def run_gptq(args: argparse.Namespace) -> int:
    return _quantize_and_save(args, GPTQConfig(**config_kwargs(args, GPTQConfig)))


def run_rtn(args: argparse.Namespace) -> int:
    return _quantize_and_save(args, RTNConfig(**config_kwargs(args, RTNConfig)))


def run_bnb(args: argparse.Namespace) -> int:
    from ..quantization.bnb import BnbConfig, load_bnb, require_bitsandbytes
    from .loading import resolve_model_path
    from .recording import save_model_output  # noqa: I001

    skip = [m.strip() for m in args.skip_modules.split(",") if m.strip()] if args.skip_modules else None
    config = BnbConfig(args.bits, args.quant_type, args.double_quant, args.compute_dtype, skip)
    require_bitsandbytes()
    check_output_dir(args.output, args.overwrite)
    base = load_model(args.model, args.dtype)
    tokenizer = load_tokenizer(args.model)
    record = base_record(base, args.model, args, tokenizer)
    dtype = next(base.parameters()).dtype
    del base
    start = time.perf_counter()
    model = load_bnb(resolve_model_path(args.model), config, dtype=dtype).eval()
    seconds = time.perf_counter() - start
    method = "int8" if config.bits == 8 else config.quant_type + ("+double-quant" if config.double_quant else "")
    step = Step("quantization", f"bitsandbytes-{method}", config.to_dict(), None, seconds)
    save_model_output(model, args, tokenizer, record, step, cast=False)
    return 0


def run_codebook(args: argparse.Namespace) -> int:
    """`hfcompress quantize kmeans|vq`."""
    from ..quantization.codebook_config import KMeansConfig, VQConfig
    from .recording import save_model_output

    config_cls = KMeansConfig if args.method == "kmeans" else VQConfig
    config = config_cls(**config_kwargs(args, config_cls))
    check_output_dir(args.output, args.overwrite)
    model = load_model(args.model, args.dtype)
    tokenizer = load_tokenizer(args.model)
    record = base_record(model, args.model, args, tokenizer)
    start = time.perf_counter()
    quantize(model, config, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    logger.info("quantized in %.1fs", seconds)
    settings = config.to_dict()
    data = {k: settings.pop(k) for k in ("dataset", "num_samples", "seq_len", "batch_size")}
    step = Step("quantization", config.method, settings, data if config.dataset is not None else None, seconds)
    save_model_output(model, args, tokenizer, record, step)
    return 0
