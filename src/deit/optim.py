"""Optimisers, schedule, weight-decay mask and layer-wise lr decay, over the model's array pytree.

Block parameters are stacked ([layers, ...]); everything here that is "per tensor" in the
original (LAMB's trust ratio, layer-wise lr decay) is computed per block slice of the
leading axis, so the stacked layout changes nothing numerically. deit3-jax holds q, k and v
as three kernels, our `attn.qkv.weight` is one fused [3D, D] matrix: LAMB takes its trust
ratio per q, k and v row block (`trust_groups`), so the fused layout changes nothing either.

The lr is read at the train step's counter (`update(..., step=state.step)`), not at a count
kept in the optimiser state: the non-finite guard keeps the old state on a skipped step, which
must hold Adam's count back but not the schedule.
"""

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from deit.config import Config, OptimConfig
from deit.model import ViT
from deit.treepath import leaf_parts

EMBED_NAMES = {"patch_embed", "cls_token", "dist_token", "pos_embed"}


def _params(model: ViT) -> Any:
    """Array leaves of a model or of its abstract skeleton (ShapeDtypeStructs)."""
    return eqx.filter(model, lambda x: eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct))


def param_labels(model: ViT) -> Any:
    """Per-leaf (group, stacked) labels: group is 'embed', 'blocks' or 'top' (norm, heads)."""
    params = _params(model)

    def label(path, _):
        top = leaf_parts(path)[0]
        return "embed" if top in EMBED_NAMES else "blocks" if top == "blocks" else "top"

    return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(model: ViT) -> Any:
    """True for matrix kernels (linear and patch projections): no decay on biases, norms,
    LayerScale, cls/dist tokens and position embeddings (deit3-jax's `kernel` rule)."""
    params = _params(model)

    def is_kernel(path, _):
        names = leaf_parts(path)
        return names[-1] == "weight" and not any(n.startswith("norm") for n in names)

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def stacked_mask(model: ViT) -> Any:
    return jax.tree.map(lambda g: g == "blocks", param_labels(model))


def trust_groups(model: ViT) -> Any:
    """Per leaf, how many equal row blocks of a (block's) tensor take their own LAMB trust ratio:
    3 for the fused qkv weight (rows [q | k | v], three kernels in deit3-jax), 1 elsewhere."""
    params = _params(model)

    def groups(path, _):
        return 3 if leaf_parts(path)[-3:] == ["attn", "qkv", "weight"] else 1

    return jax.tree_util.tree_map_with_path(groups, params)


def layer_scales(model: ViT, lr_decay: float) -> Any:
    """lr multiplier per leaf: embeddings lr_decay**L, block i lr_decay**(L-1-i), rest 1.

    Block leaves get an array [L, 1, ...] broadcasting over each block's slice.
    """
    n = model.cfg.layers
    params = _params(model)

    def scale(group, p):
        if group == "embed":
            return jnp.float32(lr_decay**n)
        if group == "blocks":
            s = jnp.asarray([lr_decay ** (n - 1 - i) for i in range(n)], jnp.float32)
            return s.reshape((n,) + (1,) * (p.ndim - 1))
        return jnp.float32(1.0)

    return jax.tree.map(scale, param_labels(model), params)


def schedule(cfg: OptimConfig, batch_size: int = 512) -> optax.Schedule:
    """Warmup from 1e-6 to the peak over `warmup_steps`, cosine to 1e-5 at `training_steps`.

    The peak is `learning_rate`, or `learning_rate * batch_size / 512` with `scale_lr`.
    """
    peak = cfg.learning_rate * (batch_size / 512 if cfg.scale_lr else 1.0)
    return optax.warmup_cosine_decay_schedule(
        init_value=1e-6, peak_value=peak, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.training_steps, cfg.warmup_steps + 1), end_value=1e-5)


def _row_blocks(x: Float[Array, "..."], stacked: bool, groups: int) -> Float[Array, "*l g n"]:
    """x as [(layers,) groups, -1]: one row per tensor whose norm LAMB takes."""
    lead = x.shape[:1] if stacked else ()
    return x.reshape(*lead, groups, -1)


def _trust_ratio(p: Float[Array, "*l g n"], u: Float[Array, "*l g n"]) -> Float[Array, "*l g 1"]:
    """||p|| / ||u|| per row, 1 where either norm is 0 (optax.scale_by_trust_ratio's defaults)."""
    pn = jnp.linalg.norm(p.astype(jnp.float32), axis=-1, keepdims=True)
    un = jnp.linalg.norm(u.astype(jnp.float32), axis=-1, keepdims=True)
    zero = (pn == 0) | (un == 0)
    return jnp.where(zero, 1.0, pn / jnp.where(zero, 1.0, un))


def scale_by_trust_ratio(stacked: Any, mask: Any, groups: Any = None) -> optax.GradientTransformation:
    """LAMB trust ratio ||w|| / ||u|| per tensor (per block slice for stacked leaves; per row
    block where `groups` > 1, see `trust_groups`), applied only where `mask` is True (deit3-jax:
    the weight-decayed kernels). `groups=None`: one ratio per tensor everywhere."""
    groups = jax.tree.map(lambda _: 1, mask) if groups is None else groups

    def update(updates, state, params):
        def one(u, p, st, m, g):
            if not m:
                return u
            ub = _row_blocks(u, st, g)
            return (ub * _trust_ratio(_row_blocks(p, st, g), ub)).reshape(u.shape).astype(u.dtype)

        return jax.tree.map(one, updates, params, stacked, mask, groups), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def scale_by_schedule_at_step(lr: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """Multiply by -lr(step), `step` being the train step's counter passed to `update` (0-based:
    the first update uses lr(0), as optax's count). Without `step`, the own count, as
    optax.scale_by_learning_rate. The state is optax's ScaleByScheduleState either way, so the
    optimiser state (and checkpoints of it) keep their structure."""

    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, step: Int[Array, ""] | None = None, **extra_args):
        rate = lr(state.count if step is None else step)
        updates = jax.tree.map(lambda u: jnp.asarray(-rate, u.dtype) * u, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig, model: ViT, batch_size: int = 512) -> optax.GradientTransformationExtraArgs:
    """adamw or deit3-jax's lamb (trust ratio on decayed kernels only), + clip and layer decay.

    `update(grads, state, params, step=step)` reads the lr at `step`; without it, at the number
    of updates applied so far (optax's count)."""
    mask = decay_mask(model)
    lr = schedule(cfg, batch_size)
    parts = []
    if cfg.clip_grad > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad))
    parts += [optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps),
              optax.add_decayed_weights(cfg.weight_decay, mask=mask)]
    if cfg.optimizer == "lamb":
        parts.append(scale_by_trust_ratio(stacked_mask(model), mask, trust_groups(model)))
    elif cfg.optimizer != "adamw":
        raise ValueError(f"optimizer={cfg.optimizer!r}: allowed 'adamw', 'lamb'")
    parts.append(scale_by_schedule_at_step(lr))
    if cfg.lr_decay < 1.0:
        parts.append(scale_by_tree(layer_scales(model, cfg.lr_decay)))
    return optax.chain(*parts)


class Optimizer(NamedTuple):
    tx: optax.GradientTransformationExtraArgs
    schedule: optax.Schedule


def build(cfg: Config, model: ViT) -> Optimizer:
    b = cfg.data.train_batch_size
    return Optimizer(make_optimizer(cfg.optim, model, b), schedule(cfg.optim, b))
