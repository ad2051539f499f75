"""Training checkpoints: self-describing directories written atomically.

    <output_dir>/checkpoints/<name>/
        model.safetensors        weights in timm naming + the model config (deit.load_model reads it)
        train_state.safetensors  every array of the train state (optimiser moments, step), by tree path
        meta.json                step, resolved config, extra info (val acc1 for `best`)

A checkpoint is built in a temporary sibling directory and renamed into place, so a crash
leaves either the previous complete checkpoint or the new one, never a half-written one.
"""

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from deit.interop import save_model

STATE_FILE, MODEL_FILE, META_FILE = "train_state.safetensors", "model.safetensors", "meta.json"


def checkpoint_dir(output_dir: str | os.PathLike, name: str) -> Path:
    return Path(output_dir) / "checkpoints" / name


def _state_arrays(state: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(state, eqx.is_array))
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in leaves}


def save(output_dir: str | os.PathLike, name: str, state: Any, config: dict[str, Any],
         extra: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `name` (e.g. 'last', 'best') for `state` (a steps.TrainState)."""
    final = checkpoint_dir(output_dir, name)
    arrays = _state_arrays(state)  # every process joins the gather; only process 0 writes
    if jax.process_index() != 0:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_model(state.model, tmp / MODEL_FILE)
        save_file(arrays, str(tmp / STATE_FILE))
        meta = {"step": int(state.step), "config": config, **(extra or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        old = final.parent / f".old-{name}-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / META_FILE).read_text())


def find(output_dir: str | os.PathLike, name: str = "last") -> Path | None:
    """The complete checkpoint `name`, or None. A crash between the two renames of `save`
    leaves only the `.old-` copy: that one is complete, so it is used."""
    final = checkpoint_dir(output_dir, name)
    if (final / META_FILE).exists():
        return final
    olds = sorted(final.parent.glob(f".old-{name}-*"), key=lambda p: p.stat().st_mtime)
    return olds[-1] if olds and (olds[-1] / META_FILE).exists() else None


def restore(path: str | os.PathLike, template: Any) -> Any:
    """Load the arrays of checkpoint `path` into the structure (and shardings) of `template`."""
    path = Path(path)
    try:
        arrays = load_file(str(path / STATE_FILE))
    except Exception as e:
        raise ValueError(f"checkpoint {path / STATE_FILE} is unreadable ({type(e).__name__}: {e})") from e
    params, static = eqx.partition(template, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for p, x in leaves:
        key = jax.tree_util.keystr(p)
        if key not in arrays:
            raise ValueError(f"checkpoint {path} lacks {key}")
        a = arrays[key]
        if a.shape != x.shape:
            raise ValueError(f"checkpoint {path}: {key} has shape {a.shape}, expected {x.shape}")
        out.append(jax.device_put(a.astype(x.dtype), x.sharding))
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, out), static)
