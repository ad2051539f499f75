"""The training loop: build sharded state, stream batches, step, log, evaluate, checkpoint."""

import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from deit import checkpoint, data, fileio, finetune, hardware, optim, sharding
from deit.config import Config, check_batches
from deit.interop import load_model
from deit.model import ViT, forward_flops, skeleton
from deit.steps import TrainState, eval_step, init_state, make_train_step
from deit.tracking import Tracker

ENV_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


# Where fine-tuning recipes look for `$GCS_MODEL_DIR/NAME-last.msgpack` when the variable is
# unset: the parent of the recipes' default output dirs (`outputs/NAME`), so a pre-training run
# is found by its -ft recipe as it is.
MODEL_DIR_DEFAULT = {"GCS_MODEL_DIR": "outputs"}


def resolve_env(name: str, value: str | None, defaults: dict[str, str] | None = None) -> str | None:
    """Expand `$GCS_DATASET_DIR`-style variables; an unset one (without a default) is an error naming it."""
    if value is None:
        return None
    env = {**(defaults or {}), **os.environ}
    missing = [m for m in ENV_VAR.findall(value) if m not in env]
    if missing:
        raise ValueError(f"{name}={value!r}: environment variable ${missing[0]} is not set "
                         f"(export it or pass --{name.replace('_', '-')})")
    return ENV_VAR.sub(lambda m: env[m.group(1)], value)


def resolve_paths(cfg: Config) -> Config:
    d = cfg.data
    d = dataclasses.replace(d, train_dataset_shards=resolve_env("train_dataset_shards", d.train_dataset_shards),
                            valid_dataset_shards=resolve_env("valid_dataset_shards", d.valid_dataset_shards),
                            label_mapping=resolve_env("label_mapping", d.label_mapping))
    ckpt = resolve_env("pretrained_ckpt", cfg.pretrained_ckpt, MODEL_DIR_DEFAULT)
    return dataclasses.replace(cfg, data=d, pretrained_ckpt=ckpt and finetune.find_pretrained(ckpt))


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


def has_validation(cfg: Config) -> bool:
    """deit3-jax validates only when validation shards are named (its in21k pre-training
    recipes name none: they log no val metrics and save `last` only)."""
    return bool(cfg.data.valid_dataset_shards)


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
    results = {}
    for name, t in totals.items():
        n = float(t["num_samples"]) if t is not None else 0.0
        if n == 0:
            raise ValueError("validation produced no samples")
        results[name] = {"acc1": float(t["acc1"]) / n, "acc5": float(t["acc5"]) / n, "loss": float(t["loss"]) / n,
                         "num_samples": int(n), "skipped": total_skipped(batches) if hasattr(batches, "skipped") else 0}
    return results


def evaluate(model: ViT, batches: Iterator, mesh: jax.sharding.Mesh, progress: bool = False,
             desc: str = "eval", criterion: str = "ce") -> dict[str, float]:
    return evaluate_many({"model": model}, batches, mesh, progress, desc, criterion)["model"]


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
        val = evaluate(state.model, batches, mesh, progress=cfg.progress and jax.process_index() == 0,
                       criterion=cfg.augment.criterion)
    finally:
        batches.close()
    results = {f"val/{k}": v for k, v in val.items()}
    if jax.process_index() == 0:
        print(json.dumps({"step": int(state.step), **results}), flush=True)
    return results


def init_distributed(cfg: Config) -> None:
    """Join the multi-controller runtime: explicit flags, or auto-detected on SLURM and Cloud TPU
    pod slices (jax.distributed reads their environment). Single-process runs skip it."""
    if cfg.coordinator_address:
        if cfg.num_processes is None or cfg.process_id is None:
            raise ValueError(f"coordinator_address={cfg.coordinator_address!r} needs --num-processes and --process-id")
        if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:  # CPU-only clusters: collectives over gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def check_output_dir(output_dir: str) -> None:
    """A local output dir must be creatable and writable; checked before anything is written."""
    if "://" in output_dir:
        return
    path = Path(output_dir).resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir={output_dir!r} is a file; allowed: a directory (existing or new)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        raise ValueError(f"output_dir={output_dir!r} is not writable ({parent} does not allow writing)")


def check_data(cfg: Config) -> None:
    """Shard patterns must match something before anything is compiled or written."""
    if not cfg.eval_only:
        data.expand_shards(cfg.data.train_dataset_shards)
    elif not has_validation(cfg):
        raise ValueError("eval_only=True needs validation data; pass --valid-dataset-shards")
    if has_validation(cfg):
        data.expand_shards(cfg.data.valid_dataset_shards)


class Preemption:
    """SIGTERM/SIGINT request a checkpoint at the next step boundary; a second signal exits at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.requested:
            os._exit(128 + signum)
        self.requested = True

    def agreed(self) -> bool:
        """Whether any process was signalled; all processes agree, so they stop at the same step."""
        if jax.process_count() == 1:
            return self.requested
        return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def resume(out: str, state: TrainState) -> tuple[TrainState, dict[str, Any] | None]:
    """The newest checkpoint that loads; corrupt ones are reported and skipped."""
    for path in checkpoint.candidates(out):
        try:
            restored = checkpoint.restore(path, state)
        except ValueError as e:
            print(f"warning: {e}; falling back to an older checkpoint", file=sys.stderr, flush=True)
            continue
        print(f"resumed from {path} at step {int(restored.step)}", flush=True)
        return restored, checkpoint.read_meta(path)
    return state, None


def gather_loader_states(batches: data.Loader) -> list[dict[str, int]]:
    """Every process's loader state (exact resume with the same process count)."""
    if jax.process_count() == 1:
        return [dict(batches.state)]
    keys = data.STATE_KEYS  # `copies` too: a batch can end inside a sample's repeats
    rows = multihost_utils.process_allgather(np.array([batches.state[k] for k in keys], np.int64))
    return [dict(zip(keys, map(int, r))) for r in np.asarray(rows).reshape(jax.process_count(), len(keys))]


def total_skipped(batches: data.Loader) -> int:
    if jax.process_count() == 1:
        return batches.skipped
    return int(np.asarray(multihost_utils.process_allgather(np.int64(batches.skipped))).sum())


def fault_step() -> int | None:
    """DEIT_FAULT=step:N: SIGKILL this process after step N (for the kill -9 tests)."""
    kind, _, n = os.environ.get(checkpoint.FAULT_ENV, "").partition(":")
    return int(n) if kind == "step" else None


def train(cfg: Config) -> dict[str, float]:
    cfg = resolve_paths(cfg)
    out = cfg.output_dir.rstrip("/")
    check_output_dir(out)
    check_data(cfg)
    init_distributed(cfg)
    mesh = sharding.make_mesh(cfg.fsdp)
    check_batches(cfg, mesh.size)
    writer = checkpoint.Writer(out, sync=not cfg.async_checkpoint)
    if jax.process_index() == 0:
        fileio.write_text(fileio.join(out, "config.json"), cfg.to_json(indent=1))

    opt = optim.build(cfg, skeleton(cfg.model))
    state, shardings = create_state(cfg, mesh, opt.tx)
    best, loader_state = -1.0, None
    if jax.process_index() == 0:
        checkpoint.remove_partial(out)
    state, meta = resume(out, state)
    if meta is not None:
        best = max([checkpoint.read_meta(p).get("val/acc1", -1.0) for p in checkpoint.candidates(out)] + [best])
        states = meta.get("loader_states")
        if states and len(states) == jax.process_count():
            loader_state = states[jax.process_index()]  # exact; otherwise replay the stream to the step

    if cfg.eval_only:
        return eval_only(cfg, state, mesh)
    teacher = load_teacher(cfg, mesh)
    train_step = make_train_step(cfg, opt.tx, opt.schedule, shardings)
    start = int(state.step)
    total = cfg.optim.training_steps
    batches = data.train_batches(cfg, process_index=jax.process_index(), process_count=jax.process_count(),
                                 **({"state": loader_state} if loader_state else {"start_step": start}))
    tracker = Tracker(out, cfg.to_dict(), cfg.aim_repo, experiment=out.rsplit("/", 1)[-1],
                      resume_step=start if meta is not None else None)
    flops_per_image = 3 * forward_flops(cfg.model)  # forward + backward
    peak, peak_source = hardware.peak_flops(cfg.optim.compute_dtype)
    tracker.set("hardware", {"peak_flops": peak, "peak_source": peak_source, "devices": jax.device_count(),
                             "device_kind": jax.devices()[0].device_kind})
    results: dict[str, float] = {}
    window: list[dict[str, jax.Array]] = []
    t_window, n_window = time.perf_counter(), 0
    bar = tqdm(total=total, initial=start, desc="train", disable=not (cfg.progress and jax.process_index() == 0),
               dynamic_ncols=True)
    preempt = Preemption()
    kill_at = fault_step()
    pending: dict[str, jax.Array] | None = None  # the previous step's metrics, read one step late

    def check_finite(m: dict[str, jax.Array], step: int) -> None:
        if int(m["bad_streak"]) >= cfg.max_bad_steps:
            raise RuntimeError(f"{int(m['bad_streak'])} consecutive steps with a non-finite loss or gradient norm "
                               f"(loss {float(m['loss'])}, grad_norm {float(m['grad_norm'])}) up to step {step}: "
                               f"stopping (max_bad_steps={cfg.max_bad_steps}); the last checkpoints in {out} are "
                               "intact and finite")

    def save(names: list[str], step: int, extra: dict[str, float]) -> None:
        info = {**extra, "aim_run": tracker.run_hash, "loader_states": gather_loader_states(batches),
                "process_count": jax.process_count()}
        writer.save(names, state, cfg.to_dict(), info)

    try:
        for step in range(start, total):
            images, labels = next(batches)
            state, metrics = train_step(state, *sharding.shard_batch(mesh, images, labels), teacher)
            if pending is not None:
                check_finite(pending, step)
            pending = metrics
            window.append(metrics)
            n_window += cfg.data.train_batch_size
            done = step + 1
            bar.update(1)
            names: list[str] = []
            if done % cfg.log_interval == 0 or done == total:
                check_finite(metrics, done)
                means = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0] if k != "bad_streak"}
                elapsed = time.perf_counter() - t_window
                ips = n_window / elapsed
                log = {f"train/{k}": v for k, v in means.items()}
                log["train/skipped_steps"] = float(state.skipped)
                log["train/images_per_sec"] = ips
                log["train/tflops_per_sec"] = ips * flops_per_image / 1e12
                log["train/mfu"] = ips * flops_per_image / peak  # model FLOPs only (no remat recompute)
                log["train/skipped_samples"] = float(total_skipped(batches))
                tracker.log(done, log)
                bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{ips:.0f}", lr=f"{means['lr']:.2e}")
                window, t_window, n_window = [], time.perf_counter(), 0
            if (done % cfg.eval_interval == 0 or done == total) and not has_validation(cfg):
                names.append("last")  # deit3-jax saves `last` at each eval interval, with or without data
            elif done % cfg.eval_interval == 0 or done == total:
                check_finite(metrics, done)
                models = {"val": state.model} | ({"val_ema": state.ema} if state.ema is not None else {})
                evals = evaluate_many(models, valid_loader(cfg), mesh, progress=cfg.progress and jax.process_index() == 0,
                                      criterion=cfg.augment.criterion)
                val = evals["val"]
                results = {f"{name}/{k}": v for name, e in evals.items() for k, v in e.items()}
                tracker.log(done, results)
                bar.write(f"step {done}: val acc1 {val['acc1']:.4f} acc5 {val['acc5']:.4f} "
                          f"loss {val['loss']:.4f} ({val['num_samples']} samples)")
                names.append("last")
                if val["acc1"] > best:
                    best = val["acc1"]
                    names.append("best")
                t_window = time.perf_counter()  # evaluation time is not training throughput
            if cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0 and "last" not in names:
                names.append("last")
            if cfg.keep_interval and done % cfg.keep_interval == 0:
                names.append(f"step-{done:08d}")
            if names:
                check_finite(metrics, done)
                save(names, done, results)
            if kill_at == done:
                writer.wait()  # a clean kill point; DEIT_FAULT=checkpoint:N kills mid-write
                os.kill(os.getpid(), signal.SIGKILL)
            if done < total and preempt.agreed():
                check_finite(metrics, done)
                if "last" not in names:
                    save(["last"], done, results)
                writer.wait()
                if jax.process_index() == 0:
                    print(f"preempted: saved checkpoint at step {done} in {checkpoint.checkpoint_dir(out, 'last')}",
                          file=sys.stderr, flush=True)
                return results
        writer.wait()
    finally:
        preempt.restore()
        bar.close()
        tracker.close()
        batches.close()
    if jax.process_index() == 0:
        best_acc1 = {"val/best_acc1": best} if has_validation(cfg) else {}
        fileio.write_text(fileio.join(out, "results.json"),
                              json.dumps({"step": int(state.step), **results, **best_acc1}))
    return results

