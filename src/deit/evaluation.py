"""Exact validation: top-1/top-5 accuracy and loss over every sample of the validation shards.

Used by the training loop (`deit.trainer`, at each eval interval and for `--eval-only`) and by
`src/evaluate.py`. The last batch is padded and masked, and sums are reduced over hosts, so
every sample counts once whatever the batch size and process count.
"""

import json
from collections.abc import Iterator
from typing import Any

import jax
from tqdm import tqdm

from deit import sharding
from deit.data import loader
from deit.config import Config
from deit.model import ViT
from deit.runtime import total_skipped
from deit.steps import TrainState, eval_step


def valid_loader(cfg: Config) -> loader.Loader:
    """This process's part of the validation stream."""
    return loader.valid_batches(cfg, process_index=jax.process_index(), process_count=jax.process_count())


def evaluate_many(models: dict[str, ViT], batches: Iterator, mesh: jax.sharding.Mesh, progress: bool = False,
                  desc: str = "eval", criterion: str = "ce") -> dict[str, dict[str, float]]:
    """Exact accuracy of several models (e.g. the model and its EMA) in one pass over the data:
    padded batches are masked, sums reduced over hosts. The loss is the training `criterion`
    (without smoothing or mixing), as deit3-jax's validation."""
    totals: dict[str, Any] = {name: None for name in models}
    for images, labels, mask in tqdm(batches, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        batch = sharding.shard_batch(mesh, images, labels, mask)
        for name, model in models.items():
            with sharding.mesh_context([b.sharding for b in batch]):  # batch-sharded activations
                sums = eval_step(model, *batch, criterion=criterion)
            totals[name] = sums if totals[name] is None else jax.tree.map(lambda a, b: a + b, totals[name], sums)
    # One cross-process gather for all models (every process calls it the same number of times).
    skipped = total_skipped(batches) if hasattr(batches, "skipped") else 0
    results = {}
    for name, t in totals.items():
        n = float(t["num_samples"]) if t is not None else 0.0
        if n == 0:
            raise ValueError("validation produced no samples")
        results[name] = {"acc1": float(t["acc1"]) / n, "acc5": float(t["acc5"]) / n, "loss": float(t["loss"]) / n,
                         "num_samples": int(n), "skipped": skipped}
    return results


def evaluate(model: ViT, batches: Iterator, mesh: jax.sharding.Mesh, progress: bool = False,
             desc: str = "eval", criterion: str = "ce") -> dict[str, float]:
    """`evaluate_many` for one model: acc1, acc5, loss, num_samples, skipped."""
    return evaluate_many({"model": model}, batches, mesh, progress, desc, criterion)["model"]


def eval_only(cfg: Config, state: TrainState, mesh: jax.sharding.Mesh) -> dict[str, float]:
    """Evaluate the run's model (pretrained or resumed) once; print and return the metrics."""
    batches = valid_loader(cfg)
    try:
        val = evaluate(state.model, batches, mesh, progress=cfg.progress and jax.process_index() == 0,
                       criterion=cfg.loss.criterion)
    finally:
        batches.close()
    results = {f"val/{k}": v for k, v in val.items()}
    if jax.process_index() == 0:
        print(json.dumps({"step": int(state.step), **results}), flush=True)
    return results
