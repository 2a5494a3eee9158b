"""Standard task evaluations through lm-evaluation-harness (the `lm-eval` package, `pip install
'hfcompress[lm-eval]'`), run on a model in memory: the compressed model as hfcompress built or loaded it, not a
re-export. `tasks_dir` adds lm-eval task YAML files from a folder, so tasks over local data run offline."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os

import torch
from torch import nn

__all__ = ["evaluate_tasks", "parse_tasks"]

logger = logging.getLogger(__name__)

PIP_LINE = "pip install 'hfcompress[lm-eval]'   (or: pip install lm-eval)"


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b']."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise ValueError(f"`tasks` must name at least one lm-eval task, got {tasks!r}")
    return names


@functools.cache
def _lm_eval_tasks():
    """lm-eval's own task index, built once a process (it reads some 15,000 task files: about 16 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _task_manager(names: list[str], tasks_dir: str | os.PathLike | None):
    """The index `names` are found in: the task files of `tasks_dir` alone when they hold every one of them as a
    task (not a group or tag, which may name lm-eval's own tasks), else lm-eval's with those files added."""
    from lm_eval.tasks import TaskManager

    if tasks_dir is None:
        return _lm_eval_tasks()
    if not os.path.isdir(tasks_dir):
        raise FileNotFoundError(f"tasks folder {os.fspath(tasks_dir)!r} does not exist (expected lm-eval task YAMLs)")
    local = TaskManager(include_path=os.fspath(tasks_dir), include_defaults=False)
    if all(name in local.all_subtasks for name in names):
        return local
    return TaskManager(include_path=os.fspath(tasks_dir))


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: str | list[str],
    tasks_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    quiet: bool = False,
) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on `model`; returns {task: {metric: value}} (acc, acc_norm, ...; standard errors
    left out). `limit`: the first N documents of each task."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError(f"task evaluation needs lm-evaluation-harness: {PIP_LINE}") from e
    names = parse_tasks(tasks)
    if quiet:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = _task_manager(names, tasks_dir)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        where = f" or in {os.fspath(tasks_dir)!r}" if tasks_dir else " (give --tasks-dir for task YAMLs of your own)"
        raise ValueError(f"unknown lm-eval tasks {unknown}: not among lm-eval's tasks{where}")
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device), dtype=_dtype(model))
    # lm-eval draws its progress bars on stderr with no switch to turn them off: quiet hides that stream (logging
    # keeps the stream it was configured with, so warnings and errors still show)
    try:
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            output = lm_eval.simple_evaluate(
                model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False,
                bootstrap_iters=0, verbosity="ERROR" if quiet else None,
            )  # fmt: skip
    except (ValueError, KeyError, TypeError, OSError, ImportError) as e:  # a task's YAML, data or template
        logger.debug("lm-eval failed", exc_info=True)
        where = f" (check the task files in {os.fspath(tasks_dir)!r})" if tasks_dir else ""
        raise ValueError(f"lm-eval could not run {names}: {type(e).__name__}: {e}{where}") from e
    except Exception as e:
        if type(e).__module__.startswith("jinja2"):  # a broken doc_to_text / doc_to_choice template
            where = f" in {os.fspath(tasks_dir)!r}" if tasks_dir else ""
            raise ValueError(f"an lm-eval task template{where} is not valid Jinja: {e}") from e
        raise
    results = {}
    for task, metrics in output["results"].items():
        values = {}
        for key, value in metrics.items():
            name = key.split(",")[0]
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and name not in ("sample_len",)
                and not name.endswith("_stderr")
            ):
                values[name] = float(value)
        results[task] = values
    return results


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
