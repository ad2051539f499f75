import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deit import optim
from deit.config import ModelConfig, OptimConfig
from deit.model import init_model

CFG = ModelConfig(layers=3, dim=16, heads=2, labels=5, patch_size=4, image_size=8, layerscale=True)


def leaves_by_name(tree):
    tree = eqx.filter(tree, lambda x: not isinstance(x, (str, type(None))) and not callable(x))
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_decay_mask_only_kernels():
    mask = leaves_by_name(optim.decay_mask(init_model(CFG)))
    decayed = sorted(k for k, v in mask.items() if v)
    assert decayed == sorted([".patch_embed.weight", ".blocks.attn.qkv.weight", ".blocks.attn.proj.weight",
                              ".blocks.mlp.fc1.weight", ".blocks.mlp.fc2.weight", ".head.weight"])


def test_layer_decay_scales():
    model = init_model(CFG)
    s = leaves_by_name(optim.layer_scales(model, 0.5))
    assert float(s[".pos_embed"]) == 0.5**3 and float(s[".cls_token"]) == 0.5**3
    assert float(s[".patch_embed.weight"]) == 0.5**3
    np.testing.assert_allclose(np.asarray(s[".blocks.attn.qkv.weight"]).ravel(), [0.25, 0.5, 1.0])
    assert float(s[".head.weight"]) == 1.0 and float(s[".norm.weight"]) == 1.0


def test_schedule_warmup_cosine():
    sched = optim.schedule(OptimConfig(learning_rate=1e-3, warmup_steps=10, training_steps=110))
    assert np.isclose(float(sched(0)), 1e-6)
    assert np.isclose(float(sched(10)), 1e-3)
    assert np.isclose(float(sched(60)), (1e-3 + 1e-5) / 2, rtol=1e-4)
    assert np.isclose(float(sched(110)), 1e-5)


def test_trust_groups_split_only_fused_qkv():
    groups = leaves_by_name(optim.trust_groups(init_model(CFG)))
    assert {k for k, g in groups.items() if g != 1} == {".blocks.attn.qkv.weight"}
    assert groups[".blocks.attn.qkv.weight"] == 3


def qkv_groups(names):
    """deit3-jax's q, k, v kernels: three row blocks of our fused qkv weight."""
    return {k: 3 if k == ".blocks.attn.qkv.weight" else 1 for k in names}


def reference(params, grads, mask, stacked, groups, scales, steps, cfg: OptimConfig, lr_fn, trust: bool):
    """Hand-written AdamW / LAMB (deit3-jax variant) in numpy. The trust ratio is per tensor as
    deit3-jax holds them: per block slice of stacked leaves, and q, k, v (row blocks of the fused
    qkv weight) as three tensors."""
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t in range(1, steps + 1):
        lr = float(lr_fn(t - 1))
        for k in p:
            g = np.asarray(grads[k], np.float64)
            m[k] = cfg.adam_b1 * m[k] + (1 - cfg.adam_b1) * g
            v2[k] = cfg.adam_b2 * v2[k] + (1 - cfg.adam_b2) * g * g
            u = (m[k] / (1 - cfg.adam_b1**t)) / (np.sqrt(v2[k] / (1 - cfg.adam_b2**t)) + cfg.adam_eps)
            if mask[k]:
                u = u + cfg.weight_decay * p[k]
            if mask[k] and trust:
                for i in range(u.shape[0]) if stacked[k] else [None]:
                    lead = () if i is None else (i,)
                    rows = u[lead].shape[0] // groups[k]
                    for j in range(groups[k]):
                        blk = (*lead, slice(j * rows, (j + 1) * rows))
                        pn, un = np.linalg.norm(p[k][blk]), np.linalg.norm(u[blk])
                        u[blk] = u[blk] * (pn / un if pn > 0 and un > 0 else 1.0)
            p[k] = p[k] - lr * u * np.asarray(scales[k], np.float64)
    return p


@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
def test_optimizer_against_reference(optimizer):
    model = init_model(CFG)
    # q, k and v blocks of very different norms: one fused ratio would move them by ~2x.
    w = model.blocks.attn.qkv.weight
    model = eqx.tree_at(lambda m: m.blocks.attn.qkv.weight, model,
                        w * jnp.repeat(jnp.array([1.0, 3.0, 0.3]), CFG.dim)[None, :, None])
    cfg = OptimConfig(optimizer=optimizer, learning_rate=1e-2, weight_decay=0.1, warmup_steps=2, training_steps=10,
                      lr_decay=0.7, adam_eps=1e-6)
    tx = optim.make_optimizer(cfg, model)
    params = eqx.filter(model, eqx.is_array)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
    state = tx.init(params)
    for i in range(3):
        updates, state = tx.update(grads, state, params, step=jnp.asarray(i))
        params = eqx.apply_updates(params, updates)
    names = leaves_by_name(params)
    ref = reference(leaves_by_name(eqx.filter(model, eqx.is_array)), leaves_by_name(grads),
                    leaves_by_name(optim.decay_mask(model)), leaves_by_name(optim.stacked_mask(model)),
                    qkv_groups(names), leaves_by_name(optim.layer_scales(model, 0.7)), 3, cfg,
                    optim.schedule(cfg), optimizer == "lamb")
    for k, v in names.items():
        np.testing.assert_allclose(np.asarray(v), ref[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_lr_is_read_at_the_given_step():
    # The lr comes from `step`, not from the count in the optimiser state (which a skipped
    # step holds back); without `step`, from that count, as optax.
    model = init_model(CFG)
    cfg = OptimConfig(learning_rate=1e-2, weight_decay=0.0, warmup_steps=10, training_steps=20)
    tx, sched = optim.make_optimizer(cfg, model), optim.schedule(cfg)
    params = eqx.filter(model, eqx.is_array)
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    u_count, _ = tx.update(grads, state, params)
    u_step, new = tx.update(grads, state, params, step=jnp.asarray(7))
    ratio = np.asarray(u_step.head.weight) / np.asarray(u_count.head.weight)
    np.testing.assert_allclose(ratio, float(sched(7)) / float(sched(0)), rtol=1e-5)
    adam = next(s for s in new if isinstance(s, optax.ScaleByAdamState))
    assert int(adam.count) == 1  # Adam's count: updates applied, whatever the step


def test_clip_grad():
    model = init_model(CFG)
    cfg = OptimConfig(clip_grad=1.0, learning_rate=1.0, warmup_steps=0)
    tx = optim.make_optimizer(dataclasses.replace(cfg), model)
    params = eqx.filter(model, eqx.is_array)
    big = jax.tree.map(lambda x: 1e3 * jnp.ones_like(x), params)
    small = jax.tree.map(lambda x: x / 1e3, big)
    u_big, _ = tx.update(big, tx.init(params), params)
    u_small, _ = tx.update(small, tx.init(params), params)
    # Adam normalises magnitudes; clipping must not change the direction either.
    for a, b in zip(jax.tree.leaves(u_big), jax.tree.leaves(u_small)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
