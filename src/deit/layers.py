"""ViT building blocks on batched, channels-last arrays.

Weights keep PyTorch/timm layouts (`Linear.weight` is [out, in], the patch projection is
[D, 3, P, P]) so that converting to and from timm is a rename, never a transpose puzzle.
Every layer works on the whole batch at once: the attention matmuls run in the
[B, heads, tokens, head_dim] layout, which XLA:CPU executes several times faster than
the per-example (vmapped) layout.
"""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, PRNGKeyArray

# The values of a block kept for its backward pass (`jax.checkpoint_name`s below); everything
# else (LayerNorms, GELU, softmax, layer scale, drop-path) is recomputed from them in the
# backward. Under `lax.scan` every value the backward reads is written out, stacked over the
# blocks, in its own dtype, so what is saved is chosen here rather than left to the compiler.
SAVED_RESIDUALS = ("qkv", "attn_out", "x_mid", "fc1")


def trunc_normal(key: PRNGKeyArray, shape: tuple[int, ...], std: float = 0.02) -> Array:
    """Normal(0, std) truncated at two standard deviations (timm and flax's ViT init)."""
    return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


def gelu(x: Array, approximate: bool) -> Array:
    return jax.nn.gelu(x, approximate=True) if approximate else gelu_exact(x)


@jax.custom_vjp
def gelu_exact(x: Array) -> Array:
    """erf GELU whose backward keeps only its input: autodiff of jax.nn.gelu saves erf and
    exp terms of the [B, T, 4D] hidden layer too (two more activation-sized stacks per block
    under the layer scan; about 4% of a ViT-S/16 CPU train step).

    Written with erf, as PyTorch's GELU, rather than jax.nn.gelu's erfc: erf is a cheap
    rational polynomial in XLA, erfc needs an exp (the forward runs ~25% faster on CPU)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def _gelu_exact_fwd(x: Array) -> tuple[Array, Array]:
    return gelu_exact(x), x


def _gelu_exact_bwd(x: Array, g: Array) -> tuple[Array]:
    cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return ((g * (cdf + x * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_exact_fwd, _gelu_exact_bwd)


class Linear(eqx.Module):
    """`y = x @ W.T + b` over the last axis of any batched input."""

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"]

    def __init__(self, in_features: int, out_features: int, *, key: PRNGKeyArray):
        self.weight = trunc_normal(key, (out_features, in_features))
        self.bias = jnp.zeros((out_features,), jnp.float32)

    def __call__(self, x: Float[Array, "*b in"]) -> Float[Array, "*b out"]:
        # One 2-D matmul over the flattened leading axes: an einsum keeping [B, T] as two
        # free dims of the dot makes XLA:CPU add activation-sized transposes around the
        # backward's weight-gradient dots (ViT-S/16 CPU grad step ~7% slower).
        w = self.weight.astype(x.dtype)
        y = x.reshape(-1, x.shape[-1]) @ w.T + self.bias.astype(x.dtype)
        return y.reshape(*x.shape[:-1], w.shape[0])


class LayerNorm(eqx.Module):
    """LayerNorm over the last axis, eps 1e-6 as in timm's ViT and flax; statistics in f32."""

    weight: Float[Array, " d"]
    bias: Float[Array, " d"]
    eps: float = eqx.field(static=True, default=1e-6)

    def __init__(self, dim: int, eps: float = 1e-6):
        self.weight = jnp.ones((dim,), jnp.float32)
        self.bias = jnp.zeros((dim,), jnp.float32)
        self.eps = eps

    def __call__(self, x: Float[Array, "*b d"]) -> Float[Array, "*b d"]:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.weight + self.bias
        return y.astype(x.dtype)


class PatchEmbed(eqx.Module):
    """Non-overlapping P x P patches projected to D: a stride-P convolution as one matmul."""

    weight: Float[Array, "d 3 p p"]
    bias: Float[Array, " d"]
    patch_size: int = eqx.field(static=True)

    def __init__(self, patch_size: int, dim: int, *, key: PRNGKeyArray):
        self.weight = trunc_normal(key, (dim, 3, patch_size, patch_size))
        self.bias = jnp.zeros((dim,), jnp.float32)
        self.patch_size = patch_size

    def __call__(self, x: Float[Array, "b h w 3"]) -> Float[Array, "b n d"]:
        b, h, w, c = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size={p}")
        # [B, h, P, w, P, C] -> [B, h, w, C, P, P]: the (C, P, P) order of the weight.
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
        x = x.reshape(b, (h // p) * (w // p), c * p * p)
        w_ = self.weight.reshape(self.weight.shape[0], -1).astype(x.dtype)
        return jnp.einsum("bni,di->bnd", x, w_) + self.bias.astype(x.dtype)


class Dropout(eqx.Module):
    """Element-wise dropout, scaled by 1/keep; off in inference mode or when `p == 0`."""

    p: float = eqx.field(static=True)
    inference: bool = False

    def __call__(self, x: Array, *, key: PRNGKeyArray | None) -> Array:
        if self.inference or self.p == 0.0:
            return x
        if key is None:
            raise ValueError("Dropout needs a `key` in training mode (use eqx.nn.inference_mode for eval)")
        keep = jax.random.bernoulli(key, 1.0 - self.p, x.shape)
        return jnp.where(keep, x / (1.0 - self.p), 0).astype(x.dtype)


class DropPath(eqx.Module):
    """Stochastic depth: drops a whole residual branch per sample, scaled by 1/keep."""

    p: float = eqx.field(static=True)
    inference: bool = False

    def __call__(self, x: Float[Array, "b *rest"], *, key: PRNGKeyArray | None) -> Float[Array, "b *rest"]:
        if self.inference or self.p == 0.0:
            return x
        if key is None:
            raise ValueError("DropPath needs a `key` in training mode (use eqx.nn.inference_mode for eval)")
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = jax.random.bernoulli(key, 1.0 - self.p, shape)
        return jnp.where(keep, x / (1.0 - self.p), 0).astype(x.dtype)


class LayerScale(eqx.Module):
    """Per-channel learnable scale of a residual branch (CaiT / DeiT-III)."""

    gamma: Float[Array, " d"]

    def __init__(self, dim: int, init_value: float):
        self.gamma = jnp.full((dim,), init_value, jnp.float32)

    def __call__(self, x: Float[Array, "*b d"]) -> Float[Array, "*b d"]:
        return x * self.gamma.astype(x.dtype)


def fused_attention(dtype: "jnp.dtype | type") -> Literal["cudnn", "xla"] | None:
    """The `jax.nn.dot_product_attention` implementation to use, or None for our einsum path:
    cuDNN's fused (flash) kernel on NVIDIA GPUs for bf16/fp16, where it saves the [B, heads,
    T, T] probabilities' memory traffic; elsewhere the einsum path, which XLA:CPU runs faster
    than dot_product_attention's (its batched dots in our layout, see `Attention.__call__`).
    The tests force "xla" to check that both paths agree."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return None


class Attention(eqx.Module):
    """Multi-head self-attention with a fused qkv projection (rows ordered [q | k | v])."""

    qkv: Linear
    proj: Linear
    attn_drop: Dropout
    proj_drop: Dropout
    heads: int = eqx.field(static=True)

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, *, key: PRNGKeyArray):
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        k1, k2 = jax.random.split(key)
        self.qkv = Linear(dim, 3 * dim, key=k1)
        self.proj = Linear(dim, dim, key=k2)
        self.attn_drop = Dropout(dropout)
        self.proj_drop = Dropout(dropout)
        self.heads = heads

    def attention_weights(self, x: Float[Array, "b t d"]) -> Float[Array, "b heads t t"]:
        """Softmax attention probabilities, for inspection (notebooks, attention maps)."""
        q, k, _ = self._qkv(x)
        return self._probs(q, k)

    def _qkv(self, x: Float[Array, "b t d"]) -> tuple[Array, Array, Array]:
        b, t, d = x.shape
        qkv = checkpoint_name(self.qkv(x), "qkv").reshape(b, t, 3, self.heads, d // self.heads)
        qkv = qkv.transpose(2, 0, 3, 1, 4)  # [3, B, heads, T, head_dim]
        return qkv[0], qkv[1], qkv[2]

    def _probs(self, q: Array, k: Array) -> Array:
        scale = 1.0 / math.sqrt(q.shape[-1])
        # The scale goes on the logits, not on q: q, k and v then reach only dots, so under the
        # layer scan's residual policy (`SAVED_RESIDUALS`) the TPU compiler keeps the saved qkv
        # in the dots' bf16 (DeiT-III B/16 on a v4: 0.35 GiB less per device).
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * scale
        return jax.nn.softmax(logits, axis=-1).astype(q.dtype)

    def __call__(self, x: Float[Array, "b t d"], *, key: PRNGKeyArray | None = None) -> Float[Array, "b t d"]:
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        b, t, d = x.shape
        q, k, v = self._qkv(x)
        impl = fused_attention(q.dtype)
        if impl is not None and (self.attn_drop.inference or self.attn_drop.p == 0.0):
            # [B, T, heads, hd] as jax.nn.dot_product_attention takes it; softmax in f32 inside
            qt, kt, vt = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
            out = jax.nn.dot_product_attention(qt, kt, vt, implementation=impl).reshape(b, t, d)
        else:
            attn = self.attn_drop(self._probs(q, k), key=k1)
            # attn @ v in the [B, heads, T, hd] layout, then one transpose: asking the einsum for
            # bqhd directly makes XLA:CPU run it as a slow transposed-output batched dot.
            out = jnp.einsum("bhqk,bhkd->bhqd", attn, v).transpose(0, 2, 1, 3).reshape(b, t, d)
        return self.proj_drop(self.proj(checkpoint_name(out, "attn_out")), key=k2)


class Mlp(eqx.Module):
    fc1: Linear
    fc2: Linear
    drop: Dropout
    approximate_gelu: bool = eqx.field(static=True)

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, approximate_gelu: bool = False,
                 *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.fc1 = Linear(dim, hidden, key=k1)
        self.fc2 = Linear(hidden, dim, key=k2)
        self.drop = Dropout(dropout)
        self.approximate_gelu = approximate_gelu

    def __call__(self, x: Float[Array, "b t d"], *, key: PRNGKeyArray | None = None) -> Float[Array, "b t d"]:
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        x = self.drop(gelu(checkpoint_name(self.fc1(x), "fc1"), self.approximate_gelu), key=k1)
        return self.drop(self.fc2(x), key=k2)


class Block(eqx.Module):
    """Pre-norm transformer block: x + DropPath(LS(Attn(LN x))), x + DropPath(LS(MLP(LN x)))."""

    norm1: LayerNorm
    attn: Attention
    ls1: LayerScale | None
    norm2: LayerNorm
    mlp: Mlp
    ls2: LayerScale | None
    drop_path: DropPath

    def __init__(self, dim: int, heads: int, *, mlp_ratio: int = 4, dropout: float = 0.0,
                 droppath: float = 0.0, layerscale: float | None = None,
                 gelu_kind: Literal["exact", "tanh"] = "exact", key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, key=k1)
        self.ls1 = LayerScale(dim, layerscale) if layerscale is not None else None
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio * dim, dropout, gelu_kind == "tanh", key=k2)
        self.ls2 = LayerScale(dim, layerscale) if layerscale is not None else None
        self.drop_path = DropPath(droppath)

    def __call__(self, x: Float[Array, "b t d"], *, key: PRNGKeyArray | None = None) -> Float[Array, "b t d"]:
        keys = jax.random.split(key, 4) if key is not None else (None,) * 4
        y = self.attn(self.norm1(x), key=keys[0])
        y = self.ls1(y) if self.ls1 is not None else y
        x = checkpoint_name(x + self.drop_path(y, key=keys[1]), "x_mid")
        y = self.mlp(self.norm2(x), key=keys[2])
        y = self.ls2(y) if self.ls2 is not None else y
        return x + self.drop_path(y, key=keys[3])
