"""Weights interop: timm / DeiT state dicts, deit3-jax `.msgpack`, and our `.safetensors`.

Every importer ends in the same place: a flat dict in timm's deit3 naming (one key per
block, pos_embed on patch tokens only), checked key by key and shape by shape against the
shapes of a `ViT` skeleton built from the config, then stacked into the model's leaves.
Nothing is ever unpickled: `.pth` files go through `torch.load(weights_only=True)`.
"""

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import msgpack
import numpy as np

from deit.config import ModelConfig
from deit.fileio import atomic_path
from deit.model import ViT, sincos2d, skeleton

FORMAT_VERSION = "1"
WEIGHT_FORMATS = "a directory holding model.safetensors, .safetensors, .pth/.pt/.bin (torch), .msgpack (deit3-jax)"

# Heads cannot be read off shapes; these are the standard ViT sizes (Ti, S, B, L, H).
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

# Our leaf names that differ from timm's (everything else is the same dotted path).
_TIMM_RENAME = {"patch_embed.weight": "patch_embed.proj.weight", "patch_embed.bias": "patch_embed.proj.bias"}


# ----------------------------------------------------------------------------- helpers

def _fmt_keys(keys: set[str] | list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return str(keys[:limit]) + more


def _to_numpy(value: Any, key: str) -> np.ndarray:
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


def _leaf_names(tree: Any) -> list[tuple[str, Any]]:
    """(dotted path, leaf) for every array (or ShapeDtypeStruct) leaf of a model or skeleton."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
            out.append((jax.tree_util.keystr(path, simple=True, separator="."), leaf))
    return out


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
    for name, leaf in _leaf_names(skeleton(cfg)):
        for key, layer in _timm_entries(name, cfg.layers):
            shapes[key] = _timm_shape(name, leaf.shape, layer)
    return shapes


def _check_against(flat: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Exactly the expected keys, each with exactly the expected shape, or a one-line ValueError."""
    missing, unknown = set(expected) - set(flat), set(flat) - set(expected)
    if missing or unknown:
        parts = ([f"missing keys {_fmt_keys(missing)}"] if missing else []) + \
                ([f"unexpected keys {_fmt_keys(unknown)}"] if unknown else [])
        raise ValueError(f"{what}: " + "; ".join(parts))
    for key, shape in expected.items():
        if tuple(flat[key].shape) != tuple(shape):
            raise ValueError(f"{what}: {key} has shape {tuple(flat[key].shape)}, expected {tuple(shape)}")


def _fill(cfg: ModelConfig, flat: Mapping[str, np.ndarray]) -> ViT:
    """A ViT whose leaves are taken from a checked timm-named flat dict (blocks stacked)."""
    abstract = skeleton(cfg)
    values = {}
    for name, leaf in _leaf_names(abstract):
        entries = _timm_entries(name, cfg.layers)
        if entries[0][1] is not None:
            arr = np.stack([flat[key] for key, _ in entries])
        else:
            arr = flat[entries[0][0]].reshape(leaf.shape)
        values[name] = jnp.asarray(arr, dtype=leaf.dtype)
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = [values[jax.tree_util.keystr(p, simple=True, separator=".")] if isinstance(x, jax.ShapeDtypeStruct) else x
              for p, x in paths]
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- timm

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
    for name, leaf in _leaf_names(model):
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
        new = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out[new] = _to_numpy(value, key)
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
        raise ValueError(f"cannot infer the model config: no patch_embed.proj.weight among keys {_fmt_keys(set(sd))}")
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


def from_timm(state_dict: Mapping[str, Any], cfg: ModelConfig | None = None, *, heads: int | None = None) -> ViT:
    """A ViT from a timm / DeiT / DeiT-III state dict (torch tensors or arrays; may be wrapped
    under `model` / `state_dict`). Without `cfg` the config is inferred from keys and shapes.

    Both position layouts load: deit3 (patches only) and vit (cls/dist rows folded into the tokens).
    Every key and shape is checked against the config: a mismatch is a one-line ValueError.
    """
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
    _check_against(sd, timm_shapes(cfg), "timm state dict")
    return _fill(cfg, sd)


# ----------------------------------------------------------------------------- deit3-jax msgpack

def _ndarray_from_ext(data: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=False)
    if isinstance(dtype_name, bytes):
        dtype_name = dtype_name.decode()
    try:
        dtype = np.dtype(dtype_name)
    except TypeError:
        import ml_dtypes  # bfloat16, float8_*: installed with jax

        if not hasattr(ml_dtypes, dtype_name):
            raise ValueError(f"msgpack array has unknown dtype {dtype_name!r}") from None
        dtype = np.dtype(getattr(ml_dtypes, dtype_name))
    return np.frombuffer(buffer, dtype=dtype).reshape(tuple(shape))


def _ext_hook(code: int, data: bytes) -> Any:
    # flax.serialization ext codes: 1 ndarray, 2 native complex, 3 numpy scalar.
    if code in (1, 3):
        return _ndarray_from_ext(data)
    if code == 2:
        raise ValueError("msgpack holds a complex number (ext code 2): not a weights file")
    raise ValueError(f"msgpack ext type code {code} is not one flax writes (1 ndarray, 2 complex, 3 scalar)")


def _unchunk(tree: Any) -> Any:
    """flax splits arrays over 1 GiB into {'__msgpack_chunked_array__', 'shape', 'chunks'} dicts."""
    if not isinstance(tree, dict):
        return tree
    if tree.get("__msgpack_chunked_array__"):
        shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
        chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    return {k: _unchunk(v) for k, v in tree.items()}


def read_flax_msgpack(data: bytes) -> dict[str, Any]:
    """Decode flax.serialization.msgpack_serialize output (nested dicts of numpy arrays), without flax."""
    tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    if not isinstance(tree, dict):
        raise ValueError(f"msgpack holds a {type(tree).__name__}, expected a dict of weights")
    return _unchunk(tree)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def deit3_jax_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected flat deit3-jax param key -> shape for a config."""
    d, p, h, g = cfg.dim, cfg.patch_size, cfg.heads, cfg.grid
    s = {"embed.wte.kernel": (p, p, 3, d), "embed.wte.bias": (d,), "norm.scale": (d,), "norm.bias": (d,)}
    if cfg.pooling == "cls":
        s["embed.cls_token"] = (1, 1, d)
    if cfg.posemb == "learnable":
        s["embed.wpe"] = (g, g, d)
    if cfg.labels:
        s |= {"head.kernel": (d, cfg.labels), "head.bias": (cfg.labels,)}
    for i in range(cfg.layers):
        b = f"layer_{i}."
        for w in ("wq", "wk", "wv"):
            s |= {f"{b}attn.{w}.kernel": (d, h, d // h), f"{b}attn.{w}.bias": (h, d // h)}
        s |= {f"{b}attn.wo.kernel": (h, d // h, d), f"{b}attn.wo.bias": (d,),
              f"{b}ff.w1.kernel": (d, 4 * d), f"{b}ff.w1.bias": (4 * d,),
              f"{b}ff.w2.kernel": (4 * d, d), f"{b}ff.w2.bias": (d,)}
        for n in ("norm1", "norm2"):
            s |= {f"{b}{n}.scale": (d,), f"{b}{n}.bias": (d,)}
        if cfg.layerscale:
            s |= {f"{b}scale1": (d,), f"{b}scale2": (d,)}
    return s


def infer_deit3_jax_config(flat: Mapping[str, np.ndarray], image_size: int | None = None) -> ModelConfig:
    """Config of a flat deit3-jax param dict: tanh GELU (flax's default), as the checkpoint was trained."""
    for key in ("embed.wte.kernel", "layer_0.attn.wq.kernel"):
        if key not in flat:
            raise ValueError(f"not a deit3-jax checkpoint: no {key} among keys {_fmt_keys(set(flat))}")
    kernel, wq = flat["embed.wte.kernel"], flat["layer_0.attn.wq.kernel"]
    if kernel.ndim != 4 or wq.ndim != 3:
        raise ValueError(f"embed.wte.kernel {kernel.shape} / layer_0.attn.wq.kernel {wq.shape}: expected (P,P,3,D) / (D,heads,head_dim)")
    patch, dim = kernel.shape[0], kernel.shape[-1]
    if "embed.wpe" in flat:
        grid = flat["embed.wpe"].shape[0]
        if image_size is not None and image_size != grid * patch:
            raise ValueError(f"image_size={image_size} contradicts embed.wpe {flat['embed.wpe'].shape} (patch {patch})")
        image_size = grid * patch
    layers = len({k.split(".")[0] for k in flat if k.startswith("layer_")})
    return ModelConfig(
        layers=layers, dim=dim, heads=wq.shape[1],
        labels=flat["head.kernel"].shape[-1] if "head.kernel" in flat else 0,
        layerscale="layer_0.scale1" in flat, patch_size=patch,
        image_size=image_size if image_size is not None else 224,  # sincos2d: deit3-jax's default size
        posemb="learnable" if "embed.wpe" in flat else "sincos2d",
        pooling="cls" if "embed.cls_token" in flat else "gap", gelu="tanh")


def _deit3_jax_to_timm(f: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Checked flax layouts -> timm layouts (kernels are [in, out], timm weights [out, in])."""
    d = cfg.dim
    sd = {"patch_embed.proj.weight": f["embed.wte.kernel"].transpose(3, 2, 0, 1),  # (P,P,3,D) -> (D,3,P,P)
          "patch_embed.proj.bias": f["embed.wte.bias"], "norm.weight": f["norm.scale"], "norm.bias": f["norm.bias"]}
    if "embed.cls_token" in f:
        sd["cls_token"] = f["embed.cls_token"]
    if "embed.wpe" in f:
        sd["pos_embed"] = f["embed.wpe"].reshape(1, -1, d)  # row-major grid, as the patch tokens
    if "head.kernel" in f:
        sd |= {"head.weight": f["head.kernel"].T, "head.bias": f["head.bias"]}
    for i in range(cfg.layers):
        a, t = f"layer_{i}.", f"blocks.{i}."
        qkv = [f[f"{a}attn.{w}.kernel"].reshape(d, d) for w in ("wq", "wk", "wv")]
        sd[t + "attn.qkv.weight"] = np.concatenate(qkv, 1).T  # rows [q | k | v] x heads x head_dim
        sd[t + "attn.qkv.bias"] = np.concatenate([f[f"{a}attn.{w}.bias"].reshape(d) for w in ("wq", "wk", "wv")])
        sd[t + "attn.proj.weight"] = f[f"{a}attn.wo.kernel"].reshape(d, d).T
        sd[t + "attn.proj.bias"] = f[f"{a}attn.wo.bias"]
        for j in (1, 2):
            sd[t + f"mlp.fc{j}.weight"] = f[f"{a}ff.w{j}.kernel"].T
            sd[t + f"mlp.fc{j}.bias"] = f[f"{a}ff.w{j}.bias"]
            sd[t + f"norm{j}.weight"] = f[f"{a}norm{j}.scale"]
            sd[t + f"norm{j}.bias"] = f[f"{a}norm{j}.bias"]
            if cfg.layerscale:
                sd[t + f"ls{j}.gamma"] = f[f"{a}scale{j}"]
    return sd


def from_deit3_jax(tree: Mapping[str, Any], *, image_size: int | None = None) -> ViT:
    """A ViT from a deit3-jax param tree (as `read_flax_msgpack` returns it; top key `model`,
    optionally under `params`). The model uses tanh GELU to reproduce deit3-jax's logits.
    `image_size` is only needed for sincos2d checkpoints (no `embed.wpe`; default 224).
    """
    for wrapper in ("params", "model"):
        if wrapper in tree and isinstance(tree[wrapper], Mapping):
            tree = tree[wrapper]
    flat = {k: _to_numpy(v, k) for k, v in _flatten(tree).items()}
    cfg = infer_deit3_jax_config(flat, image_size)
    _check_against(flat, deit3_jax_shapes(cfg), "deit3-jax checkpoint")
    return _fill(cfg, _deit3_jax_to_timm(flat, cfg))


# ----------------------------------------------------------------------------- files

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

