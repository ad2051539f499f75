"""Sharded training equals single-device training (8 fake CPU devices from conftest)."""

import dataclasses

import equinox as eqx
import jax
import numpy as np
import pytest

from deit import optim, sharding
from deit.config import from_flat
from deit.model import ViT
from deit.steps import make_train_step
from deit.steps import create_state

FLAGS = dict(layers=2, dim=64, heads=4, labels=10, patch_size=4, image_size=16, droppath=0.1, layerscale=True,
             train_batch_size=16, learning_rate=3e-4, warmup_steps=5, training_steps=20, random_crop="none",
             hflip=0.5, mixup=0.8, cutmix=1.0, label_smoothing=0.1, optimizer="adamw", clip_grad=1.0, adam_eps=1e-6)


def losses(cfg, mesh, steps=20):
    skeleton = eqx.filter_eval_shape(ViT, cfg.model, key=jax.random.key(0))
    opt = optim.build(cfg, skeleton)
    state, shardings = create_state(cfg, mesh, opt.tx)
    step = make_train_step(cfg, opt.tx, opt.schedule, shardings)
    # Learnable data (a smooth class-dependent pattern): pure noise would make Adam amplify
    # float rounding differences chaotically, hiding the equivalence this test checks.
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, 16)
    out = []
    for _ in range(steps):
        labels = rng.integers(0, 10, (16,), dtype=np.int32)
        freq = (labels[:, None, None] + 1) * np.pi
        images = 127 + 100 * np.sin(freq * grid[None, :, None] + freq * grid[None, None, :] / 2)
        images = (images[..., None] + rng.normal(0, 10, (16, 16, 16, 3))).clip(0, 255).astype(np.uint8)
        state, m = step(state, *sharding.shard_batch(mesh, images, labels))
        out.append(float(m["loss"]))
    return np.array(out), state


def test_fsdp_minus_one_puts_every_device_on_the_fsdp_axis():
    assert dict(sharding.make_mesh(-1).shape) == {"data": 1, "fsdp": len(jax.devices())}
    assert dict(sharding.make_mesh(2, jax.devices()[:4]).shape) == {"data": 2, "fsdp": 2}
    with pytest.raises(ValueError, match="fsdp=3 must divide the device count 8"):
        sharding.make_mesh(3)


def test_param_spec_rules():
    assert sharding.param_spec((1152, 384), 4) == jax.P("fsdp", None)
    assert sharding.param_spec((12, 1152, 384), 4, stacked=True) == jax.P(None, "fsdp", None)
    assert sharding.param_spec((384,), 4) == jax.P()  # small: replicated
    assert sharding.param_spec((1000, 70), 8) == jax.P("fsdp", None)
    assert sharding.param_spec((999, 70), 8) == jax.P()  # no divisible dim


# Drop path and flips: losses equal to 1e-5 over 20 steps. With Mixup/CutMix the targets are
# near-uniform, the loss surface flat and Adam amplifies the (sharded vs single) summation
# order of the matmuls; the first steps still agree to 1e-6, so RNG and mixing are the same.
@pytest.mark.parametrize("fsdp,variant,rtol", [(2, dict(mixup=0.0, cutmix=0.0), 1e-5),
                                               (4, dict(mixup=0.0, cutmix=0.0), 1e-5),
                                               (4, dict(droppath=0.0), 1e-4)])
def test_sharded_training_equals_single_device(fsdp, variant, rtol):
    cfg = from_flat({**FLAGS, **variant})
    ref, _ = losses(cfg, sharding.make_mesh(1, jax.devices()[:1]))
    got, state = losses(dataclasses.replace(cfg, fsdp=fsdp), sharding.make_mesh(fsdp, jax.devices()))
    np.testing.assert_allclose(got[:3], ref[:3], rtol=1e-6)
    np.testing.assert_allclose(got, ref, rtol=rtol)
    assert len(jax.devices()) == 8
    # Big parameters really are split over the fsdp axis, and the result stays sharded.
    qkv = state.model.blocks.attn.qkv.weight
    assert tuple(qkv.sharding.spec)[:2] == (None, "fsdp")  # layers axis never sharded
    assert len(qkv.addressable_shards) == 8 and qkv.addressable_shards[0].data.shape[1] == 192 // fsdp


def test_grad_accum_equals_full_batch():
    cfg = from_flat({**FLAGS, "mixup": 0.0, "cutmix": 0.0, "droppath": 0.0, "hflip": 0.0})
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    ref, _ = losses(cfg, mesh, steps=5)
    got, _ = losses(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum=4)), mesh, steps=5)
    np.testing.assert_allclose(got, ref, rtol=2e-5)
