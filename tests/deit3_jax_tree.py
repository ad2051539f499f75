"""Random deit3-jax parameter trees and flax's msgpack encoding, for tests that read deit3-jax
checkpoints (written from its documented layouts, no flax needed)."""

import msgpack
import numpy as np


def flax_msgpack_bytes(tree) -> bytes:
    """Mimics flax.serialization.msgpack_serialize: ndarrays as ExtType(1, packb((shape, dtype, bytes)))."""
    def default(x):
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
        raise TypeError(type(x))
    return msgpack.packb(tree, default=default, use_bin_type=True)


def deit3_jax_params(rng, layers=2, dim=32, heads=4, patch=4, image=16, labels=10, layerscale=True,
                     learnable=True, cls=True, bias_scale=0.3, token_scale=0.3, qkv_gains=(1.0, 1.0, 1.0),
                     head_gain=1.0) -> dict:
    """{"model": ...} in deit3-jax's layout: conv kernel (P,P,3,D), wpe (H/P, W/P, D), q/k/v kernels
    (D, heads, head_dim) with biases (heads, head_dim), wo (heads, head_dim, D), flax kernels [in, out]."""
    def w(*shape, fan_in, gain=1.0):
        return (gain * rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def b(*shape, scale=bias_scale):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm():
        return {"scale": 1 + b(dim, scale=0.2), "bias": b(dim)}

    hd, g = dim // heads, image // patch
    embed = {"wte": {"kernel": w(patch, patch, 3, dim, fan_in=3 * patch * patch), "bias": b(dim)}}
    if cls:
        embed["cls_token"] = b(1, 1, dim, scale=token_scale)
    if learnable:
        embed["wpe"] = b(g, g, dim, scale=token_scale)
    model = {"embed": embed, "norm": norm(),
             "head": {"kernel": w(dim, labels, fan_in=dim, gain=head_gain), "bias": b(labels)}}
    for i in range(layers):
        attn = {n: {"kernel": w(dim, heads, hd, fan_in=dim, gain=gain), "bias": b(heads, hd)}
                for n, gain in zip(("wq", "wk", "wv"), qkv_gains)}
        attn["wo"] = {"kernel": w(heads, hd, dim, fan_in=dim), "bias": b(dim)}
        layer = {"attn": attn, "ff": {"w1": {"kernel": w(dim, 4 * dim, fan_in=dim), "bias": b(4 * dim)},
                                      "w2": {"kernel": w(4 * dim, dim, fan_in=4 * dim), "bias": b(dim)}},
                 "norm1": norm(), "norm2": norm()}
        if layerscale:
            layer |= {"scale1": b(dim, scale=0.5), "scale2": b(dim, scale=0.5)}
        model[f"layer_{i}"] = layer
    return {"model": model}
