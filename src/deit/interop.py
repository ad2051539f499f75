"""Weights files in and out: `load_model` reads any supported format, `save_model` writes ours.

Ours is `.safetensors` in timm naming with the config in its metadata, so a file describes
itself and timm reads it too. The formats themselves live in `deit.timm_weights` (timm / DeiT
state dicts, the checked path every importer ends in) and `deit.deit3_jax_weights`
(deit3-jax `.msgpack`). Nothing is ever unpickled: `.pth` files go through
`torch.load(weights_only=True)`.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from deit.config import ModelConfig
from deit.deit3_jax_weights import from_deit3_jax, read_flax_msgpack
from deit.fileio import atomic_path
from deit.model import ViT
from deit.timm_weights import from_timm, to_timm

FORMAT_VERSION = "1"
WEIGHT_FORMATS = "a directory holding model.safetensors, .safetensors, .pth/.pt/.bin (torch), .msgpack (deit3-jax)"


def save_model(model: ViT, path: str | os.PathLike, layout: Literal["deit3", "vit"] = "deit3") -> Path:
    """Write `.safetensors` in timm naming with the config in its metadata (self-describing).

    A directory gets `model.safetensors` inside. Written to a temp file then renamed, so a crash
    never leaves a half-written file under the final name.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix != ".safetensors":
        raise ValueError(f"save_model writes .safetensors, got {path}")
    arrays = {k: np.ascontiguousarray(v) for k, v in to_timm(model, layout).items()}
    meta = {"deit.format": FORMAT_VERSION, "deit.config": model.cfg.to_json(), "deit.layout": layout}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=meta)
    return path


def _read_safetensors(path: Path, heads: int | None) -> ViT:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    cfg = None
    if "deit.config" in meta:
        if meta.get("deit.format") != FORMAT_VERSION:
            raise ValueError(f"{path}: deit.format {meta.get('deit.format')!r} is not {FORMAT_VERSION!r}")
        cfg = ModelConfig.from_dict(json.loads(meta["deit.config"]))
    return from_timm(sd, cfg, heads=heads if cfg is None else None)


def _read_torch(path: Path, heads: int | None) -> ViT:
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path}: reading torch files needs torch (pip install torch), or convert to .safetensors") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)  # restricted unpickler: tensors only
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, expected a state dict")
    return from_timm(sd, heads=heads)


def load_model(path: str | os.PathLike, *, heads: int | None = None, image_size: int | None = None) -> ViT:
    """Load weights from any supported file: a checkpoint directory (its model.safetensors),
    `.safetensors` (ours with config metadata, or timm's: config inferred), `.pth/.pt/.bin`
    (timm/DeiT state dict, via torch with weights_only), `.msgpack` (deit3-jax).

    `heads` is needed only for timm files of non-standard width; `image_size` only for
    sincos2d deit3-jax files.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".bin", ".msgpack"):
        raise ValueError(f"cannot load {path}: unknown extension; allowed: {WEIGHT_FORMATS}")
    if not path.is_file():
        raise ValueError(f"cannot load {path}: no such file; allowed: {WEIGHT_FORMATS}")
    try:
        if suffix == ".safetensors":
            return _read_safetensors(path, heads)
        if suffix == ".msgpack":
            return from_deit3_jax(read_flax_msgpack(path.read_bytes()), image_size=image_size)
        return _read_torch(path, heads)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if str(path) in msg else f"{path}: {msg}") from e
    except Exception as e:  # corrupt files: one line naming the file, not a parser traceback
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


__all__ = ["FORMAT_VERSION", "WEIGHT_FORMATS", "load_model", "save_model"]
