"""Model cards generated from the compression record, with `huggingface_hub.ModelCard` and a Jinja template.

The generated part sits between `<!-- hfcompress:begin ... -->` and `<!-- hfcompress:end -->`; text a user
wrote outside those markers is kept, and so are their front-matter keys (ours are updated). Rendering is
deterministic: the same record gives the same README.md and the same plot, byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from ..core.tasks import AUTO_CLASSES, task_of
from ..data import looks_local
from .record import RANK_PEAKS, CompressionRecord

__all__ = ["PLOT_FILE", "TEMPLATE", "generate_card", "render_card"]

logger = logging.getLogger(__name__)

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md.jinja"
PLOT_FILE = "hfcompress_metrics.png"
_BEGIN = "<!-- hfcompress:begin"
_END = "<!-- hfcompress:end -->"
_TECHNIQUE_TAGS = {
    "quantization": "quantized",
    "factorization": "low-rank",
    "lora-merge": "lora",
    "convolution-decomposition": "low-rank",
}
_METRICS = [
    ("size_bytes", "weights on disk", lambda v: f"{v / 1e6:.2f} MB"),
    ("parameters", "parameters", lambda v: f"{v:,}"),
    ("bits_per_weight", "bits per weight (compressed layers)", lambda v: f"{v:.2f}"),
    ("model_bits_per_parameter", "bits per parameter (whole model)", lambda v: f"{v:.2f}"),
    ("perplexity", "perplexity", lambda v: f"{v:.3f}"),
    ("accuracy", "accuracy", lambda v: f"{v:.4f}"),
    ("latency_s", "latency", lambda v: f"{v * 1e3:.1f} ms"),
]


def _settings(config: dict) -> str:
    shown = {k: v for k, v in sorted(config.items()) if v is not None and k not in ("dataset", "coverage") and v != []}
    return ", ".join(f"`{k}={v}`" for k, v in shown.items()).replace("|", "\\|") or "-"


def _memory(memory: dict | None) -> str | None:
    if not memory or "peak_rss_bytes" not in memory:
        return None
    text = f"{memory['peak_rss_bytes'] / 2**20:,.0f} MiB resident"
    ranks = memory.get(RANK_PEAKS)
    if ranks and len(ranks) > 1:  # across processes: the memory above is rank 0's
        text += f" (rank 0; the {len(ranks)} processes together {sum(ranks) / 2**20:,.0f} MiB)"
    if memory.get("peak_gpu_bytes"):
        text += f", {memory['peak_gpu_bytes'] / 2**20:,.0f} MiB on the GPU"
    return text


def _coverage(summary: dict | None) -> str | None:
    """One line of what a step compressed and what it left out, with the reasons."""
    if not summary:
        return None
    done = ", ".join(f"{v['layers']} {cls} layers" for cls, v in summary.get("compressed", {}).items()) or "nothing"
    left = "; ".join(f"{reason}: {v['tensors']}" for reason, v in summary.get("left_out", {}).items())
    return f"compressed {done}" + (f"; left in full precision: {left}" if left else "")


def dataset_label(dataset) -> str:
    """How a card names a dataset: a Hub dataset by its name, a local file or folder by its own name (the path
    means nothing to a reader of the card)."""
    text = str(dataset)
    return os.path.basename(text.rstrip("/")) if looks_local(text) or os.path.exists(text) else text


def _data(data: dict) -> str:
    """The calibration data of a step: the dataset's name, then its settings."""
    name = f"{dataset_label(data['dataset'])}: " if data.get("dataset") else ""
    return (name + _settings(data)).replace("|", "\\|")


def _metric_rows(record: CompressionRecord) -> list[dict]:
    before, after = record.metrics.get("before", {}), record.metrics.get("after", {})
    rows = []
    for key, name, fmt in _METRICS:
        if after.get(key) is None:
            continue
        b, a = before.get(key), after[key]
        change = f"{100 * (a / b - 1):+.1f}%" if isinstance(b, (int, float)) and b else "-"
        rows.append({"name": name, "before": fmt(b) if b is not None else "-", "after": fmt(a), "change": change})
    for task, scores in (after.get("tasks") or {}).items():  # lm-eval tasks (--eval-tasks)
        for metric, a in scores.items():
            b = (before.get("tasks") or {}).get(task, {}).get(metric)
            change = f"{100 * (a - b):+.1f} points" if b is not None else "-"
            shown = "-" if b is None else f"{b:.4f}"
            rows.append({"name": f"{task} {metric}", "before": shown, "after": f"{a:.4f}", "change": change})
    return rows


def _base_label(record: CompressionRecord) -> str:
    return record.base_hub_id or os.path.basename(record.base_model.rstrip("/"))


def _base_description(record: CompressionRecord) -> str:
    if record.base_hub_id:
        return f"[`{record.base_hub_id}`](https://huggingface.co/{record.base_hub_id})"
    return f"`{_base_label(record)}` (a local model, not on the Hub)"


def _load_code(
    record: CompressionRecord, repo_id: str | None, quant_method: str | None = None, auto: str = "AutoModelForCausalLM"
) -> str:
    target = repo_id or "path/to/this/model"
    lines = []
    if record.loading.get("requires_hfcompress", True):
        lines.append("import hfcompress  # registers the loader of hfcompress checkpoints (pip install hfcompress)")
    elif quant_method == "compressed-tensors" and record.loading.get("not_in_transformers"):
        return "\n".join([
            f"# vLLM serves it as it is; transformers does not load it ({record.loading['not_in_transformers']}):",
            "# hfcompress reads it (pip install hfcompress)",
            "import hfcompress",
            "",
            f'model = hfcompress.load_compressed_tensors("{target}")',
        ])  # fmt: skip
    elif quant_method == "compressed-tensors" and record.loading.get("packed_zero_points"):
        lines += [
            "# asymmetric grids: vLLM serves it as it is; transformers reads their zero points with",
            "# pip install 'compressed-tensors==0.17.0' (0.18 to 0.20.1 refuse them: vllm-project/llm-compressor#1618);",
            f'# with any version: import hfcompress; model = hfcompress.load_compressed_tensors("{target}")',
        ]
    elif quant_method == "compressed-tensors":
        lines.append("# needs the compressed-tensors package (pip install compressed-tensors); vLLM serves it as it is")
    lines += [f"from transformers import {auto}", "", f'model = {auto}.from_pretrained("{target}")']
    return "\n".join(lines)


def _auto_class(folder: Path) -> str:
    """The transformers auto class that loads the model in `folder` with its head (`core.tasks`)."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    try:
        return AUTO_CLASSES[task_of(config.get("model_type"), config.get("architectures"))]
    except ValueError:
        return "AutoModel"


def _quant_method(folder: Path) -> str | None:
    """The `quant_method` of the model config in `folder`, or None (no config, or not quantized)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    return (json.loads(path.read_text(encoding="utf-8")).get("quantization_config") or {}).get("quant_method")


def _card_data(record: CompressionRecord, existing: dict, repo_id: str | None):
    techniques = [step.technique for step in record.steps]
    tags = ["hfcompress", *dict.fromkeys(_TECHNIQUE_TAGS.get(t, t) for t in techniques)]
    tags += [step.method for step in record.steps if step.method not in tags]
    for step in record.steps:
        if step.technique == "quantization" and "bits" in step.config:
            tags.append(f"{step.config['bits']}-bit")
    data = dict(existing)
    data.update(
        library_name="transformers",
        tags=list(dict.fromkeys([*(existing.get("tags") or []), *tags])),
    )
    if record.base_hub_id:  # the Hub links the models; a local base is described in the text instead
        data.update(
            base_model=record.base_hub_id,
            base_model_relation="quantized" if "quantization" in techniques else "finetune",
        )
    else:
        data.pop("base_model", None)
        data.pop("base_model_relation", None)
    if record.pipeline_tag:
        data["pipeline_tag"] = record.pipeline_tag
    if record.license and "license" not in existing:
        data["license"] = record.license
    data.pop("model-index", None)
    after = record.metrics.get("after", {})
    evaluation = record.evaluation or {}
    if after.get("perplexity") is not None and evaluation.get("dataset"):
        data["eval_results"] = [
            EvalResult(
                task_type=record.pipeline_tag or "text-generation",
                dataset_type=dataset_label(evaluation["dataset"]),
                dataset_name=dataset_label(evaluation["dataset"]),
                metric_type="perplexity",
                metric_value=round(float(after["perplexity"]), 4),
                metric_name="perplexity",
            )
        ]
        data["model_name"] = repo_id or existing.get("model_name") or f"{_base_label(record)}-hfcompress"
    return ModelCardData(**data)


def _plot(record: CompressionRecord, path: Path) -> bool:
    before, after = record.metrics.get("before", {}), record.metrics.get("after", {})
    quality = next(
        (k for k in ("perplexity", "accuracy") if before.get(k) is not None and after.get(k) is not None), None
    )
    if quality is None or before.get("size_bytes") is None or after.get("size_bytes") is None:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: the card has no plot (pip install 'hfcompress[hub]')")
        return False
    latency = before.get("latency_s") is not None and after.get("latency_s") is not None
    figure, axes = plt.subplots(1, 2 if latency else 1, figsize=(8 if latency else 4.5, 3.2), dpi=100, squeeze=False)
    ax = axes[0][0]
    for label, values, color in (("original", before, "#888888"), ("compressed", after, "#d95f02")):
        ax.scatter(values["size_bytes"] / 1e6, values[quality], color=color, label=label, s=40)
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel(quality)
    ax.legend(frameon=False)
    if latency:
        bars = axes[0][1]
        bars.bar(
            ["original", "compressed"],
            [before["latency_s"] * 1e3, after["latency_s"] * 1e3],
            color=["#888888", "#d95f02"],
        )
        bars.set_ylabel("latency (ms)")
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})
    plt.close(figure)
    return True


def _split_existing(text: str) -> tuple[str, str]:
    """The user's text before and after our generated block (all of it goes before when there is none)."""
    start = text.find(_BEGIN)
    end = text.find(_END)
    if start == -1 or end == -1:
        return text.strip(), ""
    return text[:start].strip(), text[end + len(_END) :].strip()


def render_card(record: CompressionRecord, folder: str | os.PathLike, repo_id: str | None = None, template=None):
    """The `ModelCard` for the model in `folder` (merged with its existing README.md); writes the plot."""

    folder = Path(folder)
    existing_data, user_before, user_after = {}, "", ""
    readme = folder / "README.md"
    if readme.is_file():
        existing = ModelCard.load(readme)
        existing_data = existing.data.to_dict()
        user_before, user_after = _split_existing(existing.text)
    plot = PLOT_FILE if _plot(record, folder / PLOT_FILE) else None
    steps = [
        {
            "technique": step.technique,
            "method": step.method,
            "settings": _settings(step.config),
            "data": _data(step.data) if step.data else "-",
            "coverage": _coverage(step.config.get("coverage")),
            "memory": _memory(step.memory),
        }
        for step in record.steps
    ]
    names = ", ".join(f"{s['technique']} ({s['method']})" for s in steps) or "no step"
    evaluation = record.evaluation or {}
    protocol = (
        f"on `{dataset_label(evaluation['dataset'])}`, {evaluation.get('num_windows', '?')} windows of "
        f"{evaluation.get('seq_len', '?')} tokens" if evaluation.get("dataset") else None
    )  # fmt: skip
    try:
        card = _render(
            _card_data(record, existing_data, repo_id),
            Path(template or TEMPLATE),
            title=f"{repo_id or _base_label(record) + ' (hfcompress)'}",
            summary=f"{_base_description(record)} compressed with hfcompress: {names}.",
            steps=steps,
            base_model=_base_label(record),
            metrics=_metric_rows(record),
            evaluation=protocol,
            hardware=record.hardware if record.metrics.get("after", {}).get("latency_s") is not None else None,
            plot=plot,
            load_code=_load_code(record, repo_id, _quant_method(folder), _auto_class(folder)),
            command=record.command,
            libraries=record.libraries,
        )
    except SecurityError as e:
        raise ValueError(f"the model card template {template or TEMPLATE} tried something unsafe: {e}") from e
    except Exception as e:  # jinja2 raises many types; the user needs to know which template broke
        raise ValueError(
            f"the model card template {template or TEMPLATE} failed to render: {type(e).__name__}: {e}"
        ) from e
    if user_before or user_after:
        generated = card.text.strip()
        card.text = "\n\n".join(part for part in (user_before, generated, user_after) if part) + "\n"
    return card


def generate_card(folder: str | os.PathLike, repo_id: str | None = None, template=None) -> Path:
    """(Re)write `folder/README.md` from `folder/hfcompress_record.json`; returns its path."""
    record = CompressionRecord.load(folder)
    card = render_card(record, folder, repo_id, template)
    path = Path(folder) / "README.md"
    content = str(card)
    content = re.sub(r"\n{3,}", "\n\n", content)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)
    logger.debug("wrote %s", path)  # callers say where: inside a command it is a staging folder, gone later
    return path


def _render(card_data: ModelCardData, template: Path, **values) -> ModelCard:
    """`ModelCard.from_template`, in a sandboxed Jinja environment: a template (possibly the user's own) can read
    the values it is given, not reach into Python."""
    text = SandboxedEnvironment().from_string(template.read_text(encoding="utf-8"))
    return ModelCard(text.render(card_data=card_data.to_yaml(), **{**card_data.to_dict(), **values}))
