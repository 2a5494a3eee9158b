"""A point of the search (`Candidate`) and the cache of what was measured, which `--resume` continues from."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CACHE_FILE", "Candidate", "SearchCache", "steps_key"]

logger = logging.getLogger(__name__)

CACHE_FILE = "cache.json"
SCORES_MEASURE = "fisher"  # what `scores` hold: Fisher-weighted GPTQ output errors (caches before held KL probes)


@dataclass
class Candidate:
    name: str
    technique: str
    steps: list[dict[str, Any]]
    note: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    built: bool = False  # its folder was written by the search itself (no recipe to run)


def steps_key(steps) -> str:
    return json.dumps(steps, sort_keys=True)


class SearchCache:
    """`cache.json` of a search: the fingerprint of its data and settings, the dense model's metrics, each
    evaluated candidate's steps and metrics, the sensitivity scores and what each phase cost."""

    def __init__(self, path: Path, fingerprint: str, resume: bool):
        self.path = path
        data = json.loads(path.read_text(encoding="utf-8")) if resume and path.is_file() else {}
        if data and data.get("fingerprint") != fingerprint:
            logger.warning("%s was measured with other data or settings; measuring again", path)
            data = {}
        self.data = {"fingerprint": fingerprint, "scores": {}, "candidates": {}, "seconds": {}, **data}
        if self.data.get("scores_measure") != SCORES_MEASURE:  # caches from before the Fisher scores
            self.data["scores"], self.data["scores_measure"] = {}, SCORES_MEASURE
        self.data.pop("sensitivity", None)

    def evaluated(self, candidate: Candidate, folder: Path) -> dict | None:
        """The metrics measured before for `candidate` (same steps, folder still there), else None."""
        cached = self.data["candidates"].get(candidate.name)
        if cached and cached.get("steps") == steps_key(candidate.steps) and folder.is_dir():
            return cached["metrics"]
        return None

    def add_seconds(self, phase: str, seconds: float) -> None:
        self.data["seconds"][phase] = self.data["seconds"].get(phase, 0.0) + seconds

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
