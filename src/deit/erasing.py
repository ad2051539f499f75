"""Random erasing of one box per image, in the two modes the recipes use.

'torchvision' is deit3-jax's: torchvision `RandomErasing(p, value="random")` on the uint8 image
after colour jitter, whose N(0, 1) noise torch stores as uint8 (a mostly black box with white
specks). 'pixel' is timm's `RandomErasing(mode='pixel')` on the normalised image (noise in
normalised units; what the DeiT paper used). Both draw the box by the libraries' rule.
"""

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, Real

from deit.imageops import Image, Number, Out, Scalar


# Box constants per mode (min_area, max_area, min_aspect, max_aspect): timm's RandomErasing
# (DeiT, 'pixel') and torchvision's RandomErasing defaults scale=(0.02, 0.33), ratio=(0.3, 3.3)
# (deit3-jax, 'torchvision').
ERASE_BOX: dict[str, tuple[float, float, float, float]] = {
    "pixel": (0.02, 1 / 3, 0.3, 1 / 0.3), "torchvision": (0.02, 0.33, 0.3, 3.3)}


def erase_box(key: PRNGKeyArray, h: int, w: int, min_area: Number = 0.02, max_area: Number = 1 / 3,
              min_aspect: Number = 0.3, max_aspect: Number | None = None,
              attempts: int = 10) -> tuple[Int[Array, "4"], jax.Array]:
    """Random erasing's box, timm's and torchvision's rule: (top, left, height, width) and
    whether any of `attempts` fit.

    Area uniform in [min_area, max_area] of the image, aspect (height / width) log-uniform in
    [min_aspect, max_aspect] (default 1 / min_aspect), sides round(sqrt(area * aspect)) and
    round(sqrt(area / aspect)); the first attempt with height < H and width < W wins, placed
    uniformly among the positions that keep it inside. The attempts are drawn at once (same
    distribution as the libraries' loop, which stops at the first fit).
    """
    min_area, max_area, min_aspect = float(min_area), float(max_area), float(min_aspect)
    max_aspect = float(max_aspect) if max_aspect else 1 / min_aspect
    k_area, k_aspect, k_top, k_left = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (attempts,), minval=min_area, maxval=max_area) * (h * w)
    aspect = jnp.exp(jax.random.uniform(k_aspect, (attempts,), minval=math.log(min_aspect), maxval=math.log(max_aspect)))
    bh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    bw = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    ok = (bw < w) & (bh < h)
    first = jnp.argmax(ok)
    bh, bw = bh[first], bw[first]
    top = jax.random.randint(k_top, (), 0, h - bh + 1)
    left = jax.random.randint(k_left, (), 0, w - bw + 1)
    return jnp.stack([top, left, bh, bw]), ok.any()


def torch_uint8_cast(z: Float[ArrayLike, "*s"]) -> Float[Array, "*s"]:
    """What a float32 value becomes when torch stores it into a uint8 tensor (torchvision's erase
    of a uint8 image): cast through int64, i.e. truncated toward zero, then wrapped modulo 256
    (0.7 -> 0, -0.7 -> 0, 1.5 -> 1, -1.5 -> 255, -2.2 -> 254). Returned as float levels."""
    return jnp.bitwise_and(jnp.trunc(jnp.asarray(z, jnp.float32)).astype(jnp.int32), 255).astype(jnp.float32)


def erase(image: Image, box: Int[Array | np.ndarray, "4"] | tuple[Scalar, Scalar, Scalar, Scalar],
          values: Real[Array | np.ndarray, "h w 3"]) -> Out:
    """`image` with its box (top, left, height, width) replaced by the same pixels of `values`."""
    top, left, bh, bw = (jnp.asarray(box)[i] for i in range(4))
    x = jnp.asarray(image, jnp.float32)
    ys, xs = jnp.arange(x.shape[0])[:, None], jnp.arange(x.shape[1])[None, :]
    inside = (ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw)
    return jnp.where(inside[..., None], jnp.asarray(values, jnp.float32), x)


def random_erasing(key: PRNGKeyArray, image: Image, p: Scalar = 0.25,
                   mode: Literal["pixel", "torchvision"] = "pixel") -> Out:
    """Random erasing of one box (see `erase_box`, constants `ERASE_BOX[mode]`) with probability
    p, filled with per-pixel, per-channel N(0, 1) noise.

    'pixel': timm RandomErasing(p, mode='pixel', max_count=1) on a normalised image: the noise is
    in normalised units. 'torchvision': torchvision RandomErasing(p, value="random") on a [0, 255]
    image (deit3-jax erases the uint8 PIL image): the noise goes through torch's uint8 cast
    (`torch_uint8_cast`), so the box is ~68% 0, ~14% each 1 and 255, ~2% each 2 and 254.
    """
    if mode not in ERASE_BOX:
        raise ValueError(f"mode={mode!r}: allowed {sorted(ERASE_BOX)}")
    k_p, k_box, k_noise = jax.random.split(key, 3)
    x = jnp.asarray(image, jnp.float32)
    box, ok = erase_box(k_box, x.shape[0], x.shape[1], *ERASE_BOX[mode])

    def fill(x):
        z = jax.random.normal(k_noise, x.shape, jnp.float32)
        return erase(x, box, z if mode == "pixel" else torch_uint8_cast(z))

    # A real branch under lax.map: the noise (the costliest part) is drawn only when erasing.
    return jax.lax.cond((jax.random.uniform(k_p) < p) & ok, fill, lambda x: x, x)


__all__ = ["ERASE_BOX", "erase", "erase_box", "random_erasing", "torch_uint8_cast"]
