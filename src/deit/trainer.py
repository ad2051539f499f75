"""The training loop: `train(cfg)` runs the steps and, at each, whatever is due.

`train` reads as the run: set up (paths, input checks, hosts, mesh, sharded state, resume),
then per step one jitted train step, a check for a streak of non-finite steps (`BadStreak`),
and what is due at that step (`itstime`): `log_metrics`, `run_eval`, `save` (the names the
save policy `checkpoint.names_due` gives) and the stop on preemption. The pieces live beside
it: the step in `deit.steps`, validation in `deit.evaluation`, paths, hosts and signals in
`deit.runtime`, checkpoint files and the save policy in `deit.checkpoint`. `Hooks` lets a
caller step into the run (the fault-injection tests do, through `tests/faults.py`).
"""

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from deit import checkpoint, evaluation, fileio, finetune, hardware, optim, runtime, sharding
from deit.config import Config, check_batches
from deit.data import loader
from deit.interop import load_model
from deit.model import ViT, forward_flops, skeleton
from deit.steps import TrainState, create_state, make_train_step
from deit.tracking import Tracker


def _nothing(*args: Any) -> None:
    """A hook that does nothing."""


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Points where a caller steps into a run (fault injection in tests); none does anything by default."""

    after_step: Callable[[int, checkpoint.Writer], None] = _nothing
    """(step, writer) after a step's logs, evaluation and checkpoints are issued (the writer may still be writing)."""
    before_commit: Callable[[str, int], None] = _nothing
    """(name, step) for each checkpoint once its files are written, before its meta.json commits it."""
    before_save: Callable[[int], None] = _nothing
    """(step) on every process when a save is due, before anything is gathered for it."""


def itstime(step: int, every: int, last: int | None = None) -> bool:
    """Whether something done every `every` steps (0: never) is due after `step` steps; always at `last`."""
    return (every > 0 and step % every == 0) or step == last


class BadStreak:
    """Stops the run after `max_bad_steps` consecutive non-finite steps (each skipped by the
    step's guard). A step's metrics are read one step late, so the host does not wait for the
    step it just dispatched, and at once when the host acts on that step (`now`)."""

    def __init__(self, max_bad_steps: int, output_dir: str):
        self.limit, self.output_dir = max_bad_steps, output_dir
        self.pending: list[tuple[dict[str, jax.Array], int]] = []

    def check(self, metrics: dict[str, jax.Array], step: int, now: bool) -> None:
        due, self.pending = self.pending + ([(metrics, step)] if now else []), [(metrics, step)]
        for m, at in due:
            if int(m["bad_streak"]) >= self.limit:
                raise RuntimeError(f"{int(m['bad_streak'])} consecutive steps with a non-finite loss or gradient norm "
                                   f"(loss {float(m['loss'])}, grad_norm {float(m['grad_norm'])}) up to step {at}: "
                                   f"stopping (max_bad_steps={self.limit}); the last checkpoints in "
                                   f"{self.output_dir} are intact and finite")


class Window:
    """The train metrics since the last log, and the images, time and loader waits they took."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.metrics: list[dict[str, jax.Array]] = []
        self.images, self.start, self.waited = 0, time.perf_counter(), 0.0

    def add(self, metrics: dict[str, jax.Array], images: int, waited: float) -> None:
        """A step's metrics, its images, and the seconds the loop waited for its batch."""
        self.metrics.append(metrics)
        self.images += images
        self.waited += waited

    def restart_clock(self) -> None:
        """Time spent since (evaluating, say) is not training throughput."""
        self.start = time.perf_counter()


@dataclasses.dataclass
class Run:
    """What the cadence functions share: the run's config, mesh, streams and outputs."""

    cfg: Config
    out: str
    mesh: jax.sharding.Mesh
    batches: loader.Loader
    tracker: Tracker
    bar: tqdm
    writer: checkpoint.Writer
    flops_per_image: int
    peak_flops: float

    def close(self) -> None:
        self.bar.close()
        self.tracker.close()
        self.batches.close()


def load_teacher(cfg: Config, mesh: jax.sharding.Mesh) -> ViT | None:
    """The distillation teacher (checked by `runtime.resolve_paths`), replicated; None without distillation."""
    if cfg.distill.distillation_type == "none":
        return None
    teacher = load_model(cfg.distill.teacher_ckpt)
    if teacher.cfg.image_size != cfg.model.image_size and teacher.cfg.posemb == "learnable":
        teacher = finetune.adapt_pretrained(teacher, ViT(dataclasses.replace(teacher.cfg, image_size=cfg.model.image_size),
                                                         key=jax.random.key(0)))
    return jax.device_put(teacher, sharding.replicated(mesh))


def restore_run(out: str, state: TrainState) -> tuple[TrainState, dict[str, Any] | None, float, dict[str, int] | None]:
    """(state, its checkpoint's meta or None, best val acc1 so far, this process's loader state)
    from the run's newest loadable checkpoint; the loader state only when the process count is
    the checkpoint's (exact; otherwise the stream is replayed to the step)."""
    if jax.process_index() == 0:
        checkpoint.remove_partial(out)
    state, meta = checkpoint.resume(out, state)
    if meta is None:
        return state, None, -1.0, None
    best = max([checkpoint.read_meta(p).get("val/acc1", -1.0) for p in checkpoint.candidates(out)] + [-1.0])
    states = meta.get("loader_states")
    exact = bool(states) and len(states) == jax.process_count()
    return state, meta, best, states[jax.process_index()] if exact else None


def open_run(cfg: Config, out: str, mesh: jax.sharding.Mesh, writer: checkpoint.Writer, start: int,
             resumed: dict[str, Any] | None, loader_state: dict[str, int] | None) -> Run:
    """The train stream from `start` (or `loader_state`), the tracker (continuing the aim run of
    the checkpoint `resumed` from, its events after `start` dropped) with the hardware's peak
    FLOP/s, and the progress bar."""
    batches = loader.train_batches(cfg, process_index=jax.process_index(), process_count=jax.process_count(),
                                 **({"state": loader_state} if loader_state else {"start_step": start}))
    tracker = Tracker(out, cfg.to_dict(), cfg.aim_repo, experiment=out.rsplit("/", 1)[-1],
                      resume_step=start if resumed else None, run_hash=(resumed or {}).get("aim_run"))
    peak, peak_source = hardware.peak_flops(cfg.optim.compute_dtype)
    tracker.set("hardware", {"peak_flops": peak, "peak_source": peak_source, "devices": jax.device_count(),
                             "device_kind": jax.devices()[0].device_kind})
    bar = tqdm(total=cfg.optim.training_steps, initial=start, desc="train",
               disable=not (cfg.progress and jax.process_index() == 0), dynamic_ncols=True)
    return Run(cfg, out, mesh, batches, tracker, bar, writer, 3 * forward_flops(cfg.model), peak)  # fwd + bwd


@dataclasses.dataclass
class PendingLog:
    """A closed log window whose device values are not read yet: `write_log` reads them after
    the next step is dispatched, so logging never leaves the device idle."""

    step: int
    metrics: list[dict[str, jax.Array]]
    images: int
    elapsed: float
    waited: float
    skipped_steps: jax.Array
    skipped_samples: int


def close_window(run: Run, step: int, state: TrainState, window: Window) -> PendingLog:
    """The window's host-side figures (time, images, waits, skipped samples) now, its metrics as
    device arrays; the window restarts."""
    # A copy of the counter: the next step donates the state's own buffer.
    log = PendingLog(step, window.metrics, window.images, time.perf_counter() - window.start, window.waited,
                     jnp.copy(state.skipped), runtime.total_skipped(run.batches))
    window.reset()
    return log


def write_log(run: Run, log: PendingLog) -> None:
    """The window's mean train metrics, throughput and MFU (model FLOPs only, no remat recompute)."""
    means = {k: float(np.mean([float(m[k]) for m in log.metrics])) for k in log.metrics[0] if k != "bad_streak"}
    ips = log.images / log.elapsed
    out = {f"train/{k}": v for k, v in means.items()}
    out["train/data_wait"] = log.waited / log.elapsed  # the share of wall time spent waiting for batches
    out["train/skipped_steps"] = float(log.skipped_steps)
    out["train/images_per_sec"] = ips
    out["train/tflops_per_sec"] = ips * run.flops_per_image / 1e12
    out["train/mfu"] = ips * run.flops_per_image / run.peak_flops
    out["train/skipped_samples"] = float(log.skipped_samples)
    run.tracker.log(log.step, out)
    run.bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{ips:.0f}", lr=f"{means['lr']:.2e}")


def run_eval(run: Run, step: int, state: TrainState) -> dict[str, float]:
    """Validate the model (and its EMA) and log it: `val/acc1`, `val_ema/acc1`, ..."""
    cfg = run.cfg
    models = {"val": state.model} | ({"val_ema": state.ema} if state.ema is not None else {})
    evals = evaluation.evaluate_many(models, evaluation.valid_loader(cfg), run.mesh,
                                     progress=cfg.progress and jax.process_index() == 0, criterion=cfg.loss.criterion)
    val = evals["val"]
    results = {f"{name}/{k}": v for name, e in evals.items() for k, v in e.items()}
    run.tracker.log(step, results)
    run.bar.write(f"step {step}: val acc1 {val['acc1']:.4f} acc5 {val['acc5']:.4f} "
                  f"loss {val['loss']:.4f} ({val['num_samples']} samples)")
    return results


def save(run: Run, names: list[str], state: TrainState, results: dict[str, float]) -> None:
    """Checkpoint `state` under `names`, with the last val metrics and every process's loader state."""
    info = {**results, "aim_run": run.tracker.run_hash, "loader_states": runtime.gather_loader_states(run.batches),
            "process_count": jax.process_count()}
    run.writer.save(names, state, run.cfg.to_dict(), info)


def finish(run: Run, state: TrainState, results: dict[str, float], best: float) -> None:
    """results.json: the final step, the last val metrics and the best val acc1."""
    if jax.process_index() == 0:
        best_acc1 = {"val/best_acc1": best} if runtime.has_validation(run.cfg) else {}
        fileio.write_text(fileio.join(run.out, "results.json"),
                          json.dumps({"step": int(state.step), **results, **best_acc1}))


def train(cfg: Config, hooks: Hooks | None = None) -> dict[str, float]:
    """Train the run `cfg` describes, resuming from its output dir (with `eval_only`: evaluate
    once); the last validation metrics."""
    hooks = hooks or Hooks()
    cfg = runtime.resolve_paths(cfg)
    out = cfg.output_dir.rstrip("/")
    runtime.check_output_dir(out)
    runtime.check_data(cfg)
    runtime.init_distributed(cfg)
    runtime.note_compute_dtype(cfg)
    mesh = sharding.make_mesh(cfg.fsdp)
    check_batches(cfg, mesh.size)
    writer = checkpoint.Writer(out, sync=not cfg.async_checkpoint, before_commit=hooks.before_commit)
    if jax.process_index() == 0:
        fileio.write_text(fileio.join(out, "config.json"), cfg.to_json(indent=1))
    opt = optim.build(cfg, skeleton(cfg.model))
    state, shardings = create_state(cfg, mesh, opt.tx)
    state, resumed, best, loader_state = restore_run(out, state)
    if cfg.eval_only:
        return evaluation.eval_only(cfg, state, mesh)
    teacher = load_teacher(cfg, mesh)
    train_step = make_train_step(cfg, opt.tx, opt.schedule, shardings)
    start, total, validation = int(state.step), cfg.optim.training_steps, runtime.has_validation(cfg)
    run = open_run(cfg, out, mesh, writer, start, resumed, loader_state)
    results: dict[str, float] = {}
    window, streak, preempt = Window(), BadStreak(cfg.max_bad_steps, out), runtime.Preemption()
    pending: PendingLog | None = None
    try:
        for step in range(start, total):
            waiting = time.perf_counter()
            images, labels = next(run.batches)
            waited = time.perf_counter() - waiting
            state, metrics = train_step(state, *sharding.shard_batch(mesh, images, labels), teacher)
            done = step + 1
            if pending is not None:  # the last window's metrics, read now that this step is queued
                write_log(run, pending)
                pending = None
            window.add(metrics, cfg.data.train_batch_size, waited)
            run.bar.update(1)
            logs, evals = itstime(done, cfg.log_interval, total), itstime(done, cfg.eval_interval, total)
            interval, keep = itstime(done, cfg.checkpoint_interval), itstime(done, cfg.keep_interval)
            preempted = preempt.agreed(done) and done < total  # every step: see Preemption
            acts = evals or interval or keep or preempted or done == total  # the host waits for this step anyway
            streak.check(metrics, done, now=acts)
            if logs:
                pending = close_window(run, done, state, window)
                if acts:  # logged before the evaluation / checkpoint it precedes in metrics.jsonl
                    write_log(run, pending)
                    pending = None
            improved = False
            if evals and validation:
                results = run_eval(run, done, state)
                improved, best = results["val/acc1"] > best, max(best, results["val/acc1"])
                window.restart_clock()  # evaluation time is not training throughput
            names = checkpoint.names_due(done, evaluated=evals, interval=interval, keep=keep, validation=validation,
                                         improved=improved, preempted=preempted)
            if names:
                hooks.before_save(done)
                save(run, names, state, results)
            hooks.after_step(done, writer)
            if preempted:
                writer.wait()
                who = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
                print(f"{who}preempted: saved checkpoint at step {done} in {checkpoint.checkpoint_dir(out, 'last')}",
                      file=sys.stderr, flush=True)
                return results
        writer.wait()
    finally:
        preempt.restore()
        run.close()
    finish(run, state, results, best)
    return results
