"""timm / DeiT state dicts: our interchange naming, and the checks every importer ends with.

Every weights format is brought to one flat dict in timm's deit3 naming (one key per block,
pos_embed on patch tokens only), checked key by key and shape by shape against the shapes of
a `ViT` skeleton built from the config (`check_keys`), then stacked into the model's leaves
(`fill_model`). That keeps one place that knows how our stacked leaves map to timm's keys.
"""

import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from deit.config import ModelConfig
from deit.model import ViT, sincos2d, skeleton
from deit.treepath import leaf_name, leaf_names

# Heads cannot be read off shapes; these are the standard ViT sizes (Ti, S, B, L, H).
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

# Our leaf names that differ from timm's (everything else is the same dotted path).
_TIMM_RENAME = {"patch_embed.weight": "patch_embed.proj.weight", "patch_embed.bias": "patch_embed.proj.bias"}


# ----------------------------------------------------------------------------- shared by the importers

def fmt_keys(keys: set[str] | list[str], limit: int = 8) -> str:
    """Sorted keys, at most `limit` of them: error messages stay one line."""
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return str(keys[:limit]) + more


def to_numpy(value: Any, key: str) -> np.ndarray:
    """A torch tensor, jax or numpy array as a float32 numpy array (our models keep f32 weights)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if not value.dtype.is_floating_point:
            raise ValueError(f"{key}: expected a floating point tensor, got {value.dtype}")
        value = value.float().numpy()
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
        raise ValueError(f"{key}: expected a floating point array, got dtype {arr.dtype}")
    return arr.astype(np.float32)


def _timm_entries(name: str, layers: int) -> list[tuple[str, int | None]]:
    """The timm keys of one of our leaves, each with the block index it takes (None: not stacked)."""
    if name.startswith("blocks."):
        return [(f"blocks.{i}.{name[len('blocks.'):]}", i) for i in range(layers)]
    return [(_TIMM_RENAME.get(name, name), None)]


def _timm_shape(name: str, shape: tuple[int, ...], layer: int | None) -> tuple[int, ...]:
    if layer is not None:
        return tuple(shape[1:])
    if name == "pos_embed":
        return (1, *shape)  # timm keeps a batch axis
    return tuple(shape)


def timm_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected timm (deit3 layout) key -> shape for a config; `pos_embed` only when learnable."""
    shapes = {}
    for name, leaf in leaf_names(skeleton(cfg)):
        for key, layer in _timm_entries(name, cfg.layers):
            shapes[key] = _timm_shape(name, leaf.shape, layer)
    return shapes


def check_keys(flat: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Exactly the expected keys, each with exactly the expected shape, or a one-line ValueError."""
    missing, unknown = set(expected) - set(flat), set(flat) - set(expected)
    if missing or unknown:
        parts = ([f"missing keys {fmt_keys(missing)}"] if missing else []) + \
                ([f"unexpected keys {fmt_keys(unknown)}"] if unknown else [])
        raise ValueError(f"{what}: " + "; ".join(parts))
    for key, shape in expected.items():
        if tuple(flat[key].shape) != tuple(shape):
            raise ValueError(f"{what}: {key} has shape {tuple(flat[key].shape)}, expected {tuple(shape)}")


def fill_model(cfg: ModelConfig, flat: Mapping[str, np.ndarray]) -> ViT:
    """A ViT whose leaves are taken from a checked timm-named flat dict (blocks stacked)."""
    abstract = skeleton(cfg)
    values = {}
    for name, leaf in leaf_names(abstract):
        entries = _timm_entries(name, cfg.layers)
        if entries[0][1] is not None:
            arr = np.stack([flat[key] for key, _ in entries])
        else:
            arr = flat[entries[0][0]].reshape(leaf.shape)
        values[name] = jnp.asarray(arr, dtype=leaf.dtype)
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = [values[leaf_name(p)] if isinstance(x, jax.ShapeDtypeStruct) else x for p, x in paths]
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- timm in and out

def to_timm(model: ViT, layout: Literal["deit3", "vit"] = "deit3") -> dict[str, np.ndarray]:
    """timm state dict (numpy float arrays) of a model.

    layout="deit3": `pos_embed` (1, N, D) on patches only (timm `deit3_*`, `no_embed_class=True`).
    layout="vit": `pos_embed` (1, prefix + N, D) for timm `vit_*` / DeiT v1, with zero cls (and
    dist) position rows: their positions already live in `cls_token` / `dist_token`.
    A sincos2d model gets its fixed table written as `pos_embed`, so timm can load the file.
    """
    if layout not in ("deit3", "vit"):
        raise ValueError(f"layout={layout!r}: allowed 'deit3', 'vit'")
    cfg = model.cfg
    out: dict[str, np.ndarray] = {}
    for name, leaf in leaf_names(model):
        arr = np.array(leaf)  # a writable copy (torch.from_numpy warns on read-only arrays)
        for key, layer in _timm_entries(name, cfg.layers):
            out[key] = arr[layer] if layer is not None else arr.reshape(_timm_shape(name, arr.shape, None))
    if "pos_embed" not in out:
        out["pos_embed"] = np.array(model.position_embedding())[None]
    if layout == "vit" and cfg.num_prefix_tokens:
        pos = out["pos_embed"]
        out["pos_embed"] = np.concatenate([np.zeros((1, cfg.num_prefix_tokens, cfg.dim), pos.dtype), pos], 1)
    return out


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    for wrapper in ("model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            return state_dict[wrapper]
    return state_dict


def _normalize_timm(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unwrapped, float32 numpy, with FB DeiT-III `gamma_1/2` renamed to timm's `ls1/2.gamma`."""
    sd = _unwrap(state_dict)
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model
        sd = {k[len("module."):]: v for k, v in sd.items()}
    out = {}
    for key, value in sd.items():
        if not isinstance(key, str):
            raise ValueError(f"state dict key {key!r} is a {type(key).__name__}, expected a str (a parameter name)")
        new = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out[new] = to_numpy(value, key)
    return out


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _sincos_matches(pos: np.ndarray, grid: int, dim: int) -> bool:
    return dim % 4 == 0 and pos.shape == (1, grid * grid, dim) and \
        bool(np.allclose(pos[0], np.asarray(sincos2d(grid, dim)), atol=1e-5, rtol=0))


def infer_timm_config(state_dict: Mapping[str, Any], heads: int | None = None) -> ModelConfig:
    """A ModelConfig read off the keys and shapes of a timm state dict (exact GELU, as timm)."""
    sd = _normalize_timm(state_dict)
    if "patch_embed.proj.weight" not in sd:
        raise ValueError(f"cannot infer the model config: no patch_embed.proj.weight among keys {fmt_keys(set(sd))}")
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[1] != 3 or w.shape[2] != w.shape[3]:
        raise ValueError(f"patch_embed.proj.weight has shape {w.shape}, expected (dim, 3, P, P)")
    dim, patch = w.shape[0], w.shape[2]
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not blocks:
        raise ValueError("cannot infer the model config: no blocks.<i>.* keys")
    heads = heads if heads is not None else STANDARD_HEADS.get(dim)
    if heads is None:
        raise ValueError(f"cannot infer heads for dim={dim} (standard: {STANDARD_HEADS}); pass heads= or a cfg")
    pooling = "cls" if "cls_token" in sd else "gap"
    distilled = "dist_token" in sd
    prefix = (pooling == "cls") + distilled
    if "pos_embed" not in sd:
        raise ValueError("cannot infer image_size: no pos_embed key; pass a cfg")
    rows = sd["pos_embed"].shape[1] if sd["pos_embed"].ndim == 3 else -1
    n = rows if _is_square(rows) else rows - prefix  # deit3 layout first: n and n+1, n+2 are never both squares
    if not _is_square(n):
        raise ValueError(f"pos_embed has shape {sd['pos_embed'].shape}: its rows (less {prefix} prefix) are not a square grid")
    grid = math.isqrt(n)
    pos = sd["pos_embed"][:, rows - n:]
    head = sd.get("head.weight")
    if head is not None and head.ndim != 2:
        raise ValueError(f"head.weight has shape {head.shape}, expected (labels, {dim})")
    return ModelConfig(
        layers=max(blocks) + 1, dim=dim, heads=heads, labels=0 if head is None else head.shape[0],
        layerscale="blocks.0.ls1.gamma" in sd, patch_size=patch, image_size=grid * patch,
        posemb="sincos2d" if _sincos_matches(pos, grid, dim) else "learnable",
        pooling=pooling, gelu="exact", distilled=distilled)


def _fold_prefix_positions(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """timm vit layout -> deit3 layout: cls/dist position rows are constants, add them to the tokens."""
    if "pos_embed" not in sd:
        return sd
    n, p, d = cfg.grid**2, cfg.num_prefix_tokens, cfg.dim
    pos = sd["pos_embed"]
    if pos.shape == (1, n, d):
        return sd
    if p == 0 or pos.shape != (1, n + p, d):
        alt = f" or {(1, n + p, d)} (vit layout)" if p else ""
        raise ValueError(f"pos_embed has shape {pos.shape}, expected {(1, n, d)} (deit3 layout){alt}")
    sd = dict(sd, pos_embed=pos[:, p:])
    for i, name in enumerate(["cls_token", "dist_token"][:p]):  # timm token order: cls, dist, patches
        if name in sd and sd[name].shape == (1, 1, d):  # a wrong shape is reported by the full check
            sd[name] = sd[name] + pos[:, i:i + 1]
    return sd


def timm_state(state_dict: Mapping[str, Any], cfg: ModelConfig | None = None, *,
               heads: int | None = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, checked flat dict in deit3 naming) of a timm / DeiT / DeiT-III state dict: what
    `from_timm` fills a model from, read and checked without building one (no JAX arrays)."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"holds a {type(state_dict).__name__}, expected a state dict (parameter name -> tensor)")
    sd = _normalize_timm(state_dict)
    if cfg is None:
        cfg = infer_timm_config(sd, heads=heads)
    elif heads is not None and heads != cfg.heads:
        raise ValueError(f"heads={heads} contradicts cfg.heads={cfg.heads}")
    sd = _fold_prefix_positions(sd, cfg)
    if cfg.posemb == "sincos2d" and "pos_embed" in sd:
        # An exported fixed table: accept it only if it is that table, so no trained weights are dropped.
        if not _sincos_matches(sd["pos_embed"], cfg.grid, cfg.dim):
            raise ValueError("pos_embed differs from the fixed sincos2d table of cfg.posemb='sincos2d'; use posemb='learnable'")
        sd = {k: v for k, v in sd.items() if k != "pos_embed"}
    check_keys(sd, timm_shapes(cfg), "timm state dict")
    return cfg, sd


def from_timm(state_dict: Mapping[str, Any], cfg: ModelConfig | None = None, *, heads: int | None = None) -> ViT:
    """A ViT from a timm / DeiT / DeiT-III state dict (torch tensors or arrays; may be wrapped
    under `model` / `state_dict`). Without `cfg` the config is inferred from keys and shapes.

    Both position layouts load: deit3 (patches only) and vit (cls/dist rows folded into the tokens).
    Every key and shape is checked against the config: a mismatch is a one-line ValueError.
    """
    return fill_model(*timm_state(state_dict, cfg, heads=heads))


__all__ = ["STANDARD_HEADS", "check_keys", "fill_model", "fmt_keys", "from_timm", "infer_timm_config", "timm_shapes",
           "timm_state", "to_numpy", "to_timm"]
