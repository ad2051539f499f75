"""timm's RandAugment on one image: its config string, its op table, its random draws.

Faithful to timm's `rand_augment_transform` (the ops themselves are `deit.imageops`, faithful
to PIL): the same op lists, level-to-argument rules and sampling, so a recipe's
'rand-m9-mstd0.5-inc1' means what it means in DeiT. Draws (`sample_rand_augment`) are kept apart
from their application (`apply_rand_augment`) so tests can replay timm's ops with our draws.
"""

import dataclasses
import math
import re
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray

from deit import imageops
from deit.imageops import (DEIT3_JAX_FILL, FILL, Fill, Image, Out, Scalar, affine, auto_contrast, brightness, color,
                           contrast, equalize, invert, posterize, sharpness, solarize, solarize_add)

Params = dict[str, Array | np.ndarray]
"""Random draws of a policy (`sample_*`), as jax or numpy arrays."""

_LEVEL_DENOM = 10.0
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")
_ENHANCE = {"Color": color, "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness}


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm RandAugment: `num_layers` ops drawn uniformly with replacement, each applied with
    probability `prob` at magnitude N(magnitude, magnitude_std) clipped to [0, magnitude_max]
    (magnitude_std = inf: uniform in [0, magnitude])."""

    num_layers: int = 2
    magnitude: float = 10.0
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    ops: tuple[str, ...] = RAND_TRANSFORMS
    translate_pct: float = 0.45
    """TranslateXRel/YRel range as a fraction of the image side (timm's default)."""
    interpolation: Literal["bilinear", "bicubic", "random"] = "random"
    """Resampling of the geometric ops. timm draws bilinear or bicubic per op ('random') unless an
    interpolation is configured: deit3-jax configures none, DeiT's timm configures 'bicubic'."""
    fill: tuple[int, int, int] = FILL
    """Colour the geometric ops give pixels mapped from outside the image (timm's `img_mean`):
    timm's create_transform passes FILL, deit3-jax DEIT3_JAX_FILL (see GEOMETRIC_FILLS)."""

    def __post_init__(self):
        unknown = [o for o in self.ops if o not in _OP_NAMES]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; allowed: {sorted(_OP_NAMES)}")
        if self.num_layers < 0 or not 0 <= self.prob <= 1:
            raise ValueError(f"bad RandAugment n={self.num_layers} p={self.prob}")
        if self.interpolation not in ("bilinear", "bicubic", "random"):
            raise ValueError(f"interpolation={self.interpolation!r}: allowed 'bilinear', 'bicubic', 'random'")
        if len(self.fill) != 3:
            raise ValueError(f"fill={self.fill!r}: one value per RGB channel")


# AugmentConfig.geometric_fill -> RandAugment.fill
GEOMETRIC_FILLS: dict[str, tuple[int, int, int]] = {"deit3-jax": DEIT3_JAX_FILL, "timm": FILL}


def parse_rand_augment(config: str, fill: tuple[int, int, int] = FILL) -> RandAugment:
    """timm's config string: 'rand' then dash-separated m<int>, n<int>, p<float>, mstd<float>
    (> 100 means uniform), mmax<int>, inc<0|1>; e.g. 'rand-m9-mstd0.5-inc1'. `fill` is the
    geometric ops' fill colour (timm's `img_mean` hparam, not part of the string)."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"auto_augment={config!r}: a RandAugment string starts with 'rand'")
    kw: dict = {}
    increasing = False
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if m is None:
            raise ValueError(f"auto_augment={config!r}: cannot parse section {part!r}")
        key, val = m.groups()
        if key == "m":
            kw["magnitude"] = float(int(val))
        elif key == "n":
            kw["num_layers"] = int(val)
        elif key == "p":
            kw["prob"] = float(val)
        elif key == "mstd":
            std = float(val)
            kw["magnitude_std"] = math.inf if std > 100 else std
        elif key == "mmax":
            kw["magnitude_max"] = float(int(val))
        elif key == "inc":
            increasing = bool(int(val))
        else:
            raise ValueError(f"auto_augment={config!r}: unknown section {part!r} (allowed m, n, p, mstd, mmax, inc)")
    return RandAugment(ops=RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS, fill=tuple(fill), **kw)


def _negate(v, negate):
    return jnp.where(negate, -v, v)


def op_argument(name: str, magnitude: Scalar, negate: Bool[ArrayLike, ""], h: int, w: int,
                translate_pct: Scalar = 0.45) -> Float[Array, ""]:
    """timm's level-to-argument rule for op `name` at `magnitude` (0..10 scale), with its random
    sign (`negate`) for the signed ops; h, w: image size for the relative translations."""
    lv = jnp.asarray(magnitude, jnp.float32) / _LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return jnp.float32(0.0)
    if name == "Rotate":
        return _negate(lv * 30.0, negate)
    if name == "Posterize":
        return jnp.floor(lv * 4.0)
    if name == "PosterizeIncreasing":
        return 4.0 - jnp.floor(lv * 4.0)
    if name == "PosterizeOriginal":
        return jnp.floor(lv * 4.0) + 4.0
    if name == "Solarize":
        return jnp.floor(lv * 256.0)
    if name == "SolarizeIncreasing":
        return 256.0 - jnp.floor(lv * 256.0)
    if name == "SolarizeAdd":
        return jnp.floor(lv * 110.0)
    if name in _ENHANCE:
        return lv * 1.8 + 0.1
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/SharpnessIncreasing
        return jnp.maximum(0.1, 1.0 + _negate(lv * 0.9, negate))
    if name in ("ShearX", "ShearY"):
        return _negate(lv * 0.3, negate)
    if name in ("TranslateX", "TranslateY"):  # absolute, timm's translate_const = 0.45 * min side
        return _negate(lv * float(int(0.45 * min(h, w))), negate)
    if name == "TranslateXRel":
        return _negate(lv * translate_pct, negate) * w
    if name == "TranslateYRel":
        return _negate(lv * translate_pct, negate) * h
    raise ValueError(f"unknown op {name!r}")


def _geometric_coeffs(name: str, arg, h: int, w: int):
    one, zero = jnp.float32(1.0), jnp.float32(0.0)
    if name == "Rotate":
        return imageops.rotate_coeffs(arg, h, w)
    if name == "ShearX":
        return jnp.stack([one, arg, zero, zero, one, zero])
    if name == "ShearY":
        return jnp.stack([one, zero, zero, arg, one, zero])
    if name in ("TranslateX", "TranslateXRel"):
        return jnp.stack([one, zero, arg, zero, one, zero])
    return jnp.stack([one, zero, zero, zero, one, arg])  # TranslateY, TranslateYRel


def apply_op(name: str, image: Image, arg: Scalar, resample: Literal["bilinear", "bicubic"] = "bilinear",
             fill: Fill = FILL) -> Out:
    """Apply timm op `name` with its argument (as `op_argument` returns it); geometric ops fill
    with `fill`."""
    if name in _GEOMETRIC:
        coeffs = _geometric_coeffs(name, jnp.asarray(arg, jnp.float32), image.shape[0], image.shape[1])
        return affine(image, coeffs, fill=fill, resample=resample)
    base = name.removesuffix("Increasing").removesuffix("Original")
    if base == "AutoContrast":
        return auto_contrast(image)
    if base == "Equalize":
        return equalize(image)
    if base == "Invert":
        return invert(image)
    if base == "Posterize":
        return posterize(image, arg)
    if base == "Solarize":
        return solarize(image, arg)
    if base == "SolarizeAdd":
        return solarize_add(image, arg)
    if base in _ENHANCE:
        return _ENHANCE[base](image, arg)
    raise ValueError(f"unknown op {name!r}")


_OP_NAMES = frozenset(RAND_TRANSFORMS + RAND_INCREASING_TRANSFORMS + ("PosterizeOriginal", "TranslateX", "TranslateY"))


def sample_rand_augment(ra: RandAugment, key: PRNGKeyArray) -> dict[str, jax.Array]:
    """Per-layer random choices: op index, applied?, magnitude, sign, bicubic? (arrays of length
    num_layers)."""
    k_op, k_apply, k_mag, k_neg, k_interp = jax.random.split(key, 5)
    n = ra.num_layers
    if ra.magnitude_std == math.inf:
        mag = jax.random.uniform(k_mag, (n,), maxval=ra.magnitude)
    elif ra.magnitude_std > 0:
        mag = ra.magnitude + ra.magnitude_std * jax.random.normal(k_mag, (n,))
    else:
        mag = jnp.full((n,), ra.magnitude, jnp.float32)
    return dict(
        op=jax.random.randint(k_op, (n,), 0, len(ra.ops)),
        apply=jax.random.uniform(k_apply, (n,)) < ra.prob,
        magnitude=jnp.clip(mag, 0.0, ra.magnitude_max),
        negate=jax.random.uniform(k_neg, (n,)) > 0.5,
        bicubic=(jax.random.uniform(k_interp, (n,)) < 0.5 if ra.interpolation == "random"
                 else jnp.full((n,), ra.interpolation == "bicubic")),
    )


def apply_rand_augment(ra: RandAugment, params: Params, image: Image) -> Out:
    """Run the layers chosen by `sample_rand_augment`.

    All geometric ops share a branch per resampling (one warp whose coefficients depend on the
    op), so a vmapped switch runs one or two warps per layer, not five or ten.
    """
    params = {k: jnp.asarray(v) for k, v in params.items()}
    x = jnp.asarray(image, jnp.float32)
    h, w = x.shape[0], x.shape[1]
    geo = [i for i, o in enumerate(ra.ops) if o in _GEOMETRIC]
    colour = [i for i, o in enumerate(ra.ops) if o not in _GEOMETRIC]
    resamples = {"random": ("bilinear", "bicubic")}.get(ra.interpolation, (ra.interpolation,)) if geo else ()

    def warp(resample):
        def branch(img, i, mag, neg):
            table = jnp.stack([_geometric_coeffs(ra.ops[g], op_argument(ra.ops[g], mag, neg, h, w, ra.translate_pct),
                                                 h, w) for g in geo])
            pos = jnp.asarray([geo.index(g) if g in geo else 0 for g in range(len(ra.ops))])[i]
            return affine(img, table[pos], fill=ra.fill, resample=resample)
        return branch

    def colour_op(name):
        def branch(img, i, mag, neg):
            return apply_op(name, img, op_argument(name, mag, neg, h, w, ra.translate_pct))
        return branch

    # branch 0: identity, then the warps, then one per colour op
    branches = [lambda img, i, mag, neg: img] + [warp(r) for r in resamples] + [colour_op(ra.ops[c]) for c in colour]
    branch_of = [0] * len(ra.ops)
    for j, c in enumerate(colour):
        branch_of[c] = 1 + len(resamples) + j
    for g in geo:
        branch_of[g] = 1
    branch_of = jnp.asarray(branch_of)
    is_geo = jnp.asarray([o in _GEOMETRIC for o in ra.ops])
    for layer in range(ra.num_layers):
        i = params["op"][layer]
        b = branch_of[i]
        if len(resamples) == 2:
            b = b + (is_geo[i] & params["bicubic"][layer])
        b = jnp.where(params["apply"][layer], b, 0)
        x = jax.lax.switch(b, branches, x, i, params["magnitude"][layer], params["negate"][layer])
    return x


def rand_augment(ra: RandAugment, key: PRNGKeyArray, image: Image) -> Out:
    return apply_rand_augment(ra, sample_rand_augment(ra, key), image)


__all__ = [
    "GEOMETRIC_FILLS", "Params", "RAND_INCREASING_TRANSFORMS", "RAND_TRANSFORMS", "RandAugment", "apply_op",
    "apply_rand_augment", "op_argument", "parse_rand_augment", "rand_augment", "sample_rand_augment",
]
