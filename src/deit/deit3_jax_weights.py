"""deit3-jax `.msgpack` checkpoints, read without flax.

A flax param tree (separate q/k/v kernels [D, heads, head_dim], [in, out] kernels, a g x g
position grid) is checked against the shapes a config implies, then rewritten into timm's
naming so the one checked path of `deit.timm_weights` builds the model.
"""

from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from deit.config import ModelConfig
from deit.model import ViT
from deit.timm_weights import check_keys, fill_model, fmt_keys, to_numpy


ALLOWED = "allowed: a complete flax msgpack of a deit3-jax param tree (flax.serialization.msgpack_serialize)"


class _NotWeights(ValueError):
    """Raised from inside the unpacker for content flax never writes (passed on as it is)."""


class _Packed:
    """A flax ndarray record (ext code 1 or 3), decoded once its key in the tree is known."""

    def __init__(self, data: bytes):
        self.data = data


def _ndarray(data: bytes, key: str) -> np.ndarray:
    """flax's ndarray record (shape, dtype name, C-order bytes), checked: a bad record names its key."""
    try:
        shape, dtype_name, buffer = msgpack.unpackb(data, raw=False)
    except Exception:  # noqa: BLE001: any malformed record
        raise ValueError(f"{key}: malformed array record; {ALLOWED}") from None
    if isinstance(dtype_name, bytes):
        dtype_name = dtype_name.decode(errors="replace")
    if not (isinstance(shape, (list, tuple)) and all(type(n) is int and n >= 0 for n in shape)
            and isinstance(dtype_name, str) and isinstance(buffer, bytes)):
        raise ValueError(f"{key}: malformed array record (shape {shape!r:.40}, dtype {dtype_name!r:.20}); {ALLOWED}")
    try:
        dtype = np.dtype(dtype_name)
    except TypeError:
        import ml_dtypes  # bfloat16, float8_*: installed with jax

        if not hasattr(ml_dtypes, dtype_name):
            raise ValueError(f"{key}: unknown dtype {dtype_name!r}") from None
        dtype = np.dtype(getattr(ml_dtypes, dtype_name))
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buffer) != need:
        raise ValueError(f"{key}: {dtype_name} of shape {tuple(shape)} needs {need} bytes, the file holds "
                         f"{len(buffer)}; {ALLOWED}")
    return np.frombuffer(buffer, dtype=dtype).reshape(tuple(shape))


def _ext_hook(code: int, data: bytes) -> Any:
    # flax.serialization ext codes: 1 ndarray, 2 native complex, 3 numpy scalar (an ndarray of shape ()).
    if code in (1, 3):
        return _Packed(data)
    if code == 2:
        raise _NotWeights("msgpack holds a complex number (ext code 2): not a weights file")
    raise _NotWeights(f"msgpack ext type code {code} is not one flax writes (1 ndarray, 2 complex, 3 scalar)")


def _decode(tree: Any, key: str) -> Any:
    """Arrays decoded, each checked under its key; flax's chunked arrays (over 1 GiB:
    {'__msgpack_chunked_array__', 'shape', 'chunks'}) joined."""
    if isinstance(tree, _Packed):
        return _ndarray(tree.data, key)
    if not isinstance(tree, dict):
        return tree
    if tree.get("__msgpack_chunked_array__"):
        try:
            shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
            chunks = [_decode(tree["chunks"][str(i)], f"{key}.chunks.{i}") for i in range(len(tree["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        except (KeyError, TypeError, ValueError) as e:
            if str(e).startswith(key):
                raise
            raise ValueError(f"{key}: malformed chunked array ({type(e).__name__}: {e}); {ALLOWED}") from None
    return {k: _decode(v, f"{key}.{k}" if key else str(k)) for k, v in tree.items()}


def read_flax_msgpack(data: bytes) -> dict[str, Any]:
    """Decode flax.serialization.msgpack_serialize output (nested dicts of numpy arrays), without flax.

    Untrusted input: a truncated or corrupt file, or an array whose bytes do not fit its shape
    (named by its key), is a one-line ValueError."""
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except _NotWeights:
        raise
    except msgpack.ExtraData:
        raise ValueError(f"corrupt msgpack (bytes left over after the first object); {ALLOWED}") from None
    except ValueError as e:
        detail = "truncated msgpack (incomplete input)" if "incomplete" in str(e) else f"corrupt msgpack ({e})"
        raise ValueError(f"{detail}; {ALLOWED}") from None
    except Exception as e:  # noqa: BLE001: FormatError, StackError, UnicodeDecodeError, ...
        raise ValueError(f"corrupt msgpack ({type(e).__name__}: {e}); {ALLOWED}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"msgpack holds a {type(tree).__name__}, expected a dict of weights; {ALLOWED}")
    return _decode(tree, "")


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
            raise ValueError(f"not a deit3-jax checkpoint: no {key} among keys {fmt_keys(set(flat))}")
    kernel, wq = flat["embed.wte.kernel"], flat["layer_0.attn.wq.kernel"]
    if kernel.ndim != 4 or wq.ndim != 3:
        raise ValueError(f"embed.wte.kernel {kernel.shape} / layer_0.attn.wq.kernel {wq.shape}: expected (P,P,3,D) / (D,heads,head_dim)")
    patch, dim = kernel.shape[0], kernel.shape[-1]
    if "embed.wpe" in flat:
        wpe = flat["embed.wpe"]
        if wpe.ndim != 3 or wpe.shape[0] != wpe.shape[1]:
            raise ValueError(f"embed.wpe has shape {wpe.shape}, expected (grid, grid, {dim})")
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


def deit3_jax_state(tree: Mapping[str, Any], *,
                    image_size: int | None = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, checked flat dict in timm naming) of a deit3-jax param tree: what `from_deit3_jax`
    fills a model from, read and checked without building one (no JAX arrays)."""
    for wrapper in ("params", "model"):
        if wrapper in tree and isinstance(tree[wrapper], Mapping):
            tree = tree[wrapper]
    flat = {k: to_numpy(v, k) for k, v in _flatten(tree).items()}
    cfg = infer_deit3_jax_config(flat, image_size)
    check_keys(flat, deit3_jax_shapes(cfg), "deit3-jax checkpoint")
    return cfg, _deit3_jax_to_timm(flat, cfg)


def from_deit3_jax(tree: Mapping[str, Any], *, image_size: int | None = None) -> ViT:
    """A ViT from a deit3-jax param tree (as `read_flax_msgpack` returns it; top key `model`,
    optionally under `params`). The model uses tanh GELU to reproduce deit3-jax's logits.
    `image_size` is only needed for sincos2d checkpoints (no `embed.wpe`; default 224).
    """
    return fill_model(*deit3_jax_state(tree, image_size=image_size))


__all__ = ["deit3_jax_shapes", "deit3_jax_state", "from_deit3_jax", "infer_deit3_jax_config", "read_flax_msgpack"]
