"""What a training run needs from its surroundings: paths from the environment, input checks,
the multi-controller runtime, preemption signals, and the values gathered over all processes.

Everything here runs on the host, before or between train steps; none of it touches the model.
"""

import collections
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from deit import fileio, finetune, hardware
from deit.data import loader
from deit.interop import read_weights
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
    """`cfg` with its data paths, `pretrained_ckpt` and `teacher_ckpt` expanded (the checkpoint
    also located, read and checked against the model: `finetune.check_pretrained`; the teacher
    read and its labels checked), each bad one a one-line ValueError before anything is written."""
    d = cfg.data
    d = dataclasses.replace(d, train_dataset_shards=resolve_env("train_dataset_shards", d.train_dataset_shards),
                            valid_dataset_shards=resolve_env("valid_dataset_shards", d.valid_dataset_shards),
                            label_mapping=resolve_env("label_mapping", d.label_mapping))
    ckpt = resolve_env("pretrained_ckpt", cfg.pretrained_ckpt, MODEL_DIR_DEFAULT)
    ckpt = ckpt and finetune.find_pretrained(ckpt)
    if ckpt:  # weights are untrusted input: read and fitted now, before the run writes anything
        finetune.check_pretrained(ckpt, cfg.model, d.label_mapping)
    distill = cfg.distill
    if distill.distillation_type != "none":
        if not cfg.model.distilled:
            raise ValueError(f"distillation_type={distill.distillation_type!r} needs a distilled student (--distilled)")
        if not distill.teacher_ckpt:
            raise ValueError(f"distillation_type={distill.distillation_type!r} needs --teacher-ckpt")
        teacher = resolve_env("teacher_ckpt", distill.teacher_ckpt, MODEL_DIR_DEFAULT)
        teacher_cfg, _ = read_weights(teacher)  # read and checked now too
        if teacher_cfg.labels != cfg.model.labels:
            raise ValueError(f"teacher_ckpt={teacher!r} has labels={teacher_cfg.labels}, the student "
                             f"{cfg.model.labels}; allowed: a teacher with the student's labels")
        distill = dataclasses.replace(distill, teacher_ckpt=teacher)
    return dataclasses.replace(cfg, data=d, pretrained_ckpt=ckpt, distill=distill)


def has_validation(cfg: Config) -> bool:
    """deit3-jax validates only when validation shards are named (its in21k pre-training
    recipes name none: they log no val metrics and save `last` only)."""
    return bool(cfg.data.valid_dataset_shards)


def check_output_dir(output_dir: str) -> None:
    """The output dir must be creatable and writable (`fileio.unwritable` of its nearest existing
    parent), checked before anything is written; for an fsspec URL, its filesystem must be installed."""
    if "://" in output_dir:
        try:
            fileio.fs_path(output_dir)
        except ImportError as e:  # fsspec: "Install gcsfs to access Google Storage"
            raise ValueError(f"output_dir={output_dir!r}: {str(e).rstrip('.')}; allowed: a local path or a URL "
                             "whose fsspec filesystem is installed (gs:// needs gcsfs)") from None
        except ValueError as e:  # "Protocol not known: foo"
            raise ValueError(f"output_dir={output_dir!r}: {e}; allowed: a local path or an fsspec URL") from None
        return
    path = Path(output_dir).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir={output_dir!r} is a file; allowed: a directory (existing or new)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"output_dir={output_dir!r} is not writable ({parent} is a file, not a directory)")
    if why := fileio.unwritable(parent):
        raise ValueError(f"output_dir={output_dir!r} is not writable ({parent}: {why}); "
                         "allowed: a directory this user can create and write")


def check_data(cfg: Config) -> None:
    """Shards must exist, be complete tars and hold usable samples (labels in range) before
    anything is compiled or written (`loader.resolve_shards`)."""
    if not cfg.eval_only:
        loader.resolve_shards(cfg.data.train_dataset_shards, cfg.model.labels)
    elif not has_validation(cfg):
        raise ValueError("eval_only=True needs validation data; pass --valid-dataset-shards")
    if has_validation(cfg):
        loader.resolve_shards(cfg.data.valid_dataset_shards, cfg.model.labels)


# ----------------------------------------------------------------------------- several processes
#
# Every wait for other processes has a deadline (`--host-timeout`) and, when it passes, says
# which process it waited for: connecting to the coordinator (a watchdog: jax aborts from C++
# when its own deadline passes), and the host values processes exchange (loader states,
# skipped counts) through the coordinator's key-value store. A save exchanges the loader
# states before its device all-gather, so a process that never reaches a save is named there.

TIMEOUT_S = 600  # --host-timeout, set by init_distributed


class HostTimeout(RuntimeError):
    """Another process did not arrive in time."""


def note_compute_dtype(cfg: Config) -> None:
    """A note on stderr when `compute_dtype='bfloat16'` meets a backend that computes bf16
    matmuls in f32 (CPU): the run works, but is slower than in float32."""
    if cfg.optim.compute_dtype == "bfloat16" and jax.default_backend() == "cpu" and jax.process_index() == 0 \
            and hardware.bf16_dots_upcast():
        print("note: compute_dtype='bfloat16' on CPU: XLA:CPU computes bf16 matmuls in f32, so this run is "
              "slower than with --compute-dtype float32 (README: Training throughput)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def watchdog(seconds: float, message: Callable[[], str]) -> Iterator[None]:
    """Exit the process (status 1) with `error: message()` if the block takes longer than `seconds`."""
    def fire():
        print(f"error: {message()}", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _reachable(address: str, seconds: float) -> bool:
    """Whether a TCP connection to `host:port` succeeds within `seconds` (retrying)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def init_distributed(cfg: Config) -> None:
    """Join the multi-controller runtime: explicit flags, or auto-detected on SLURM and Cloud TPU
    pod slices (jax.distributed reads their environment). Single-process runs skip it."""
    global TIMEOUT_S
    TIMEOUT_S = t = cfg.host_timeout
    if cfg.coordinator_address:
        addr, n, me = cfg.coordinator_address, cfg.num_processes, cfg.process_id
        if n is None or me is None:
            raise ValueError(f"coordinator_address={addr!r} needs --num-processes and --process-id")
        if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:  # CPU-only clusters: collectives over gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if me != 0 and not _reachable(addr, t):
            raise HostTimeout(f"process {me} waited host_timeout={t} s for process 0, the coordinator at {addr}, "
                              "which does not answer")
        others = ", ".join(str(i) for i in range(n) if i != me)
        with watchdog(t, lambda: f"process {me} waited host_timeout={t} s for processes {others} to connect to "
                                 f"the coordinator at {addr}; not all of them did"):
            jax.distributed.initialize(addr, n, me, initialization_timeout=t + 60)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        with watchdog(t, lambda: f"waited host_timeout={t} s for all processes to connect to the coordinator"):
            jax.distributed.initialize(initialization_timeout=t + 60)


def _client() -> Any:
    from jax._src import distributed  # the coordinator client jax.distributed.initialize made

    return distributed.global_state.client


_rounds: collections.Counter[str] = collections.Counter()


def allgather_host(name: str, value: Any) -> list[Any]:
    """Every process's `value` (JSON), in process order, through the coordinator's key-value
    store: host values need no device collective, and a process that does not arrive within
    the host timeout is named. Every process calls it the same number of times per `name`."""
    if jax.process_count() == 1:
        return [value]
    client, me = _client(), jax.process_index()
    n = _rounds[name]
    _rounds[name] += 1
    client.key_value_set(f"deit/{name}/{n}/{me}", json.dumps(value))
    out = []
    for p in range(jax.process_count()):
        try:
            out.append(json.loads(client.blocking_key_value_get(f"deit/{name}/{n}/{p}", TIMEOUT_S * 1000)))
        except jax.errors.JaxRuntimeError as e:
            if "DEADLINE_EXCEEDED" not in str(e):
                raise
            raise HostTimeout(f"process {me} waited host_timeout={TIMEOUT_S} s for process {p} at the {name} "
                              f"exchange #{n}; process {p} is stuck or gone") from None
    if n:  # every process has read the previous round once it has written this one
        client.key_value_delete(f"deit/{name}/{n - 1}/{me}")
    return out


class Preemption:
    """SIGTERM/SIGINT request a checkpoint at the next step boundary; a second signal exits at once.

    With several processes, all stop at one agreed step without a per-step collective: JAX's
    preemption service (what orbax uses) catches SIGTERM in C++ and tells the coordinator, and
    `multihost_utils.reached_preemption_sync_point(step)`, a local check called every step,
    turns true on every process at the same step. SIGINT is forwarded to it as SIGTERM."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        self.service = jax.process_count() > 1 and _client() is not None
        signals = (signal.SIGINT,) if self.service else (signal.SIGTERM, signal.SIGINT)
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        if self.requested:
            os._exit(128 + signum)
        self.requested = True
        if self.service:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

    def agreed(self, step: int) -> bool:
        """Whether to stop after `step`; called after every step, on every process alike."""
        if self.service:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def gather_loader_states(batches: loader.Loader) -> list[dict[str, int]]:
    """Every process's loader state (exact resume with the same process count)."""
    return allgather_host("loader-state", dict(batches.state))


def total_skipped(batches: loader.Loader) -> int:
    """Samples the loaders of all processes skipped as unreadable."""
    return sum(allgather_host("skipped", int(batches.skipped)))
