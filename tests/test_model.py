import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import timm
from beartype.roar import BeartypeCallHintParamViolation
from jaxtyping import TypeCheckError

import deit
from deit.config import ModelConfig
from deit.layers import Attention, Block, DropPath, LayerNorm, LayerScale, Linear, Mlp, PatchEmbed
from deit.model import ViT, count_params, forward_flops, init_model, preset, sincos2d

KEY = jax.random.key(0)
SHAPE_ERRORS = (TypeCheckError, BeartypeCallHintParamViolation)


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(layers=3, dim=32, heads=4, labels=10, patch_size=4, image_size=16), **kw})


def test_layers_shapes_and_checks():
    x = jax.random.normal(KEY, (2, 5, 8))
    assert Linear(8, 6, key=KEY)(x).shape == (2, 5, 6)
    assert LayerNorm(8)(x).shape == (2, 5, 8)
    assert LayerScale(8, 1e-4)(x).shape == (2, 5, 8)
    assert Attention(8, 2, key=KEY)(x).shape == (2, 5, 8)
    assert Attention(8, 2, key=KEY).attention_weights(x).shape == (2, 2, 5, 5)
    assert Mlp(8, 32, key=KEY)(x).shape == (2, 5, 8)
    assert Block(8, 2, layerscale=1e-4, key=KEY)(x).shape == (2, 5, 8)
    assert PatchEmbed(4, 8, key=KEY)(jnp.zeros((2, 16, 16, 3))).shape == (2, 16, 8)
    # jaxtyping + beartype reject wrong shapes at the call.
    with pytest.raises(SHAPE_ERRORS):
        Attention(8, 2, key=KEY)(jnp.zeros((5, 8)))  # missing batch axis
    with pytest.raises(SHAPE_ERRORS):
        PatchEmbed(4, 8, key=KEY)(jnp.zeros((2, 16, 16, 4)))


def test_layernorm_matches_torch():
    x = np.random.default_rng(0).normal(size=(3, 7, 16)).astype(np.float32)
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (16,), eps=1e-6).numpy()
    np.testing.assert_allclose(np.asarray(LayerNorm(16)(jnp.asarray(x))), ref, atol=1e-5)


def test_patch_embed_equals_convolution():
    pe = PatchEmbed(4, 8, key=KEY)
    x = np.random.default_rng(0).normal(size=(2, 16, 12, 3)).astype(np.float32)
    conv = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor(np.asarray(pe.weight)),
                                      torch.tensor(np.asarray(pe.bias)), stride=4)
    ref = conv.flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(pe(jnp.asarray(x))), ref, atol=1e-4)


def test_drop_path_per_sample_and_unbiased():
    dp = DropPath(0.3)
    x = jnp.ones((20000, 3, 4))
    y = dp(x, key=KEY)
    per_sample = y.reshape(20000, -1)
    # Whole branch dropped or kept per sample: rows are constant, either 0 or 1/keep.
    assert bool(jnp.all(per_sample == per_sample[:, :1]))
    np.testing.assert_allclose(np.unique(np.asarray(per_sample)), [0.0, 1 / 0.7], rtol=1e-6)
    kept = float((per_sample[:, 0] > 0).mean())
    assert abs(kept - 0.7) < 0.015
    assert abs(float(y.mean()) - 1.0) < 0.03  # expectation preserved
    # Different samples are dropped independently of each other, and eval is the identity.
    assert 0 < kept < 1
    assert bool(jnp.all(eqx.nn.inference_mode(dp)(x, key=KEY) == x))
    with pytest.raises(ValueError, match="key"):
        dp(x, key=None)


def test_sincos2d_table():
    """deit3-jax's order: the first dim/2 channels encode the column (x), the last dim/2 the row."""
    dim, rows, cols = 16, 3, 5
    t = np.asarray(sincos2d((rows, cols), dim))
    assert t.shape == (15, 16)
    omega = 1.0 / 10000 ** np.linspace(0, 1, dim // 4)
    for i in range(rows):
        for j in range(cols):
            row = t[i * cols + j]
            np.testing.assert_allclose(row, np.concatenate([np.sin(j * omega), np.cos(j * omega),
                                                            np.sin(i * omega), np.cos(i * omega)]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(sincos2d(4, dim)), np.asarray(sincos2d((4, 4), dim)))


def test_sincos2d_model_predicts_at_any_size_learnable_names_both_sizes():
    sin = init_model(small(posemb="sincos2d", pooling="gap"))
    for h, w in ((16, 16), (24, 8), (32, 32)):
        out = deit.predict(sin, np.zeros((2, h, w, 3), np.uint8))
        assert out.shape == (2, sin.cfg.labels) and bool(jnp.all(jnp.isfinite(out)))
    learn = init_model(small())
    with pytest.raises(ValueError, match=r"image size 24x24 does not match this model's image_size=16"):
        deit.predict(learn, np.zeros((1, 24, 24, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image size 18x16 is not divisible by patch_size=4"):
        deit.predict(sin, np.zeros((1, 18, 16, 3), np.uint8))


def test_blocks_are_distinct_and_stacked():
    m = init_model(small())
    w = m.blocks.attn.qkv.weight
    assert w.shape == (3, 96, 32)
    assert not np.allclose(w[0], w[1])


def test_scan_equals_unrolled_loop():
    m = eqx.nn.inference_mode(init_model(small(layerscale=True, layerscale_init=0.5)))
    x = jax.random.normal(KEY, (2, 16, 16, 3))
    params, static = eqx.partition(m.blocks, eqx.is_array)
    h = m.embed(x)
    for i in range(m.cfg.layers):
        h = eqx.combine(jax.tree.map(lambda a: a[i], params), static)(h)
    ref = m.head(m.pool(m.norm(h)))
    np.testing.assert_allclose(np.asarray(m(x)), np.asarray(ref), atol=1e-5)
    # Rematerialised blocks compute the same function.
    ckpt = eqx.nn.inference_mode(m.with_options(grad_ckpt=True))
    assert ckpt.cfg.grad_ckpt
    np.testing.assert_allclose(np.asarray(ckpt(x)), np.asarray(ref), atol=1e-5)
    # So do partly (2 of 3: a remainder iteration) and fully unrolled scans.
    for unroll in (2, 3, -1):  # -1: all blocks
        np.testing.assert_allclose(np.asarray(m.with_options(scan_unroll=unroll)(x)), np.asarray(ref), atol=1e-5)


def test_unrolled_scan_trains_the_same():
    """Gradients with drop path (per-block keys) match between the scanned and unrolled model."""
    m = init_model(small(droppath=0.2))
    x, y = jax.random.normal(KEY, (4, 16, 16, 3)), jnp.arange(4)

    def grads(model):
        loss = lambda mm: optax.softmax_cross_entropy_with_integer_labels(mm(x, key=KEY), y).mean()
        return eqx.filter_grad(loss)(model)

    ref = jax.tree.leaves(grads(m))
    for a, b in zip(ref, jax.tree.leaves(grads(m.with_options(scan_unroll=3))), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"scan_unroll=4: allowed -1 \(all blocks\) or 1..layers=3"):
        small(scan_unroll=4)
    with pytest.raises(ValueError, match="scan_unroll=0: allowed"):
        small(scan_unroll=0)


@pytest.mark.parametrize("kw", [dict(), dict(pooling="gap"), dict(posemb="sincos2d"), dict(distilled=True),
                                dict(labels=0), dict(gelu="tanh", layerscale=True), dict(dropout=0.1, droppath=0.1)])
def test_model_variants(kw):
    cfg = small(**kw)
    m = init_model(cfg)
    x = jax.random.normal(KEY, (2, 16, 16, 3))
    out = m(x, key=KEY)
    if cfg.labels == 0:
        assert out.shape == (2, 16 + cfg.num_prefix_tokens, 32)
    else:
        assert out.shape == (2, 10)
    # Training mode is stochastic only when dropout/droppath is on; eval is deterministic.
    ev = eqx.nn.inference_mode(m)
    np.testing.assert_array_equal(np.asarray(ev(x)), np.asarray(ev(x)))
    assert bool(jnp.all(jnp.isfinite(out)))


def test_distilled_mean_of_heads():
    m = eqx.nn.inference_mode(init_model(small(distilled=True)))
    x = jax.random.normal(KEY, (2, 16, 16, 3))
    a, b = m.forward_heads(x)
    np.testing.assert_allclose(np.asarray(m(x)), np.asarray((a + b) / 2), atol=1e-6)


@pytest.mark.parametrize("name,timm_name", [("s16", "deit3_small_patch16_224"), ("b16", "deit3_base_patch16_224"),
                                            ("l16", "deit3_large_patch16_224"), ("h14", "deit3_huge_patch14_224")])
def test_param_counts_equal_timm(name, timm_name):
    with torch.device("meta"):
        ref = sum(p.numel() for p in timm.create_model(timm_name).parameters())
    assert count_params(preset(name, layerscale=True)) == ref


def test_ti16_param_count_equals_timm_deit_tiny():
    # timm's deit_tiny has a cls position (one extra D vector) and no LayerScale.
    with torch.device("meta"):
        ref = sum(p.numel() for p in timm.create_model("deit_tiny_patch16_224").parameters())
    assert count_params(preset("ti16")) + 192 == ref


def test_forward_flops_matches_xla_cost_analysis():
    # One block: XLA's cost analysis counts a scan (while-loop) body once, not per iteration.
    cfg = small(layers=1, dim=128, image_size=32)
    m = eqx.nn.inference_mode(init_model(cfg))
    x = jnp.zeros((1, 32, 32, 3))
    params, static = eqx.partition(m, eqx.is_array)
    cost = jax.jit(lambda p, x: eqx.combine(p, static)(x)).lower(params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA also counts the element-wise work (norms, softmax, GELU); the matmuls dominate.
    assert 0.85 < forward_flops(cfg) / cost["flops"] <= 1.0


def test_predict_uint8_and_rejects_float():
    m = init_model(small())
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    assert deit.predict(m, images).shape == (3, 10)
    with pytest.raises((ValueError,) + SHAPE_ERRORS):
        deit.predict(m, images.astype(np.float32))


def test_bad_model_config_errors_name_the_value():
    with pytest.raises(ValueError, match="image_size=30 is not divisible by patch_size=16"):
        ModelConfig(image_size=30)
    with pytest.raises(ValueError, match="dim=100 is not divisible by heads=12"):
        ModelConfig(dim=100)


def test_dot_product_attention_path_agrees_with_ours(monkeypatch):
    """The path GPUs take (jax.nn.dot_product_attention; cuDNN there, forced to "xla" here)
    equals our einsum path, forward and gradient; on CPU the einsum path is chosen."""
    import equinox as eqx

    from deit import layers

    assert layers.fused_attention(jnp.bfloat16) is None and layers.fused_attention(jnp.float32) is None  # CPU
    attn = layers.Attention(64, 4, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 17, 64))

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x)))

    ref_out, ref_grads = attn(x), eqx.filter_grad(loss)(attn, x)
    monkeypatch.setattr(layers, "fused_attention", lambda dtype: "xla")
    out, grads = attn(x), eqx.filter_grad(loss)(attn, x)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # with attention dropout active, the probabilities are dropped on our path, fused or not
    drop = eqx.tree_at(lambda m: m.attn_drop, attn, layers.Dropout(0.5))
    np.testing.assert_allclose(drop(x, key=jax.random.key(2)), drop(x, key=jax.random.key(2)))
    assert not np.allclose(drop(x, key=jax.random.key(2)), out)


@pytest.mark.parametrize("grad_ckpt, widths", [(False, [32, 32, 32, 96, 128]), (True, [32])])
def test_layer_scan_saves_only_the_named_residuals(capsys, grad_ckpt, widths):
    """What the layer scan stacks for the backward, per block: the block input, qkv (3D), the
    attention output, the mid-block residual and fc1's output (4D) (layers.SAVED_RESIDUALS), and
    nothing of LayerNorm, GELU or softmax; with grad_ckpt only the block input. Every stacked
    value costs layers x batch x tokens x width of device memory (issue 16's TPU figures)."""
    cfg = ModelConfig(layers=2, dim=32, heads=2, patch_size=8, image_size=32, labels=10, droppath=0.1,
                      grad_ckpt=grad_ckpt)
    params, static = eqx.partition(ViT(cfg, key=jax.random.key(0)), eqx.is_array)
    jax.ad_checkpoint.print_saved_residuals(
        lambda p, x: eqx.combine(p, static)(x, key=jax.random.key(1)).sum(), params, jnp.ones((3, 32, 32, 3)))
    stacked = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "output of scan" in line]
    # [layers, batch, tokens, width] float32 stacks (printed f32[...] or float32[...]): 16 patches + cls
    shapes = [re.fullmatch(r"(?:f32|float32)\[2,3,17,(\d+)\]", s) for s in stacked]
    assert all(shapes), stacked
    assert sorted(int(m.group(1)) for m in shapes) == widths, stacked
