"""The jitted train and eval steps, their state, losses and metrics.

The train state is created directly in its shardings (`create_state`; `abstract_state` is the
same layout without allocating, for `deit.memory`). The step's pieces are module functions:
`accumulate_grads` (micro-batches in a scan) and `guard_non_finite` (a step with a non-finite
loss or gradient norm changes nothing but the counters).

Step-varying values (the step, hence lr and RNG keys) live in arrays inside the state, so
one compiled step serves the whole run. RNG keys are derived by folding the step into the
recipe's seeds: nothing random is carried, and a resumed run draws the same numbers.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, UInt8

from deit import augment, finetune, mixing, sharding
from deit.config import Config
from deit.model import ViT


class TrainState(eqx.Module):
    model: ViT
    opt_state: Any
    step: Int[Array, ""]
    ema: ViT | None
    skipped: Int[Array, ""]
    """Updates skipped so far because the loss or gradient norm was not finite."""
    bad_streak: Int[Array, ""]
    """Consecutive skipped updates up to now (the run stops after `max_bad_steps`)."""


def init_state(model: ViT, tx: optax.GradientTransformation, ema: bool = False) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(model, tx.init(eqx.filter(model, eqx.is_array)), zero, model if ema else None, zero, zero)


def fresh_state(cfg: Config, tx: optax.GradientTransformation) -> TrainState:
    """The run's initial state: the model at `init_seed` (and its EMA copy with `model_ema`)."""
    return init_state(ViT(cfg.model, key=jax.random.key(cfg.init_seed)), tx, cfg.optim.model_ema)


def abstract_state(cfg: Config, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation) -> tuple[Any, Any, Any]:
    """(array leaves as ShapeDtypeStructs carrying their NamedShardings, static rest, shardings):
    the layout of `create_state`, without allocating anything."""
    arrays, static = eqx.partition(eqx.filter_eval_shape(lambda: fresh_state(cfg, tx)),
                                   lambda x: isinstance(x, jax.ShapeDtypeStruct))
    shardings = sharding.state_shardings(mesh, arrays, cfg.model.layers)
    sds = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), arrays, shardings)
    return sds, static, shardings


def create_state(cfg: Config, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation) -> tuple[TrainState, Any]:
    """(the train state created directly in its shardings, no full host copy for big models;
    the shardings). With `pretrained_ckpt`, the fresh model's structure filled with its weights."""
    _, static, shardings = abstract_state(cfg, mesh, tx)
    arrays = jax.jit(lambda: eqx.filter(fresh_state(cfg, tx), eqx.is_array), out_shardings=shardings)()
    state = eqx.combine(arrays, static)
    if cfg.pretrained_ckpt:  # fine-tune: the fresh model's structure, filled with pretrained weights
        params, model_static = eqx.partition(finetune.load_pretrained(cfg, state.model), eqx.is_array)
        ema = cfg.optim.model_ema
        build = lambda p: eqx.filter(init_state(eqx.combine(p, model_static), tx, ema), eqx.is_array)
        state = eqx.combine(jax.jit(build, out_shardings=shardings)(params), static)
    return state, shardings


def ema_update(ema: ViT, model: ViT, decay: float) -> ViT:
    """ema <- decay * ema + (1 - decay) * model, over the float arrays."""
    e, static = eqx.partition(ema, eqx.is_inexact_array)
    m = eqx.filter(model, eqx.is_inexact_array)
    return eqx.combine(jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, e, m), static)


def cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def distillation_loss(kind: str, dist_logits: Float[Array, "b c"], teacher_logits: Float[Array, "b c"],
                      tau: float) -> Float[Array, ""]:
    """DeiT's distillation term. soft: KL(teacher || student) at temperature tau, scaled by
    tau^2 and divided by the number of logits (as the original); hard: CE against teacher argmax."""
    dist_logits, teacher_logits = dist_logits.astype(jnp.float32), teacher_logits.astype(jnp.float32)
    if kind == "soft":
        s = jax.nn.log_softmax(dist_logits / tau, -1)
        t = jax.nn.log_softmax(teacher_logits / tau, -1)
        return (jnp.exp(t) * (t - s)).sum() * tau**2 / dist_logits.size
    if kind == "hard":
        return optax.softmax_cross_entropy_with_integer_labels(dist_logits, teacher_logits.argmax(-1)).mean()
    raise ValueError(f"distillation_type={kind!r}: allowed 'soft', 'hard'")


def criterion_loss(criterion: str, logits: Float[Array, "b c"], targets: Float[Array, "b c"]) -> Float[Array, " b"]:
    """Per-sample loss: softmax CE, or deit3-jax's BCE (targets > 0 after mixup, mean over classes)."""
    logits = logits.astype(jnp.float32)
    if criterion == "ce":
        return optax.softmax_cross_entropy(logits, targets)
    if criterion == "bce":
        return optax.sigmoid_binary_cross_entropy(logits, (targets > 0).astype(jnp.float32)).mean(-1)
    raise ValueError(f"criterion={criterion!r}: allowed 'ce', 'bce'")


def topk_correct(logits: Float[Array, "b c"], targets: Float[Array, "b c"]) -> tuple[Float[Array, " b"], Float[Array, " b"]]:
    """Top-1 / top-5 hits, multi-label aware as in deit3-jax: a prediction counts when it is
    in the set of labels holding the maximal target weight."""
    label_set = targets == targets.max(-1, keepdims=True)
    k = min(5, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1]
    hits = jnp.take_along_axis(label_set, top, axis=-1)
    return hits[:, 0].astype(jnp.float32), hits.any(-1).astype(jnp.float32)


def accumulate_grads(grad_fn: Callable, model: Any, batch_parts: tuple, key: jax.Array,
                     accum: int) -> tuple[tuple[jax.Array, jax.Array], Any]:
    """((loss, logits), grads) of `grad_fn(model, key, *batch_parts)` (an
    `eqx.filter_value_and_grad(..., has_aux=True)` returning the logits as aux), over `accum`
    micro-batches: each part (None passes through) split along its batch axis, micro-batch i
    drawing `jax.random.split(key, accum)[i]`, in a scan (activation memory of one micro-batch);
    the mean loss and gradient, the logits in batch order. `accum=1` is one call with `key`."""
    if accum == 1:
        return grad_fn(model, key, *batch_parts)

    def split(a):
        return None if a is None else a.reshape(accum, -1, *a.shape[1:])

    def micro(acc, inp):
        k, *parts = inp
        (loss, logits), g = grad_fn(model, k, *parts)
        return jax.tree.map(jnp.add, acc, g), (loss, logits)

    zeros = jax.tree.map(jnp.zeros_like, eqx.filter(model, eqx.is_array))
    grads, (losses, logits) = jax.lax.scan(micro, zeros, (jax.random.split(key, accum), *map(split, batch_parts)))
    grads = jax.tree.map(lambda g: g / accum, grads)
    return (losses.mean(), logits.reshape(-1, logits.shape[-1])), grads


def guard_non_finite(new: Any, old: Any, ok: jax.Array) -> Any:
    """`new` where `ok`, else `old`, array leaf by array leaf (other leaves from `new`): a step
    whose loss or gradient is not finite keeps the old model, optimiser state and EMA."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b) if eqx.is_array(a) else a, new, old)


def make_train_step(cfg: Config, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    state_shardings: Any = None) -> Callable:
    """step(state, images, labels, teacher=None) -> (state, metrics), jitted, state donated.

    `tx.update` gets `step=state.step` (optim.make_optimizer reads its lr there; a transform
    without extra args ignores it). `schedule` gives the logged lr."""
    num_labels, accum = cfg.model.labels, cfg.optim.grad_accum
    dtype = jnp.bfloat16 if cfg.optim.compute_dtype == "bfloat16" else jnp.float32
    distill = cfg.distill

    def loss_fn(model: ViT, key, x, t, teacher_logits):
        # bf16 compute: cast weights and inputs; gradients flow back to the f32 parameters.
        model, x = cast_floats(model, dtype), x.astype(dtype)
        if teacher_logits is None:
            logits = model(x, key=key)
            loss = criterion_loss(cfg.loss.criterion, logits, t).mean()
        else:
            logits, dist_logits = model.forward_heads(x, key=key)
            base = criterion_loss(cfg.loss.criterion, logits, t).mean()
            kd = distillation_loss(distill.distillation_type, dist_logits, teacher_logits, distill.distillation_tau)
            loss = (1 - distill.distillation_alpha) * base + distill.distillation_alpha * kd
            logits = (logits + dist_logits) / 2
        return loss, logits.astype(jnp.float32)

    grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)

    def step_fn(state: TrainState, images: UInt8[Array, "b h w 3"], labels: Int[Array, " b"],
                teacher: ViT | None = None):
        with sharding.mesh_context(state_shardings):  # activations stay batch-sharded (constrain_batch)
            return _step(state, images, labels, teacher)

    def _step(state: TrainState, images, labels, teacher):
        k_aug, k_mix = jax.random.split(jax.random.fold_in(jax.random.key(cfg.augment.mixup_seed), state.step))
        k_drop = jax.random.fold_in(jax.random.key(cfg.dropout_seed), state.step)
        x = augment.train_transform(cfg.augment, k_aug, images)
        t = mixing.one_hot_targets(cfg.loss, labels, num_labels)
        x, t = mixing.mixup_cutmix(cfg.augment, k_mix, x, t)
        # The teacher sees the same mixed inputs as the student (DeiT), in eval mode.
        t_logits = None if teacher is None else jax.lax.stop_gradient(eqx.nn.inference_mode(teacher)(x))

        # Micro-batches (grad_accum > 1) in a scan: one update per step.
        (loss, logits), grads = accumulate_grads(grad_fn, state.model, (x, t, t_logits), k_drop, accum)

        params = eqx.filter(state.model, eqx.is_array)
        # The lr is read at the step counter, which advances on a skipped step; Adam's count in
        # opt_state does not (the guard below keeps the old opt_state).
        updates, opt_state = optax.with_extra_args_support(tx).update(grads, state.opt_state, params, step=state.step)
        model = eqx.apply_updates(state.model, updates)
        ema = None if state.ema is None else ema_update(state.ema, model, cfg.optim.model_ema_decay)
        grad_norm = optax.tree.norm(grads)
        # Non-finite guard: a step whose loss or gradient is not finite changes nothing but the
        # counters (the data and the step still advance, so a resumed run stays in lockstep).
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        model, opt_state, ema = guard_non_finite((model, opt_state, ema), (state.model, state.opt_state, state.ema), ok)
        acc1, acc5 = topk_correct(logits, t)
        metrics = {"loss": loss, "acc1": acc1.mean(), "acc5": acc5.mean(),
                   "lr": schedule(state.step), "grad_norm": grad_norm, "skipped": (~ok).astype(jnp.float32)}
        bad = (~ok).astype(jnp.int32)
        new = TrainState(model, opt_state, state.step + 1, ema, state.skipped + bad, (state.bad_streak + bad) * bad)
        metrics["bad_streak"] = new.bad_streak
        if state_shardings is not None:
            arrays, static = eqx.partition(new, eqx.is_array)
            new = eqx.combine(jax.lax.with_sharding_constraint(arrays, state_shardings), static)
        return new, metrics

    return eqx.filter_jit(step_fn, donate="all")  # state and batch are used once


@eqx.filter_jit
def eval_step(model: ViT, images: UInt8[Array, "b h w 3"], labels: Int[Array, " b"],
              mask: Bool[Array, " b"], criterion: str = "ce") -> dict[str, Float[Array, ""]]:
    """Sums over the unmasked samples of a (possibly padded) batch.

    The loss is the training criterion (static; `cfg.loss.criterion`) on plain one-hot
    targets, as deit3-jax's validation step: no label smoothing, no mixup."""
    model = eqx.nn.inference_mode(model)
    logits = model(augment.eval_transform(images))
    t = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    acc1, acc5 = topk_correct(logits, t)
    loss = criterion_loss(criterion, logits, t)
    m = mask.astype(jnp.float32)
    return {"acc1": (acc1 * m).sum(), "acc5": (acc5 * m).sum(), "loss": (loss * m).sum(), "num_samples": m.sum()}
