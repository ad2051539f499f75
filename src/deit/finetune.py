"""Fine-tuning from a pretrained checkpoint, as deit3-jax's `load_pretrained_params`.

The result always has the *target* model's structure and config (the fine-tune recipe's
image size, labels, droppath, GELU); only the weights come from the pretrained model:
- every array of the same shape is copied;
- a learnable position grid of another size is resized bicubically (g x g -> g' x g');
- the head: with a label mapping, rows dst take pretrained rows src and every other row
  gets zero weight and bias -10 (so unmapped classes start near probability 0); without one,
  a head of another size keeps the target's fresh initialisation.

A run checks all this up front (`check_pretrained`, from `deit.runtime.resolve_paths`): the file
reads, fits the target key by key and shape by shape, and the label mapping is in range, before
the run writes anything; the weights are loaded and adapted later, when the state is created.
"""

import dataclasses
import json
import numbers
import os
import re
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from deit.config import Config, ModelConfig
from deit.interop import load_model, read_weights
from deit.layers import Linear
from deit.model import ViT
from deit.recipes import RECIPES_DIR
from deit.timm_weights import fmt_keys, timm_shapes
from deit.treepath import leaf_name

# Fields that change which weights exist or what they mean: no adaptation is possible.
STRUCTURAL = ("dim", "layers", "heads", "patch_size", "layerscale", "pooling", "posemb", "distilled")
UNMAPPED_BIAS = -10.0  # deit3-jax's bias for head rows without a pretrained source
LABEL_MAPS_DIR = RECIPES_DIR / "label_maps"


def check_label_mapping(mapping: dict, src_labels: int | None = None, dst_labels: int | None = None,
                        what: str = "label_mapping") -> None:
    """{"src": [...], "dst": [...]}: equal-length int lists, in range (src of the pretrained head,
    dst of the target head), dst without repeats."""
    if not isinstance(mapping, dict) or not {"src", "dst"} <= set(mapping):
        raise ValueError(f"{what}: expected a JSON object with 'src' and 'dst' lists")
    src, dst = mapping["src"], mapping["dst"]
    for name, xs in (("src", src), ("dst", dst)):
        if not isinstance(xs, list):
            raise ValueError(f"{what}: '{name}' is a {type(xs).__name__}, expected a list of ints")
    if len(src) != len(dst):
        raise ValueError(f"{what}: 'src' has {len(src)} entries but 'dst' has {len(dst)}")
    for name, xs, limit, head in (("src", src, src_labels, "pretrained"), ("dst", dst, dst_labels, "target")):
        for i, x in enumerate(xs):
            # bool is an int subclass: reject it, it is never a class index.
            if not isinstance(x, numbers.Integral) or isinstance(x, bool) or x < 0 or (limit is not None and x >= limit):
                bound = f"an int in [0, {limit}) (the {head} head has {limit} labels)" if limit is not None \
                    else "a non-negative int"
                raise ValueError(f"{what}: {name}[{i}] = {x!r} is not {bound}")
    seen: dict[int, int] = {}
    for i, x in enumerate(dst):
        if x in seen:  # two sources for one row would silently keep only the last
            raise ValueError(f"{what}: dst[{i}] = {x} repeats dst[{seen[x]}]")
        seen[x] = i


def load_label_mapping(path: str | os.PathLike, *, src_labels: int | None = None,
                       dst_labels: int | None = None) -> dict:
    """Read and check a label-mapping JSON. A relative path that does not exist is looked up
    in `recipes/label_maps/` (recipes name it bare, e.g. "in21k_to_in1k.json")."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (LABEL_MAPS_DIR / p).exists():
        p = LABEL_MAPS_DIR / p
    if not p.is_file():
        where = f" (nor in {LABEL_MAPS_DIR})" if not Path(path).is_absolute() else ""
        raise ValueError(f"label_mapping {str(path)!r}: no such file{where}")
    try:
        mapping = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"label_mapping {p}: not valid JSON: {e}") from None
    check_label_mapping(mapping, src_labels, dst_labels, what=f"label_mapping {p}")
    return {"src": mapping["src"], "dst": mapping["dst"]}


def resize_pos_embed(pos: Float[Array, "n d"], grid: int) -> Float[Array, "m d"]:
    """Bicubic resize of a row-major g x g position grid to grid x grid (deit3-jax's rule)."""
    n, d = pos.shape
    g = round(n**0.5)
    if g * g != n:
        raise ValueError(f"pos_embed has {n} rows: not a square grid")
    if g == grid:
        return pos  # exactly the same weights, not a resampled copy
    out = jax.image.resize(pos.reshape(g, g, d).astype(jnp.float32), (grid, grid, d), "bicubic")
    return out.reshape(grid * grid, d).astype(pos.dtype)


def map_head(pretrained: Linear, target: Linear, mapping: dict) -> Linear:
    """Rows dst of the new head take pretrained rows src; the rest get weight 0 and bias -10."""
    src, dst = jnp.asarray(mapping["src"], jnp.int32), jnp.asarray(mapping["dst"], jnp.int32)
    weight = jnp.zeros_like(target.weight).at[dst].set(pretrained.weight[src].astype(target.weight.dtype))
    bias = jnp.full_like(target.bias, UNMAPPED_BIAS).at[dst].set(pretrained.bias[src].astype(target.bias.dtype))
    return eqx.tree_at(lambda h: (h.weight, h.bias), target, (weight, bias))


def adapt_head(pretrained: Linear | None, target: Linear | None, mapping: dict | None) -> Linear | None:
    """deit3-jax's head rule: mapped if a mapping is given, else copied if the label count agrees."""
    if target is None:
        return None  # labels=0: the target wants features, not a head
    if mapping is not None:
        return map_head(pretrained, target, mapping)
    if pretrained is None or pretrained.weight.shape != target.weight.shape:
        return target  # another label set: deit3-jax keeps the fresh initialisation
    return jax.tree.map(lambda p, t: p.astype(t.dtype), pretrained, target)


def adapt_pretrained(pretrained: ViT, target: ViT, label_mapping: dict | None = None) -> ViT:
    """`target`'s structure and config filled with `pretrained`'s weights (see the module doc).

    The config, GELU included, is the target's: a deit3-jax `.msgpack` loads with gelu='tanh'
    (flax's default), but the fine-tune recipe says which GELU to train with, so it wins.
    """
    for field in STRUCTURAL:
        a, b = getattr(pretrained.cfg, field), getattr(target.cfg, field)
        if a != b:
            raise ValueError(f"cannot fine-tune: pretrained {field}={a!r} but target {field}={b!r}")
    if label_mapping is not None:
        if target.head is None or pretrained.head is None:
            which = "target" if target.head is None else "pretrained model"
            raise ValueError(f"label_mapping needs a head on both models, but the {which} has labels=0")
        check_label_mapping(label_mapping, pretrained.cfg.labels, target.cfg.labels)

    source = {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(pretrained)[0] if eqx.is_array(x)}

    def take(path: tuple, leaf: Any) -> Any:
        name = leaf_name(path)
        if not eqx.is_array(leaf) or name.startswith(("pos_embed", "head")):
            return leaf  # not a weight, or adapted below
        x = source.get(name)
        if x is None or x.shape != leaf.shape:  # unreachable after the field check; a clear error if not
            raise ValueError(f"cannot fine-tune: {name} is {None if x is None else x.shape} in the "
                             f"pretrained model, expected {leaf.shape}")
        return x.astype(leaf.dtype)

    out = jax.tree_util.tree_map_with_path(take, target)
    if target.pos_embed is not None:
        out = eqx.tree_at(lambda m: m.pos_embed, out, resize_pos_embed(pretrained.pos_embed, target.cfg.grid))
    if target.head is not None:
        out = eqx.tree_at(lambda m: m.head, out, adapt_head(pretrained.head, target.head, label_mapping))
    if target.head_dist is not None:
        out = eqx.tree_at(lambda m: m.head_dist, out, adapt_head(pretrained.head_dist, target.head_dist, label_mapping))
    return out


# deit3-jax's checkpoint file names: `<output_dir>/<run name>-{last,best}.msgpack`.
DEIT3_JAX_NAME = re.compile(r"^(?P<dir>.*?)/?(?P<run>[^/]+)-(?P<which>last|best)\.msgpack$")


def find_pretrained(path: str) -> str:
    """The weights a fine-tuning recipe names, as given if that path exists; else, for a
    deit3-jax name `DIR/RUN-last.msgpack`, our own run `DIR/RUN/checkpoints/last` (a recipe's
    default output dir is `outputs/RUN`, and `$GCS_MODEL_DIR` defaults to `outputs`)."""
    if "://" in path or os.path.exists(path):
        return path
    m = DEIT3_JAX_NAME.match(path)
    ours = m and os.path.join(m["dir"] or ".", m["run"], "checkpoints", m["which"])
    if ours and os.path.isfile(os.path.join(ours, "model.safetensors")):
        return ours
    also = f" nor our run's checkpoint {ours}" if ours else ""
    raise ValueError(f"pretrained_ckpt={path!r}: no such file{also}; train the pre-training recipe first "
                     "(its default --output-dir is outputs/RUN), or set $GCS_MODEL_DIR / --pretrained-ckpt")


def fit_error(pretrained: ModelConfig, target: ModelConfig, flat: dict) -> str | None:
    """Why weights of `pretrained`'s config (`flat`: its checked timm-named arrays) cannot fine-tune
    `target`: the first key whose shape differs, else the missing/unexpected keys, else the
    structural field that differs; each with the fields that differ. None: they fit."""
    diffs = [f for f in STRUCTURAL if getattr(pretrained, f) != getattr(target, f)]
    fields = (f" (pretrained {', '.join(f'{f}={getattr(pretrained, f)!r}' for f in diffs)}; "
              f"model {', '.join(f'{f}={getattr(target, f)!r}' for f in diffs)})") if diffs else ""
    # The image size and label count may differ (positions are resized, the head mapped or
    # re-initialised): expect the pretrained grid and labels, the target's everything else.
    expected = timm_shapes(dataclasses.replace(target, image_size=pretrained.grid * target.patch_size,
                                               labels=pretrained.labels))
    for key, shape in expected.items():
        if key in flat and tuple(flat[key].shape) != tuple(shape):
            return f"{key} has shape {tuple(flat[key].shape)}, the model needs {tuple(shape)}{fields}"
    missing, unknown = set(expected) - set(flat), set(flat) - set(expected)
    if missing or unknown:
        parts = ([f"missing keys {fmt_keys(missing, 4)}"] if missing else []) + \
                ([f"unexpected keys {fmt_keys(unknown, 4)}"] if unknown else [])
        return "; ".join(parts) + fields
    if diffs:
        return f"pretrained {diffs[0]}={getattr(pretrained, diffs[0])!r} but the model has " \
               f"{diffs[0]}={getattr(target, diffs[0])!r}"
    return None


def check_pretrained(path: str, model: ModelConfig, label_mapping: str | None = None) -> None:
    """What fine-tuning `model` from the weights at `path` needs, checked before a run writes
    anything (`deit.runtime.resolve_paths`): the file reads (complete, no code, every shape
    consistent with its config: `deit.interop.read_weights`), it fits `model` key by key and
    shape by shape (the image size and labels may differ), and `label_mapping`'s indices are in
    range of both heads. Otherwise a one-line ValueError naming the file (and key or index)."""
    try:
        pretrained, flat = read_weights(path, heads=model.heads)  # heads: timm files do not store them
    except ValueError as e:
        raise ValueError(f"pretrained_ckpt: {e}") from None
    problem = fit_error(pretrained, model, flat)
    if problem:
        raise ValueError(f"pretrained_ckpt {path} does not fit the model: {problem}; allowed: weights of the same "
                         f"architecture ({', '.join(STRUCTURAL)}; image_size and labels may differ)")
    if label_mapping:
        if model.labels == 0 or pretrained.labels == 0:
            which = "model" if model.labels == 0 else f"pretrained_ckpt {path}"
            raise ValueError(f"label_mapping {label_mapping} needs a head on both models, but the {which} has labels=0")
        load_label_mapping(label_mapping, src_labels=pretrained.labels, dst_labels=model.labels)


def load_pretrained(cfg: Config, target: ViT) -> ViT:
    """`target` filled from `cfg.pretrained_ckpt`, with `cfg.data.label_mapping` if set."""
    # heads are not stored in timm files: the recipe's value is the only source.
    pretrained = load_model(cfg.pretrained_ckpt, heads=cfg.model.heads)
    mapping = None
    if cfg.data.label_mapping:
        mapping = load_label_mapping(cfg.data.label_mapping, src_labels=pretrained.cfg.labels,
                                     dst_labels=cfg.model.labels)
    return adapt_pretrained(pretrained, target, mapping)
