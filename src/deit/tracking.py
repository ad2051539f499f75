"""Experiment tracking: `metrics.jsonl` beside the run, and an aim run in an embedded repo.

Only process 0 writes. Metric names are `train/loss`, `val/acc1`, ...; in aim the part
before the slash becomes the `subset` context so train and val curves share one chart.
"""

import json
import math
import os
from pathlib import Path
from typing import Any

import fsspec
import jax
from fsspec.implementations.local import LocalFileSystem

from deit.fileio import write_text


class Tracker:
    """`output_dir` may be local or an fsspec URL (gs://...): a remote metrics.jsonl is rewritten
    whole at each event (objects cannot be appended to), and the aim repo then defaults to
    ~/.cache/deit/aim since aim needs a local folder. `resume_step`: events logged after that
    step by an interrupted run are dropped, so the file reads as one uninterrupted run.
    `run_hash`: the aim run of the interrupted run (its checkpoint records it), reopened so a
    resumed run continues one aim run; aim reopens a run whose process was killed, and a value
    tracked again at a step replaces the old one, so each series has each step once. Where it
    cannot be reopened (its repo moved, say), a new run records the old hash as `resumed_from`."""

    def __init__(self, output_dir: str | os.PathLike, hparams: dict[str, Any], aim_repo: str | None = None,
                 experiment: str = "deit", resume_step: int | None = None, run_hash: str | None = None):
        self.enabled = jax.process_index() == 0
        self.run = None
        if not self.enabled:
            return
        self.url = str(output_dir).rstrip("/") + "/metrics.jsonl"
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.remote = not isinstance(self.fs, LocalFileSystem)
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        self.lines: list[str] = []
        if self.fs.exists(self.path):
            with self.fs.open(self.path, "r") as f:
                self.lines = [ln for ln in f.read().splitlines() if ln.strip()]
            if resume_step is not None:
                self.lines = [ln for ln in self.lines if json.loads(ln)["step"] <= resume_step]
                self._rewrite()
        self.file = None if self.remote else open(self.path, "a", buffering=1)
        try:
            import aim

            default = os.path.expanduser("~/.cache/deit/aim") if self.remote else str(Path(output_dir).resolve().parent)
            repo = aim_repo or default
            Path(repo).mkdir(parents=True, exist_ok=True)
            self.run = None
            if run_hash:
                try:
                    self.run = aim.Run(run_hash=run_hash, repo=repo, experiment=experiment)
                except Exception as e:  # noqa: BLE001 - a new run below, which says where it continues from
                    print(f"warning: cannot reopen aim run {run_hash} ({type(e).__name__}: {e}); "
                          "starting a new one", flush=True)
            if self.run is None:
                self.run = aim.Run(repo=repo, experiment=experiment)
                if run_hash:
                    self.run["resumed_from"] = run_hash
            self.run["hparams"] = hparams
        except Exception as e:  # tracking must never kill a training run
            print(f"warning: aim tracking disabled ({type(e).__name__}: {e})", flush=True)
            self.run = None

    def _rewrite(self) -> None:
        write_text(self.url, "".join(ln + "\n" for ln in self.lines))

    def set(self, key: str, value: Any) -> None:
        """A run-level value (e.g. hardware facts) beside the hparams in aim."""
        if self.enabled and self.run is not None:
            self.run[key] = value

    @property
    def run_hash(self) -> str | None:
        return self.run.hash if self.run is not None else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        line = json.dumps({"step": int(step), **clean})
        self.lines.append(line)
        if self.remote:
            self._rewrite()
        else:
            self.file.write(line + "\n")
        if self.run is not None:
            for name, value in clean.items():
                if not math.isfinite(value):
                    continue
                subset, _, metric = name.rpartition("/")
                try:
                    self.run.track(value, name=metric, step=int(step), context={"subset": subset or "train"})
                except Exception as e:  # noqa: BLE001 - e.g. its disk is full: metrics.jsonl still has it
                    print(f"warning: aim tracking disabled ({type(e).__name__}: {e})", flush=True)
                    self.run = None
                    break

    def close(self) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.close()
        if self.run is not None:
            try:
                self.run.close()
            except Exception as e:  # noqa: BLE001 - the run's metrics are in metrics.jsonl too
                print(f"warning: aim run not closed cleanly ({type(e).__name__}: {e})", flush=True)


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    fs, path = fsspec.core.url_to_fs(str(output_dir).rstrip("/") + "/metrics.jsonl")
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]
