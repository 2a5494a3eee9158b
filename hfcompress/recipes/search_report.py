"""The search's report: the Pareto front, the table, results.json and the plot."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

__all__ = ["pareto_front", "write_reports"]

logger = logging.getLogger(__name__)


def pareto_front(points: list, metric: str) -> list[str]:
    """Names of the points no other point beats on both size and the metric."""
    front = []
    for p in points:
        dominated = any(
            q.metrics["size_bytes"] <= p.metrics["size_bytes"] and q.metrics[metric] <= p.metrics[metric]
            and (q.metrics["size_bytes"], q.metrics[metric]) != (p.metrics["size_bytes"], p.metrics[metric])
            for q in points
        )  # fmt: skip
        if not dominated:
            front.append(p.name)
    return front


def write_reports(points, front, best, config, base, work: Path, failed=(), seconds: dict | None = None) -> dict:
    """Write pareto.md, pareto.png and results.json into `work`; `seconds` is what each phase of the search
    cost (wall time, summed over resumed runs). Returns the results."""
    rows = sorted(points, key=lambda p: p.metrics["size_bytes"])
    caption = (
        f"Budget {config.budget}; {config.metric} on the first {config.eval_max_windows} windows of {config.eval_seq_len} "
        f"tokens of {config.eval_dataset}; latency: one window, median of 3 runs.\n"
    )
    lines = [
        caption,
        f"| point | technique | bits/weight | size (MB) | parameters | {config.metric} | latency (ms) | meets budget | Pareto |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in rows:
        m = p.metrics
        mark = " **(chosen)**" if p is best else ""
        lines.append(
            f"| {p.name}{mark} | {p.technique} | {m['effective_bits']:.3f} | {m['size_bytes'] / 1e6:.2f} | {m['parameters']:,} | "
            f"{m[config.metric]:.3f} | {1000 * m['latency_s']:.1f} | {'yes' if m['meets_budget'] else 'no'} | "
            f"{'yes' if p.name in front else ''} |"
        )
    lines += [f"\n{c.name}: {c.note}" for c in failed]
    if seconds:
        phases = ", ".join(f"{name} {value:.1f}" for name, value in seconds.items())
        lines.append(f"\nCost of the search (seconds of wall time): {phases}; total {sum(seconds.values()):.1f}.")
    (work / "pareto.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot = _plot_pareto(rows, front, best, config, base, work / "pareto.png")
    results = {
        "budget": str(config.budget),
        "metric": config.metric,
        "chosen": best.name,
        "points": [
            {"name": p.name, "technique": p.technique, "note": p.note, "steps": p.steps, **p.metrics} for p in rows
        ],
        "pareto_front": front,
        "failed": {c.name: c.note for c in failed},
        "seconds": dict(seconds or {}),
        "plot": plot,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "budget"},
    }
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return results


def _plot_pareto(rows, front, best, config, base, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no Pareto plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    techniques = sorted({p.technique for p in rows})
    for technique, marker in zip(techniques, "osD^v<>", strict=False):  # one marker each, at most 7
        group = [p for p in rows if p.technique == technique]
        ax.scatter([p.metrics["size_bytes"] / 1e6 for p in group], [p.metrics[config.metric] for p in group],
                   marker=marker, label=technique, zorder=3)  # fmt: skip
        for p in group:
            ax.annotate(p.name, (p.metrics["size_bytes"] / 1e6, p.metrics[config.metric]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
    on_front = [p for p in rows if p.name in front]
    ax.plot(
        [p.metrics["size_bytes"] / 1e6 for p in on_front],
        [p.metrics[config.metric] for p in on_front],
        "k--",
        lw=0.8,
        label="Pareto front",
    )
    ax.scatter(
        [best.metrics["size_bytes"] / 1e6],
        [best.metrics[config.metric]],
        s=160,
        facecolors="none",
        edgecolors="red",
        label="chosen",
        zorder=4,
    )
    if config.budget.kind == "size":
        ax.axvline(
            config.budget.value * base.size_bytes / 1e6, color="red", lw=0.8, ls=":", label=f"budget {config.budget}"
        )
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel(config.metric)
    ax.set_yscale("log")
    ax.set_title(f"hfcompress search, budget {config.budget}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return os.fspath(path)
