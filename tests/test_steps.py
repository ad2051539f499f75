"""Losses, metrics, EMA, distillation and bf16 in the train step."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

import deit
from deit import optim, sharding, steps
from deit.config import OptimConfig, from_flat
from deit.model import ViT, init_model
from deit.steps import criterion_loss, distillation_loss, ema_update, eval_step, make_train_step, topk_correct
from deit.steps import create_state

RNG = np.random.default_rng(0)
FLAGS = dict(layers=2, dim=32, heads=4, labels=10, patch_size=4, image_size=16, train_batch_size=8,
             learning_rate=1e-3, warmup_steps=2, training_steps=10, random_crop="none", hflip=0.0)


def test_soft_and_hard_distillation_match_deit_formula():
    s = RNG.normal(size=(4, 7)).astype(np.float32)
    t = RNG.normal(size=(4, 7)).astype(np.float32)
    for tau in (1.0, 3.0):
        ref = F.kl_div(F.log_softmax(torch.tensor(s) / tau, 1), F.log_softmax(torch.tensor(t) / tau, 1),
                       reduction="sum", log_target=True) * tau * tau / s.size
        np.testing.assert_allclose(float(distillation_loss("soft", jnp.asarray(s), jnp.asarray(t), tau)), float(ref),
                                   rtol=1e-5)
    ref = F.cross_entropy(torch.tensor(s), torch.tensor(t).argmax(1))
    np.testing.assert_allclose(float(distillation_loss("hard", jnp.asarray(s), jnp.asarray(t), 1.0)), float(ref),
                               rtol=1e-5)


def test_criteria_and_topk():
    logits = jnp.asarray(RNG.normal(size=(3, 6)), jnp.float32)
    t = jax.nn.one_hot(jnp.array([1, 2, 3]), 6) * 0.7 + jax.nn.one_hot(jnp.array([4, 4, 4]), 6) * 0.3
    ref_ce = F.cross_entropy(torch.tensor(np.asarray(logits)), torch.tensor(np.asarray(t)), reduction="none")
    np.testing.assert_allclose(np.asarray(criterion_loss("ce", logits, t)), ref_ce.numpy(), rtol=1e-5)
    # bce: binary targets t > 0 (both mixed classes are positives), mean over classes (deit3-jax).
    ref_bce = F.binary_cross_entropy_with_logits(torch.tensor(np.asarray(logits)), torch.tensor(np.asarray(t > 0), dtype=torch.float32),
                                                 reduction="none").mean(1)
    np.testing.assert_allclose(np.asarray(criterion_loss("bce", logits, t)), ref_bce.numpy(), rtol=1e-5)
    acc1, acc5 = topk_correct(jnp.array([[0.0, 3, 2, 1, 0, 0]]), jax.nn.one_hot(jnp.array([2]), 6))
    assert float(acc1[0]) == 0.0 and float(acc5[0]) == 1.0


def test_ema_update():
    a, b = init_model(from_flat(FLAGS).model, 0), init_model(from_flat(FLAGS).model, 1)
    e = ema_update(a, b, 0.9)
    np.testing.assert_allclose(np.asarray(e.head.weight), 0.9 * np.asarray(a.head.weight) + 0.1 * np.asarray(b.head.weight),
                               rtol=1e-6)


def run_steps(cfg, steps=3, teacher=None):
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    opt = optim.build(cfg, eqx.filter_eval_shape(ViT, cfg.model, key=jax.random.key(0)))
    state, sh = create_state(cfg, mesh, opt.tx)
    step = make_train_step(cfg, opt.tx, opt.schedule, sh)
    out = []
    for i in range(steps):
        images = np.random.default_rng(i).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
        labels = np.arange(8, dtype=np.int32) % 10
        state, m = step(state, *sharding.shard_batch(mesh, images, labels), teacher)
        out.append(float(m["loss"]))
    return state, np.array(out)


def test_ema_tracks_the_model_in_training():
    cfg = from_flat({**FLAGS, "model_ema": True, "model_ema_decay": 0.5})
    state, _ = run_steps(cfg, steps=1)
    init = init_model(cfg.model, cfg.init_seed)
    # After one step: ema = 0.5 * init + 0.5 * model.
    np.testing.assert_allclose(np.asarray(state.ema.head.weight),
                               0.5 * np.asarray(init.head.weight) + 0.5 * np.asarray(state.model.head.weight), atol=1e-6)


def test_bf16_compute_close_to_f32_with_f32_params():
    cfg = from_flat(FLAGS)
    s32, l32 = run_steps(cfg)
    s16, l16 = run_steps(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, compute_dtype="bfloat16")))
    assert s16.model.head.weight.dtype == jnp.float32  # parameters stay f32
    np.testing.assert_allclose(l16, l32, rtol=3e-2)
    assert not np.allclose(l16, l32, rtol=1e-6)  # it really ran in bf16


def test_distillation_step_uses_teacher():
    cfg = from_flat({**FLAGS, "distilled": True, "distillation_type": "hard"})
    teacher = init_model(from_flat(FLAGS).model, 7)
    _, with_teacher = run_steps(cfg, teacher=teacher)
    _, other_teacher = run_steps(cfg, teacher=init_model(from_flat(FLAGS).model, 8))
    assert np.all(np.isfinite(with_teacher)) and not np.allclose(with_teacher, other_teacher)


def test_scale_lr_rule():
    base = OptimConfig(learning_rate=5e-4, warmup_steps=0, training_steps=10)
    assert np.isclose(float(optim.schedule(base, 1024)(0)), 5e-4)
    assert np.isclose(float(optim.schedule(dataclasses.replace(base, scale_lr=True), 1024)(0)), 1e-3)


def test_lr_after_a_skipped_step_follows_the_step_counter(monkeypatch):
    # A label of -1 (an all-zero target row) makes the loss NaN: that step is skipped.
    base = steps.criterion_loss
    monkeypatch.setattr(steps, "criterion_loss",
                        lambda c, logits, t: jnp.where(t.sum(-1) > 0, base(c, logits, t), jnp.nan))
    cfg = from_flat({**FLAGS, "warmup_steps": 10, "training_steps": 20})  # lr(3) / lr(2) ~ 1.5
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    opt = optim.build(cfg, eqx.filter_eval_shape(ViT, cfg.model, key=jax.random.key(0)))
    step = make_train_step(cfg, opt.tx, opt.schedule, None)
    images = [np.random.default_rng(i).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8) for i in range(3)]
    good, bad = np.arange(8, dtype=np.int32) % 10, np.full(8, -1, np.int32)

    def run(batches):
        state, _ = create_state(cfg, mesh, opt.tx)
        params = []
        for x, y in batches:
            state, m = step(state, jnp.asarray(x), jnp.asarray(y))
            params.append([np.asarray(a) for a in jax.tree.leaves(eqx.filter(state.model, eqx.is_array))])
        return state, m, params

    # A: two good steps, a skipped one, a good one at step 3. B: the same good steps, at steps 0, 1, 2.
    state_a, m_a, p_a = run([(images[0], good), (images[1], good), (images[1], bad), (images[2], good)])
    _, _, p_b = run([(images[0], good), (images[1], good), (images[2], good)])
    assert int(state_a.skipped) == 1 and int(state_a.step) == 4
    for a, b in zip(p_a[2], p_a[1]):
        np.testing.assert_array_equal(a, b)  # the skipped step changed nothing
    adam = next(s for s in state_a.opt_state if isinstance(s, optax.ScaleByAdamState))
    assert int(adam.count) == 3  # Adam's count and bias correction skip the bad step...
    # ... so A's last update is B's (same moments, count and params), scaled by lr(3) / lr(2).
    ratio = float(opt.schedule(3)) / float(opt.schedule(2))
    assert ratio > 1.3 and np.isclose(float(m_a["lr"]), float(opt.schedule(3)))
    for a3, a1, b2, b1 in zip(p_a[3], p_a[1], p_b[2], p_b[1]):
        # Per tensor, to 1% of the update: a few float32 ulps of the weights (norm scales ~1).
        want = ratio * (b2 - b1)
        assert np.abs((a3 - a1) - want).max() <= 1e-2 * np.abs(want).max()


@pytest.mark.parametrize("criterion", ["ce", "bce"])
def test_eval_loss_is_the_training_criterion_without_smoothing(criterion):
    # deit3-jax validates with its training module at det=True: its criterion on plain one-hot
    # targets (label smoothing and mixup are training-only).
    model = init_model(from_flat(FLAGS).model, 3)
    images = RNG.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    labels = np.array([0, 3, 9, 2, 2, 5], np.int32)
    mask = np.array([1, 1, 1, 1, 1, 0], bool)  # the last sample is padding
    sums = eval_step(model, jnp.asarray(images), jnp.asarray(labels), jnp.asarray(mask), criterion=criterion)
    logits = torch.tensor(np.asarray(deit.predict(model, images)), dtype=torch.float64)
    onehot = F.one_hot(torch.tensor(labels, dtype=torch.long), 10).double()
    if criterion == "ce":
        ref = F.cross_entropy(logits, onehot, reduction="none")
    else:
        ref = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").mean(1)
    np.testing.assert_allclose(float(sums["loss"]), float(ref[:5].sum()), rtol=1e-5)
    assert float(sums["num_samples"]) == 5



def linear_grad_fn():
    """A linear model's mean squared error (and its outputs as logits) with its gradient, shaped
    like the step's grad_fn: (model, key, *batch parts)."""
    def loss_fn(model, key, x, t):
        logits = jax.vmap(model)(x)
        return ((logits - t) ** 2).mean(), logits

    return eqx.filter_value_and_grad(loss_fn, has_aux=True)


def test_accumulate_grads_averages_micro_batches():
    model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    grad_fn, key = linear_grad_fn(), jax.random.key(1)
    (ref_loss, ref_logits), ref = grad_fn(model, key, x, t)
    (loss1, _), _ = steps.accumulate_grads(grad_fn, model, (x, t), key, 1)
    assert float(loss1) == float(ref_loss)  # accum=1: one plain call
    (loss4, logits4), g4 = steps.accumulate_grads(grad_fn, model, (x, t), key, 4)
    # Equal micro-batches: the mean of their mean losses and gradients is the full batch's.
    np.testing.assert_allclose(float(loss4), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits4), np.asarray(ref_logits), rtol=1e-5, atol=1e-6)  # batch order
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_accumulate_grads_keys_and_absent_parts():
    """Micro-batch i draws split(key, accum)[i] (accum=1: the key itself); a None part stays None."""
    def loss_fn(w, key, x, extra):
        assert extra is None
        return jax.random.normal(key, ()) + 0 * w.sum() + 0 * x.sum(), jnp.zeros((x.shape[0], 1))

    grad_fn, key, w = eqx.filter_value_and_grad(loss_fn, has_aux=True), jax.random.key(3), jnp.ones(2)
    x = jnp.zeros((6, 1))
    (loss, _), _ = steps.accumulate_grads(grad_fn, w, (x, None), key, 3)
    np.testing.assert_allclose(float(loss), float(jax.vmap(lambda k: jax.random.normal(k, ()))(
        jax.random.split(key, 3)).mean()), rtol=1e-6)
    (loss, _), _ = steps.accumulate_grads(grad_fn, w, (x, None), key, 1)
    assert float(loss) == float(jax.random.normal(key, ()))


def test_guard_non_finite_keeps_the_old_arrays_on_a_bad_step():
    new = (jnp.array([1.0, 2.0]), "static-new", None)
    old = (jnp.array([5.0, 6.0]), "static-old", None)
    kept = steps.guard_non_finite(new, old, jnp.array(False))
    taken = steps.guard_non_finite(new, old, jnp.array(True))
    np.testing.assert_array_equal(np.asarray(kept[0]), [5.0, 6.0])
    np.testing.assert_array_equal(np.asarray(taken[0]), [1.0, 2.0])
    assert kept[1] == taken[1] == "static-new" and kept[2] is None  # non-array leaves come from `new`
