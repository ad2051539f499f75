"""Losses, metrics, EMA, distillation and bf16 in the train step."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from deit import optim, sharding
from deit.config import OptimConfig, from_flat
from deit.model import ViT, init_model
from deit.steps import criterion_loss, distillation_loss, ema_update, make_train_step, topk_correct
from deit.trainer import create_state

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
