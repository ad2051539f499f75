"""Experiment tracking: `metrics.jsonl` beside the run, and an aim run in an embedded repo.

Only process 0 writes. Metric names are `train/loss`, `val/acc1`, ...; in aim the part
before the slash becomes the `subset` context so train and val curves share one chart.
"""

import json
import math
import os
from pathlib import Path
from typing import Any

import jax


class Tracker:
    def __init__(self, output_dir: str | os.PathLike, hparams: dict[str, Any], aim_repo: str | None = None,
                 experiment: str = "deit", resume_hash: str | None = None):
        self.enabled = jax.process_index() == 0
        self.path = Path(output_dir) / "metrics.jsonl"
        self.run = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)
        try:
            import aim

            repo = aim_repo or str(Path(output_dir).resolve().parent)
            Path(repo).mkdir(parents=True, exist_ok=True)
            self.run = aim.Run(run_hash=resume_hash, repo=repo, experiment=experiment)
            self.run["hparams"] = hparams
        except Exception as e:  # tracking must never kill a training run
            print(f"warning: aim tracking disabled ({type(e).__name__}: {e})", flush=True)
            self.run = None

    @property
    def run_hash(self) -> str | None:
        return self.run.hash if self.run is not None else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self.run is not None:
            for name, value in clean.items():
                if not math.isfinite(value):
                    continue
                subset, _, metric = name.rpartition("/")
                self.run.track(value, name=metric, step=int(step), context={"subset": subset or "train"})

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.run is not None:
            self.run.close()


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, float]]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
