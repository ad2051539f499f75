"""On-device augmentation: pure JAX functions over uint8 batches that arrive at model size.

The host only decodes, crops/resizes to `image_size` and batches (see `deit.crop`); all
per-pixel work happens here, on the device that holds the batch slice, inside the trainer's
jitted step:

    images = train_transform(cfg, key, images)                  # uint8 -> normalised float
    targets = one_hot_targets(cfg, labels, num_labels)
    images, targets = mixup_cutmix(cfg, mix_key, images, targets)

Per image, in deit3-jax's (and timm's) order:

    horizontal flip -> policy -> color jitter -> [erasing 'torchvision'] -> normalise -> [erasing 'pixel']

The policy is `auto_augment`: a timm RandAugment string such as 'rand-m9-mstd0.5-inc1' (its
geometric ops fill with `AugmentConfig.geometric_fill`: deit3-jax's (123, 116, 103) or timm's
(124, 116, 104)), or '3a' for DeiT-III's 3-Augment. Color jitter has torchvision semantics.
Random erasing (`AugmentConfig.random_erasing_mode`) is either deit3-jax's torchvision
`RandomErasing(p, value="random")` on the uint8 image, whose N(0, 1) noise is stored as uint8
(a mostly black box with white specks), or timm's mode='pixel' on the normalised image (N(0, 1)
noise in normalised units; what the DeiT paper used). Every image draws from its own key (split
from the step key by its index in the global batch), so images of a batch and the repeated
copies of one sample are augmented independently, and the result does not depend on how the
batch is sharded.

How the per-image functions run: under a data-sharded mesh each device augments its own slice
(`jax.shard_map` over the batch axes: no image ever crosses devices). Within a device, on CPU
the images go one at a time through `lax.map`, so a `lax.switch` / `lax.cond` runs only the
chosen branch (vmap would turn them into selects that run every op on every image, 4x slower
here); on GPU/TPU `lax.map` runs chunks of `ACCELERATOR_CHUNK` images vmapped, where running
every branch is cheap and parallel.
"""

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt8

from deit import imageops
from deit.config import AugmentConfig
from deit.imageops import (DEIT3_JAX_FILL, FILL, affine, auto_contrast, brightness, color, contrast, equalize,
                           gaussian_blur, grayscale, hflip, invert, posterize, rotate, sharpness, shear_x, shear_y,
                           solarize, solarize_add, translate_x, translate_y)
from deit.model import normalize

Image = UInt8[Array, "h w 3"] | Float[Array, "h w 3"] | UInt8[np.ndarray, "h w 3"] | Float[np.ndarray, "h w 3"]
Images = UInt8[Array, "b h w 3"] | UInt8[np.ndarray, "b h w 3"]
Out = Float[Array, "h w 3"]
Scalar = float | int | Float[Array, ""] | Int[Array, ""]

# Mesh axes that shard the batch when the input's sharding does not say (Auto axes).
DATA_AXES = ("data", "fsdp")
# How the per-image function runs over a device's images: "map" one image at a time (lax.map:
# switch/cond run only the chosen branch; best on CPU), "vmap" chunks of ACCELERATOR_CHUNK images
# vmapped (every branch runs, in parallel; best on GPU/TPU), "auto" picks by backend.
PER_IMAGE: Literal["auto", "map", "vmap"] = "auto"
ACCELERATOR_CHUNK = 64

# ----------------------------------------------------------------------------- RandAugment

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


def op_argument(name: str, magnitude: Scalar, negate: bool | jax.Array, h: int, w: int,
                translate_pct: float = 0.45) -> Float[Array, ""]:
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
             fill: tuple[int, int, int] = FILL) -> Out:
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


def apply_rand_augment(ra: RandAugment, params: dict[str, jax.Array], image: Image) -> Out:
    """Run the layers chosen by `sample_rand_augment`.

    All geometric ops share a branch per resampling (one warp whose coefficients depend on the
    op), so a vmapped switch runs one or two warps per layer, not five or ten.
    """
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


# ----------------------------------------------------------------------------- 3-Augment, jitter, flip


def sample_three_augment(key: PRNGKeyArray, sigma_range: tuple[float, float] = (0.1, 2.0)) -> dict[str, jax.Array]:
    """3-Augment's choice (0 grayscale, 1 solarize, 2 blur, uniform) and blur sigma."""
    k_choice, k_sigma = jax.random.split(key)
    return dict(choice=jax.random.randint(k_choice, (), 0, 3),
                sigma=jax.random.uniform(k_sigma, minval=sigma_range[0], maxval=sigma_range[1]))


def apply_three_augment(params: dict[str, jax.Array], image: Image, max_sigma: float = 2.0) -> Out:
    branches = [lambda x, s: grayscale(x), lambda x, s: solarize(x, 128),
                lambda x, s: gaussian_blur(x, s, max_sigma=max_sigma)]
    return jax.lax.switch(params["choice"], branches, jnp.asarray(image, jnp.float32), params["sigma"])


def three_augment(key: PRNGKeyArray, image: Image, sigma_range: tuple[float, float] = (0.1, 2.0)) -> Out:
    """DeiT-III 3-Augment (timm's '3a'): one of grayscale, solarize (threshold 128) or Gaussian
    blur (PIL GaussianBlur, sigma uniform in `sigma_range`), chosen uniformly."""
    return apply_three_augment(sample_three_augment(key, sigma_range), image, max_sigma=sigma_range[1])


_JITTER_OPS = (brightness, contrast, color)


def sample_color_jitter(key: PRNGKeyArray, brightness_: float = 0.0, contrast_: float = 0.0,
                        saturation: float = 0.0) -> dict[str, jax.Array]:
    """torchvision ColorJitter.get_params: factors uniform in [max(0, 1 - v), 1 + v] for
    brightness, contrast, saturation (1 when v = 0: skipped), and a random order of the three."""
    k_order, *k_f = jax.random.split(key, 4)
    factors = [jax.random.uniform(k, minval=max(0.0, 1.0 - v), maxval=1.0 + v) if v > 0 else jnp.float32(1.0)
               for k, v in zip(k_f, (brightness_, contrast_, saturation))]
    return dict(factors=jnp.stack(factors), order=jax.random.permutation(k_order, 3))


def apply_color_jitter(params: dict[str, jax.Array], image: Image,
                       enabled: tuple[bool, bool, bool] = (True, True, True)) -> Out:
    """Apply brightness / contrast / saturation (PIL ImageEnhance) in `order`; a disabled one is
    skipped (torchvision skips an op whose range is the single value 1)."""
    x = jnp.asarray(image, jnp.float32)
    branches = [(lambda j: (lambda img, f: _JITTER_OPS[j](img, f[j])) if enabled[j] else (lambda img, f: img))(j)
                for j in range(3)]
    for step in range(3):
        x = jax.lax.switch(params["order"][step], branches, x, params["factors"])
    return x


def color_jitter(key: PRNGKeyArray, image: Image, brightness_: float = 0.0, contrast_: float = 0.0,
                 saturation: float = 0.0) -> Out:
    """torchvision ColorJitter(brightness, contrast, saturation) on a PIL image."""
    if brightness_ <= 0 and contrast_ <= 0 and saturation <= 0:
        return jnp.asarray(image, jnp.float32)
    params = sample_color_jitter(key, brightness_, contrast_, saturation)
    return apply_color_jitter(params, image, (brightness_ > 0, contrast_ > 0, saturation > 0))


def random_hflip(key: PRNGKeyArray, image: Image, p: float = 0.5) -> Out:
    x = jnp.asarray(image, jnp.float32)
    return jnp.where(jax.random.uniform(key) < p, x[:, ::-1], x)


# ----------------------------------------------------------------------------- random erasing


# Box constants per mode (min_area, max_area, min_aspect, max_aspect): timm's RandomErasing
# (DeiT, 'pixel') and torchvision's RandomErasing defaults scale=(0.02, 0.33), ratio=(0.3, 3.3)
# (deit3-jax, 'torchvision').
ERASE_BOX: dict[str, tuple[float, float, float, float]] = {
    "pixel": (0.02, 1 / 3, 0.3, 1 / 0.3), "torchvision": (0.02, 0.33, 0.3, 3.3)}


def erase_box(key: PRNGKeyArray, h: int, w: int, min_area: float = 0.02, max_area: float = 1 / 3,
              min_aspect: float = 0.3, max_aspect: float | None = None,
              attempts: int = 10) -> tuple[Int[Array, "4"], jax.Array]:
    """Random erasing's box, timm's and torchvision's rule: (top, left, height, width) and
    whether any of `attempts` fit.

    Area uniform in [min_area, max_area] of the image, aspect (height / width) log-uniform in
    [min_aspect, max_aspect] (default 1 / min_aspect), sides round(sqrt(area * aspect)) and
    round(sqrt(area / aspect)); the first attempt with height < H and width < W wins, placed
    uniformly among the positions that keep it inside. The attempts are drawn at once (same
    distribution as the libraries' loop, which stops at the first fit).
    """
    max_aspect = max_aspect or 1 / min_aspect
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


def torch_uint8_cast(z: Float[Array, "*s"] | Float[np.ndarray, "*s"]) -> Float[Array, "*s"]:
    """What a float32 value becomes when torch stores it into a uint8 tensor (torchvision's erase
    of a uint8 image): cast through int64, i.e. truncated toward zero, then wrapped modulo 256
    (0.7 -> 0, -0.7 -> 0, 1.5 -> 1, -1.5 -> 255, -2.2 -> 254). Returned as float levels."""
    return jnp.bitwise_and(jnp.trunc(jnp.asarray(z, jnp.float32)).astype(jnp.int32), 255).astype(jnp.float32)


def erase(image: Image, box: Int[Array, "4"] | tuple[int, int, int, int],
          values: Float[Array, "h w 3"] | Float[np.ndarray, "h w 3"]) -> Out:
    """`image` with its box (top, left, height, width) replaced by the same pixels of `values`."""
    top, left, bh, bw = (jnp.asarray(box)[i] for i in range(4))
    x = jnp.asarray(image, jnp.float32)
    ys, xs = jnp.arange(x.shape[0])[:, None], jnp.arange(x.shape[1])[None, :]
    inside = (ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw)
    return jnp.where(inside[..., None], jnp.asarray(values, jnp.float32), x)


def random_erasing(key: PRNGKeyArray, image: Image, p: float = 0.25,
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


# ----------------------------------------------------------------------------- train / eval transforms


@functools.lru_cache(maxsize=None)
def policy(auto_augment: str | None,
           fill: tuple[int, int, int] = FILL) -> Callable[[PRNGKeyArray, jax.Array], jax.Array] | None:
    """The per-image policy for an `auto_augment` string: None/'none', '3a' or 'rand-...';
    `fill` is RandAugment's geometric fill colour (see GEOMETRIC_FILLS)."""
    if auto_augment in (None, "", "none"):
        return None
    if auto_augment == "3a":
        return three_augment
    if auto_augment.startswith("rand"):
        return functools.partial(rand_augment, parse_rand_augment(auto_augment, fill))
    raise ValueError(f"auto_augment={auto_augment!r}: allowed None, 'none', '3a' or a timm 'rand-...' string")


def augment_one(cfg: AugmentConfig, key: PRNGKeyArray, image: Image) -> Float[Array, "h w 3"]:
    """The whole per-image train transform: flip, policy, jitter, erase ('torchvision' mode, on
    the [0, 255] image, as deit3-jax erases the uint8 PIL image), normalise, erase ('pixel' mode)."""
    k_flip, k_policy, k_jitter, k_erase = jax.random.split(key, 4)
    x = jnp.asarray(image, jnp.float32)
    if cfg.hflip > 0:
        x = random_hflip(k_flip, x, cfg.hflip)
    pol = policy(cfg.auto_augment, GEOMETRIC_FILLS[cfg.geometric_fill])
    if pol is not None:
        x = pol(k_policy, x)
    if cfg.color_jitter > 0:
        x = color_jitter(k_jitter, x, cfg.color_jitter, cfg.color_jitter, cfg.color_jitter)
    erase_mode = cfg.random_erasing_mode if cfg.random_erasing > 0 else None
    if erase_mode == "torchvision":
        x = random_erasing(k_erase, x, cfg.random_erasing, "torchvision")
    x = normalize(x)
    if erase_mode == "pixel":
        x = random_erasing(k_erase, x, cfg.random_erasing, "pixel")
    return x


def _batch_axes(x: jax.Array) -> tuple[object, tuple[str, ...]]:
    """(mesh, axes) when x's batch dim is sharded over mesh axes (explicit spec, else DATA_AXES)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None, ()
    spec = tuple(sharding.spec) if sharding.spec is not None else ()
    if spec and spec[0] is not None:
        axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    else:
        axes = tuple(a for a in DATA_AXES if a in mesh.axis_names)
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    axes = tuple(a for a in axes if types[a] != AxisType.Manual)
    n = math.prod(mesh.shape[a] for a in axes)
    if n <= 1 or x.shape[0] % n:
        return None, ()
    return mesh, axes


def per_device(fn: Callable, replicated: tuple, sharded: tuple):
    """fn(device_index, *replicated, *sharded) on each device's slice (dim 0) of `sharded`.

    Under a mesh that shards the batch (see `_batch_axes`) this is a `jax.shard_map`: each
    device works on its own slice and nothing crosses devices; otherwise fn sees the whole
    batch with device_index 0. `replicated` arguments (keys) are passed whole.
    """
    mesh, axes = _batch_axes(sharded[0])
    if not axes:
        return fn(jnp.int32(0), *replicated, *sharded)
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if any(types[a] == AxisType.Explicit for a in axes):  # explicit axes: say it (a local slice, no traffic)
        sharded = tuple(jax.sharding.reshard(s, jax.NamedSharding(mesh, P(axes))) for s in sharded)
    return jax.shard_map(lambda *a: fn(jax.lax.axis_index(axes), *a), mesh=mesh,
                         in_specs=(P(),) * len(replicated) + (P(axes),) * len(sharded), out_specs=P(axes))(
        *replicated, *sharded)


def _map_images(fn, keys, images):
    mode = PER_IMAGE if PER_IMAGE != "auto" else ("map" if jax.default_backend() == "cpu" else "vmap")
    chunk = None if mode == "map" else min(ACCELERATOR_CHUNK, images.shape[0])
    return jax.lax.map(lambda a: fn(*a), (keys, images), batch_size=chunk)


def train_transform(cfg: AugmentConfig, key: PRNGKeyArray, images: Images) -> Float[Array, "b h w 3"]:
    """`augment_one` per image (one key per image): uint8 in, ImageNet-normalised float out.

    With no policy, jitter or erasing (of either mode) this is flip (if cfg.hflip > 0) +
    normalise, batched.
    """
    images = jnp.asarray(images)
    if cfg.auto_augment in (None, "", "none") and cfg.color_jitter <= 0 and cfg.random_erasing <= 0:
        x = images.astype(jnp.float32)
        if cfg.hflip > 0:
            flip = jax.random.uniform(key, (x.shape[0],)) < cfg.hflip
            x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
        return normalize(x)
    keys = jax.random.split(key, images.shape[0])
    one = functools.partial(augment_one, cfg)
    return per_device(lambda _, im, ks: _map_images(one, ks, im), (), (images, keys))


def eval_transform(images: Images) -> Float[Array, "b h w 3"]:
    return normalize(jnp.asarray(images))


# ----------------------------------------------------------------------------- targets, Mixup / CutMix


def one_hot_targets(cfg: AugmentConfig, labels: Int[Array, " b"], num_labels: int) -> Float[Array, "b c"]:
    """One-hot targets; label smoothing for the ce criterion (deit3-jax applies none with bce).

    Smoothing as timm's: off = eps / C, on = 1 - eps + eps / C.
    """
    t = jax.nn.one_hot(labels, num_labels, dtype=jnp.float32)
    eps = cfg.label_smoothing if cfg.criterion == "ce" else 0.0
    return t * (1.0 - eps) + eps / num_labels


def cutmix_box(key: PRNGKeyArray, lam: Float[Array, ""], h: int, w: int) -> tuple[Int[Array, "4"], Float[Array, ""]]:
    """timm's rand_bbox + correct_lam: a box of side int(sqrt(1 - lam) * side) centred uniformly,
    clipped to the image: (y0, y1, x0, x1) and the corrected lam = 1 - box area / (h w)."""
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = jnp.floor(h * cut).astype(jnp.int32), jnp.floor(w * cut).astype(jnp.int32)
    k_y, k_x = jax.random.split(key)
    cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + (ch + 1) // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + (cw + 1) // 2, 0, w)
    return jnp.stack([y0, y1, x0, x1]), 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)


def _mix_local(cfg: AugmentConfig, key, images, targets):
    """timm Mixup(mode='batch', prob=1, switch_prob=0.5, correct_lam=True) on one batch slice:
    one lam per slice, partner of image i is image b-1-i of the slice (timm's `x.flip(0)`)."""
    b, h, w, _ = images.shape
    k_switch, k_lam, k_box = jax.random.split(key, 3)
    if cfg.mixup > 0 and cfg.cutmix > 0:
        use_cut = jax.random.uniform(k_switch) < 0.5
        alpha = jnp.where(use_cut, cfg.cutmix, cfg.mixup)
    else:
        use_cut = jnp.asarray(cfg.cutmix > 0)
        alpha = jnp.float32(cfg.cutmix if cfg.cutmix > 0 else cfg.mixup)
    lam = jax.random.beta(k_lam, alpha, alpha).astype(jnp.float32)
    partner, partner_t = images[::-1], targets[::-1]
    mixed_mix = lam * images + (1.0 - lam) * partner
    if cfg.cutmix > 0:
        (y0, y1, x0, x1), lam_cut = cutmix_box(k_box, lam, h, w)
        ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
        mixed_cut = jnp.where(box[None, :, :, None], partner, images)
        mixed = jnp.where(use_cut, mixed_cut, mixed_mix)
        lam = jnp.where(use_cut, lam_cut, lam)
    else:
        mixed = mixed_mix
    return mixed, lam * targets + (1.0 - lam) * partner_t


def mixup_cutmix(cfg: AugmentConfig, key: PRNGKeyArray, images: Float[Array, "b h w c"],
                 targets: Float[Array, "b n"]) -> tuple[Float[Array, "b h w c"], Float[Array, "b n"]]:
    """Batch-level Mixup or CutMix (each with probability 0.5 when both are on), timm's rules.

    Mixup partners are chosen WITHIN each device's slice of the batch: image i of a slice is
    mixed with image (slice_size - 1 - i) of the same slice, with one lam per slice. This is what
    timm does under DDP (every GPU flips its local batch, with its own lam) and what deit3-jax
    does under pmap (a permutation of each device's batch); it keeps the step free of any
    cross-device traffic, and with the loader's layout (copy c of sample j at c * n + j) the
    repeated copies of a sample are never each other's partner unless the slice holds more than
    one copy. Without a sharded mesh the slice is the whole batch. Targets are mixed with the
    same lam and stay soft for both criteria: 'ce' targets carry the label smoothing of
    `one_hot_targets`, 'bce' ones none, and the bce loss thresholds them (> 0) itself, as
    deit3-jax and DeiT-III do (the soft weights still tell the dominant label to metrics).
    """
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return images, targets

    return per_device(lambda index, k, x, t: _mix_local(cfg, jax.random.fold_in(k, index), x, t), (key,),
                      (images, targets))


__all__ = [
    "DEIT3_JAX_FILL", "ERASE_BOX", "FILL", "GEOMETRIC_FILLS", "RAND_INCREASING_TRANSFORMS", "RAND_TRANSFORMS",
    "RandAugment", "affine", "apply_op",
    "apply_color_jitter", "apply_rand_augment", "apply_three_augment", "augment_one", "auto_contrast", "brightness", "color", "color_jitter", "contrast",
    "cutmix_box", "equalize", "erase", "erase_box", "eval_transform", "gaussian_blur", "grayscale", "hflip", "invert",
    "mixup_cutmix", "one_hot_targets", "op_argument", "parse_rand_augment", "policy", "posterize",
    "rand_augment", "random_erasing", "random_hflip", "rotate", "sample_color_jitter", "sample_rand_augment",
    "sample_three_augment", "sharpness", "shear_x",
    "shear_y", "solarize", "solarize_add", "three_augment", "torch_uint8_cast", "train_transform", "translate_x",
    "translate_y",
]
