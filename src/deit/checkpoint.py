"""Training checkpoints: self-describing directories, written atomically and asynchronously.

    <output_dir>/checkpoints/<name>/      name: last, prev, best, step-<N>
        model.safetensors        weights in timm naming + the model config (deit.load_model reads it)
        train_state.safetensors  every array of the train state (optimiser moments, EMA, step), by tree path
        meta.json                step, resolved config, extra info (val acc1, loader state), and the
                                 size and sha256 of the two files above: written last, it commits

A checkpoint is built in a temporary sibling directory and renamed into place; the checkpoint
it replaces becomes `prev` (for `last`), so a crash or a corrupt file always leaves a complete
earlier one to fall back to. Output dirs may be any fsspec URL (gs://, memory://, ...): there a
directory rename is a copy, which the sizes and hashes in meta.json make safe to interrupt.

Saving gathers the state to host memory synchronously (every process joins the gather; only
process 0 writes); the files are then written by a background thread while training goes on.
Which names a training step saves is the save policy, `names_due`; `resume` finds where a run
left off. `Writer(before_commit=...)` is a hook between writing a checkpoint's files and
committing it (the fault-injection tests kill the process there).
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import equinox as eqx
import fsspec
import jax
import jax.numpy as jnp
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from jax.experimental import multihost_utils
from safetensors.numpy import load as load_bytes
from safetensors import SafetensorError
from safetensors.numpy import save_file

from deit.fileio import fs_path, join, sha256
from deit.interop import save_model
from deit.treepath import checkpoint_key

STATE_FILE, MODEL_FILE, META_FILE = "train_state.safetensors", "model.safetensors", "meta.json"
STEP_NAME = re.compile(r"step-(\d+)$")


def _nothing(name: str, step: int) -> None:
    """The default `before_commit` hook."""


def checkpoint_dir(output_dir: str | os.PathLike, name: str) -> str:
    return join(output_dir, "checkpoints", name)


def host_arrays(state: Any) -> dict[str, np.ndarray]:
    """Every array of `state` as host numpy, keyed by tree path. Arrays spread over processes
    are all-gathered: every process must call this (a collective)."""
    out = {}
    for p, x in jax.tree_util.tree_leaves_with_path(eqx.filter(state, eqx.is_array)):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        out[checkpoint_key(p)] = np.asarray(jax.device_get(x))
    return out


@contextlib.contextmanager
def _io_errors(path: Path) -> Iterator[None]:
    """safetensors reports I/O failures (a full disk) as SafetensorError("... (os error 28)"): as OSError."""
    try:
        yield
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _write(output_dir: str, name: str, arrays: dict[str, np.ndarray], model: Any, meta: dict[str, Any],
           before_commit: Callable[[str, int], None] = _nothing) -> str:
    """Write and commit one checkpoint (process 0 only); `before_commit(name, step)` runs once
    its weights and state files are written, before meta.json commits them."""
    fs, root = fs_path(checkpoint_dir(output_dir, ""))
    final = root.rstrip("/") + "/" + name
    local = isinstance(fs, LocalFileSystem)
    move = os.replace if local else (lambda a, b: fs.mv(a, b, recursive=True))  # local: atomic rename
    fs.makedirs(root, exist_ok=True)
    # Local: build in place beside the final dir (same filesystem, so the rename is atomic).
    stage = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root if local else None))
    try:
        with _io_errors(stage / MODEL_FILE):
            save_model(model, stage / MODEL_FILE)
        with _io_errors(stage / STATE_FILE):
            save_file(arrays, str(stage / STATE_FILE))
        before_commit(name, meta["step"])
        meta = {**meta, "files": {f: {"size": (stage / f).stat().st_size, "sha256": sha256(stage / f)}
                                  for f in (MODEL_FILE, STATE_FILE)}}
        (stage / META_FILE).write_text(json.dumps(meta, indent=1))
        if local:
            tmp = str(stage)
        else:
            tmp = f"{root.rstrip('/')}/.tmp-{name}-{uuid.uuid4().hex[:8]}"
            for f in (MODEL_FILE, STATE_FILE, META_FILE):  # meta last: it commits
                fs.put_file(str(stage / f), f"{tmp}/{f}")
        old = f"{root.rstrip('/')}/prev" if name == "last" else f"{root.rstrip('/')}/.old-{name}-{uuid.uuid4().hex[:8]}"
        if fs.exists(final):
            if fs.exists(old):
                fs.rm(old, recursive=True)
            move(final, old)
        move(tmp, final)
        if name != "last" and fs.exists(old):
            fs.rm(old, recursive=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final


class WriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); earlier ones are intact."""


class Writer:
    """Writes checkpoints one at a time in a background thread (or inline with `sync=True`).
    An error in the background surfaces at the next `save` or `wait`. `before_commit(name, step)`
    is called for each checkpoint between writing its files and committing it (a no-op by default)."""

    def __init__(self, output_dir: str | os.PathLike, sync: bool = False,
                 before_commit: Callable[[str, int], None] = _nothing):
        self.output_dir, self.sync, self.before_commit = str(output_dir), sync, before_commit
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def save(self, names: list[str], state: Any, config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Checkpoint `state` (a steps.TrainState) under each of `names` ('last', 'best', 'step-N')."""
        arrays = host_arrays(state)  # synchronous: the state's buffers are donated to the next step
        self.wait()
        if jax.process_index() != 0:
            return
        bad = [k for k, a in arrays.items() if a.dtype.kind == "f" and not np.isfinite(a).all()]
        if bad:
            raise ValueError(f"refusing to checkpoint non-finite values in {bad[0]}")
        # The model's weights from the gathered arrays (its leaves sit under `.model` in the state).
        leaves, treedef = jax.tree_util.tree_flatten_with_path(eqx.filter(state.model, eqx.is_array))
        weights = [arrays[".model" + checkpoint_key(p)] for p, _ in leaves]
        model = eqx.combine(jax.tree_util.tree_unflatten(treedef, weights),
                            eqx.filter(state.model, eqx.is_array, inverse=True))
        meta = {"step": int(arrays[".step"]), "config": config, **(extra or {})}

        def work():
            for name in names:
                try:
                    _write(self.output_dir, name, arrays, model, meta, self.before_commit)
                except OSError as e:  # disk full, quota, permissions: the partial write is gone
                    self.error = WriteError(f"checkpoint {name!r} of step {meta['step']} could not be written to "
                                            f"{checkpoint_dir(self.output_dir, name)}: {e.strerror or e}; the "
                                            "checkpoints written before it are intact (make room, then run the "
                                            "same command again to resume)")
                    return
                except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
                    self.error = e
                    return

        if self.sync:
            work()
            self._raise()
        else:
            self.thread = threading.Thread(target=work, name="checkpoint-writer", daemon=True)
            self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e


def save(output_dir: str | os.PathLike, name: str, state: Any, config: dict[str, Any],
         extra: dict[str, Any] | None = None) -> str:
    """Write checkpoint `name` synchronously."""
    Writer(output_dir, sync=True).save([name], state, config, extra)
    return checkpoint_dir(output_dir, name)


def names_due(step: int, *, evaluated: bool, interval: bool = False, keep: bool = False, validation: bool = True,
              improved: bool = False, preempted: bool = False) -> list[str]:
    """The save policy: the checkpoints a run writes after `step` steps. `last` at each eval
    (`evaluated`, with or without validation data, as deit3-jax) and each checkpoint interval
    (`interval`); `best` when the eval's val acc1 `improved` on the best so far (runs with
    `validation` only: without, `last` alone); `step-N` at each keep interval (`keep`; never
    replaced); `last` when the run is `preempted` (it stops after this step)."""
    names = ["last"] if evaluated or interval or preempted else []
    if evaluated and validation and improved:
        names.append("best")
    if keep:
        names.append(f"step-{step:08d}")
    return names


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    fs, p = fs_path(path)
    with fs.open(p.rstrip("/") + "/" + META_FILE, "r") as f:
        return json.load(f)


def _complete(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Committed: meta.json present and parseable (its files are verified when read)."""
    try:
        with fs.open(f"{path}/{META_FILE}", "r") as f:
            return "files" in json.load(f)
    except Exception:  # missing or from a crashed write
        return False


def find(output_dir: str | os.PathLike, name: str = "last") -> str | None:
    """The complete checkpoint `name`, or None."""
    fs, p = fs_path(checkpoint_dir(output_dir, name))
    return checkpoint_dir(output_dir, name) if _complete(fs, p) else None


def candidates(output_dir: str | os.PathLike) -> list[str]:
    """Complete checkpoints of a run, newest step first: where a resume looks, in order."""
    fs, root = fs_path(checkpoint_dir(output_dir, ""))
    if not fs.exists(root):
        return []
    found = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(".tmp-") or not _complete(fs, entry.rstrip("/")):
            continue
        found.append((read_meta(checkpoint_dir(output_dir, name))["step"], name == "last", name))
    return [checkpoint_dir(output_dir, n) for _, _, n in sorted(found, reverse=True)]


def remove_partial(output_dir: str | os.PathLike) -> None:
    """Delete what interrupted writes left behind (`.tmp-*` directories)."""
    fs, root = fs_path(checkpoint_dir(output_dir, ""))
    if fs.exists(root):
        for entry in fs.ls(root, detail=False):
            if entry.rstrip("/").rsplit("/", 1)[-1].startswith(".tmp-"):
                fs.rm(entry, recursive=True)


def resume(output_dir: str | os.PathLike, template: Any) -> tuple[Any, dict[str, Any] | None]:
    """(the newest checkpoint of a run that loads, restored into `template`; its meta), or
    (`template`, None) when there is none. Corrupt ones are reported and skipped."""
    for path in candidates(output_dir):
        try:
            restored = restore(path, template)
        except ValueError as e:
            print(f"warning: {e}; falling back to an older checkpoint", file=sys.stderr, flush=True)
            continue
        print(f"resumed from {path} at step {int(restored.step)}", flush=True)
        return restored, read_meta(path)
    return template, None


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state arrays of checkpoint `path`, verified against meta.json; a clear error naming
    the file when it is truncated or corrupt."""
    fs, p = fs_path(path)
    p = p.rstrip("/")
    file = f"{path}/{STATE_FILE}"
    try:
        info = read_meta(path)["files"][STATE_FILE]
        with fs.open(f"{p}/{STATE_FILE}", "rb") as f:
            blob = f.read()
    except Exception as e:
        raise ValueError(f"checkpoint file {file} is unreadable ({type(e).__name__}: {e})") from e
    if len(blob) != info["size"] or hashlib.sha256(blob).hexdigest() != info["sha256"]:
        raise ValueError(f"checkpoint file {file} is corrupt: size or sha256 differs from its meta.json")
    try:
        return load_bytes(blob)
    except Exception as e:
        raise ValueError(f"checkpoint file {file} is unreadable ({type(e).__name__}: {e})") from e


def load_ema(path: str | os.PathLike) -> Any:
    """The EMA weights of checkpoint `path` as a model (for export: `convert.py --ema`)."""
    from deit.interop import load_model

    model = load_model(path)  # structure and config
    arrays = read_arrays(path)
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = [".ema" + checkpoint_key(p) for p, _ in leaves]
    if keys[0] not in arrays:
        raise ValueError(f"checkpoint {path} holds no EMA weights (train with --model-ema)")
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[k]) for k in keys]), static)


def restore(path: str | os.PathLike, template: Any) -> Any:
    """Load the arrays of checkpoint `path` into the structure (and shardings) of `template`.
    Each process places only its own shards (works with any process count)."""
    arrays = read_arrays(path)
    params, static = eqx.partition(template, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for p, x in leaves:
        key = checkpoint_key(p)
        if key not in arrays:
            raise ValueError(f"checkpoint {path} lacks {key}")
        a = arrays[key]
        if a.shape != x.shape:
            raise ValueError(f"checkpoint {path}: {key} has shape {a.shape}, expected {x.shape}")
        a = a.astype(x.dtype)
        out.append(jax.make_array_from_callback(a.shape, x.sharding, lambda idx, a=a: a[idx]))
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, out), static)
