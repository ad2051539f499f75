"""What a training run needs from its surroundings: paths from the environment, input checks,
the multi-controller runtime, preemption signals, and the values gathered over all processes.

Everything here runs on the host, before or between train steps; none of it touches the model.
"""

import dataclasses
import os
import re
import signal
import threading
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from deit import finetune
from deit.data import loader
from deit.config import Config

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
    """`cfg` with its data paths and `pretrained_ckpt` expanded (the checkpoint also located)."""
    d = cfg.data
    d = dataclasses.replace(d, train_dataset_shards=resolve_env("train_dataset_shards", d.train_dataset_shards),
                            valid_dataset_shards=resolve_env("valid_dataset_shards", d.valid_dataset_shards),
                            label_mapping=resolve_env("label_mapping", d.label_mapping))
    ckpt = resolve_env("pretrained_ckpt", cfg.pretrained_ckpt, MODEL_DIR_DEFAULT)
    return dataclasses.replace(cfg, data=d, pretrained_ckpt=ckpt and finetune.find_pretrained(ckpt))


def has_validation(cfg: Config) -> bool:
    """deit3-jax validates only when validation shards are named (its in21k pre-training
    recipes name none: they log no val metrics and save `last` only)."""
    return bool(cfg.data.valid_dataset_shards)


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
        loader.resolve_shards(cfg.data.train_dataset_shards)
    elif not has_validation(cfg):
        raise ValueError("eval_only=True needs validation data; pass --valid-dataset-shards")
    if has_validation(cfg):
        loader.resolve_shards(cfg.data.valid_dataset_shards)


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


def gather_loader_states(batches: loader.Loader) -> list[dict[str, int]]:
    """Every process's loader state (exact resume with the same process count)."""
    if jax.process_count() == 1:
        return [dict(batches.state)]
    keys = loader.STATE_KEYS  # `copies` too: a batch can end inside a sample's repeats
    rows = multihost_utils.process_allgather(np.array([batches.state[k] for k in keys], np.int64))
    return [dict(zip(keys, map(int, r))) for r in np.asarray(rows).reshape(jax.process_count(), len(keys))]


def total_skipped(batches: loader.Loader) -> int:
    """Samples the loaders of all processes skipped as unreadable."""
    if jax.process_count() == 1:
        return batches.skipped
    return int(np.asarray(multihost_utils.process_allgather(np.int64(batches.skipped))).sum())
