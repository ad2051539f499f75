"""The training loop: build sharded state, stream batches, step, log, evaluate, checkpoint."""

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import numpy as np
from tqdm import tqdm

from deit import checkpoint, data, finetune, optim, sharding
from deit.config import Config
from deit.interop import load_model
from deit.model import ViT, forward_flops
from deit.steps import TrainState, eval_step, init_state, make_train_step
from deit.tracking import Tracker

ENV_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def resolve_env(name: str, value: str | None) -> str | None:
    """Expand `$GCS_DATASET_DIR`-style variables; an unset one is an error naming it."""
    if value is None:
        return None
    missing = [m for m in ENV_VAR.findall(value) if m not in os.environ]
    if missing:
        raise ValueError(f"{name}={value!r}: environment variable ${missing[0]} is not set "
                         f"(export it or pass --{name.replace('_', '-')})")
    return os.path.expandvars(value)


def resolve_paths(cfg: Config) -> Config:
    d = cfg.data
    d = dataclasses.replace(d, train_dataset_shards=resolve_env("train_dataset_shards", d.train_dataset_shards),
                            valid_dataset_shards=resolve_env("valid_dataset_shards", d.valid_dataset_shards),
                            label_mapping=resolve_env("label_mapping", d.label_mapping))
    return dataclasses.replace(cfg, data=d, pretrained_ckpt=resolve_env("pretrained_ckpt", cfg.pretrained_ckpt))


def check_batch(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    n = mesh.size
    for name, b in (("train_batch_size", cfg.data.train_batch_size), ("valid_batch_size", cfg.data.valid_batch_size)):
        if b % n:
            raise ValueError(f"{name}={b} is not divisible by the device count {n}")
    if cfg.data.train_batch_size % (n * cfg.optim.grad_accum):
        raise ValueError(f"train_batch_size={cfg.data.train_batch_size} is not divisible by "
                         f"devices x grad_accum = {n} x {cfg.optim.grad_accum}")


def create_state(cfg: Config, mesh: jax.sharding.Mesh, tx) -> tuple[TrainState, Any]:
    """The train state created directly in its shardings (no full host copy for big models)."""
    ema = cfg.optim.model_ema

    def make() -> TrainState:
        return init_state(ViT(cfg.model, key=jax.random.key(cfg.init_seed)), tx, ema)

    abstract, static = eqx.partition(eqx.filter_eval_shape(make), lambda x: isinstance(x, jax.ShapeDtypeStruct))
    shardings = sharding.state_shardings(mesh, abstract, cfg.model.layers)
    arrays = jax.jit(lambda: eqx.filter(make(), eqx.is_array), out_shardings=shardings)()
    state = eqx.combine(arrays, static)
    if cfg.pretrained_ckpt:  # fine-tune: the fresh model's structure, filled with pretrained weights
        params, model_static = eqx.partition(finetune.load_pretrained(cfg, state.model), eqx.is_array)
        build = lambda p: eqx.filter(init_state(eqx.combine(p, model_static), tx, ema), eqx.is_array)
        state = eqx.combine(jax.jit(build, out_shardings=shardings)(params), static)
    return state, shardings


def valid_loader(cfg: Config) -> data.Loader:
    return data.valid_batches(cfg, process_index=jax.process_index(), process_count=jax.process_count())


def evaluate_many(models: dict[str, ViT], batches: Iterator, mesh: jax.sharding.Mesh, progress: bool = False,
                  desc: str = "eval") -> dict[str, dict[str, float]]:
    """Exact accuracy of several models (e.g. the model and its EMA) in one pass over the data:
    padded batches are masked, sums reduced over hosts."""
    totals: dict[str, Any] = {name: None for name in models}
    for images, labels, mask in tqdm(batches, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        batch = sharding.shard_batch(mesh, images, labels, mask)
        for name, model in models.items():
            sums = eval_step(model, *batch)
            totals[name] = sums if totals[name] is None else jax.tree.map(lambda a, b: a + b, totals[name], sums)
    results = {}
    for name, t in totals.items():
        n = float(t["num_samples"]) if t is not None else 0.0
        if n == 0:
            raise ValueError("validation produced no samples")
        results[name] = {"acc1": float(t["acc1"]) / n, "acc5": float(t["acc5"]) / n, "loss": float(t["loss"]) / n,
                         "num_samples": int(n)}
    return results


def evaluate(model: ViT, batches: Iterator, mesh: jax.sharding.Mesh, progress: bool = False,
             desc: str = "eval") -> dict[str, float]:
    return evaluate_many({"model": model}, batches, mesh, progress, desc)["model"]


def load_teacher(cfg: Config, mesh: jax.sharding.Mesh) -> ViT | None:
    """The distillation teacher, replicated; None without distillation."""
    d = cfg.distill
    if d.distillation_type == "none":
        return None
    if not cfg.model.distilled:
        raise ValueError(f"distillation_type={d.distillation_type!r} needs a distilled student (--distilled)")
    if not d.teacher_ckpt:
        raise ValueError(f"distillation_type={d.distillation_type!r} needs --teacher-ckpt")
    teacher = load_model(resolve_env("teacher_ckpt", d.teacher_ckpt))
    if teacher.cfg.labels != cfg.model.labels:
        raise ValueError(f"teacher_ckpt={d.teacher_ckpt!r} has labels={teacher.cfg.labels}, "
                         f"the student {cfg.model.labels}")
    if teacher.cfg.image_size != cfg.model.image_size and teacher.cfg.posemb == "learnable":
        teacher = finetune.adapt_pretrained(teacher, ViT(dataclasses.replace(teacher.cfg, image_size=cfg.model.image_size),
                                                         key=jax.random.key(0)))
    return jax.device_put(teacher, sharding.replicated(mesh))


def eval_only(cfg: Config, state: TrainState, mesh: jax.sharding.Mesh) -> dict[str, float]:
    """Evaluate the run's model (pretrained or resumed) once; print and return the metrics."""
    batches = valid_loader(cfg)
    try:
        val = evaluate(state.model, batches, mesh, progress=cfg.progress and jax.process_index() == 0)
    finally:
        batches.close()
    results = {f"val/{k}": v for k, v in val.items()} | {"val/skipped": float(batches.skipped)}
    if jax.process_index() == 0:
        print(json.dumps({"step": int(state.step), **results}), flush=True)
    return results


def train(cfg: Config) -> dict[str, float]:
    cfg = resolve_paths(cfg)
    out = Path(cfg.output_dir)
    mesh = sharding.make_mesh(cfg.fsdp)
    check_batch(cfg, mesh)
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (out / "config.json").write_text(cfg.to_json(indent=1))

    skeleton = eqx.filter_eval_shape(ViT, cfg.model, key=jax.random.key(0))
    opt = optim.build(cfg, skeleton)
    state, shardings = create_state(cfg, mesh, opt.tx)
    best, loader_state = -1.0, None
    last = checkpoint.find(out, "last")
    if last is not None:
        state = checkpoint.restore(last, state)
        meta = checkpoint.read_meta(last)
        best = checkpoint.read_meta(checkpoint.find(out, "best") or last).get("val/acc1", -1.0)
        if meta.get("process_count") == jax.process_count() == 1:
            loader_state = meta.get("loader_state")  # exact; otherwise replay the stream to the step
        print(f"resumed from {last} at step {int(state.step)}", flush=True)

    if cfg.eval_only:
        return eval_only(cfg, state, mesh)
    teacher = load_teacher(cfg, mesh)
    train_step = make_train_step(cfg, opt.tx, opt.schedule, shardings)
    start = int(state.step)
    total = cfg.optim.training_steps
    batches = data.train_batches(cfg, process_index=jax.process_index(), process_count=jax.process_count(),
                                 **({"state": loader_state} if loader_state else {"start_step": start}))
    tracker = Tracker(out, cfg.to_dict(), cfg.aim_repo, experiment=out.name)
    flops_per_image = 3 * forward_flops(cfg.model)  # forward + backward
    results: dict[str, float] = {}
    window: list[dict[str, jax.Array]] = []
    t_window, n_window = time.perf_counter(), 0
    bar = tqdm(total=total, initial=start, desc="train", disable=not (cfg.progress and jax.process_index() == 0),
               dynamic_ncols=True)
    try:
        for step in range(start, total):
            images, labels = next(batches)
            state, metrics = train_step(state, *sharding.shard_batch(mesh, images, labels), teacher)
            window.append(metrics)
            n_window += cfg.data.train_batch_size
            done = step + 1
            bar.update(1)
            if done % cfg.log_interval == 0 or done == total:
                means = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
                elapsed = time.perf_counter() - t_window
                ips = n_window / elapsed
                log = {f"train/{k}": v for k, v in means.items()}
                log["train/images_per_sec"] = ips
                log["train/tflops_per_sec"] = ips * flops_per_image / 1e12
                log["train/skipped_samples"] = float(getattr(batches, "skipped", 0))
                tracker.log(done, log)
                bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{ips:.0f}", lr=f"{means['lr']:.2e}")
                window, t_window, n_window = [], time.perf_counter(), 0
            if done % cfg.eval_interval == 0 or done == total:
                models = {"val": state.model} | ({"val_ema": state.ema} if state.ema is not None else {})
                evals = evaluate_many(models, valid_loader(cfg), mesh,
                                      progress=cfg.progress and jax.process_index() == 0)
                val = evals["val"]
                results = {f"{name}/{k}": v for name, e in evals.items() for k, v in e.items()}
                tracker.log(done, results)
                bar.write(f"step {done}: val acc1 {val['acc1']:.4f} acc5 {val['acc5']:.4f} "
                          f"loss {val['loss']:.4f} ({val['num_samples']} samples)")
                info = {**results, "aim_run": tracker.run_hash, "loader_state": batches.state,
                        "process_count": jax.process_count()}
                checkpoint.save(out, "last", state, cfg.to_dict(), info)
                if val["acc1"] > best:
                    best = val["acc1"]
                    checkpoint.save(out, "best", state, cfg.to_dict(), info)
                t_window = time.perf_counter()  # evaluation time is not training throughput
    finally:
        bar.close()
        tracker.close()
        batches.close()
    if jax.process_index() == 0:
        (out / "results.json").write_text(json.dumps({"step": int(state.step), **results, "val/best_acc1": best}))
    return results
