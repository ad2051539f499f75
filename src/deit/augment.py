"""On-device augmentation: the per-image train transform over uint8 batches at model size.

The host only decodes, crops/resizes to `image_size` and batches (see `deit.crop`); all
per-pixel work happens here, on the device that holds the batch slice, inside the trainer's
jitted step:

    images = train_transform(cfg.augment, key, images)          # uint8 -> normalised float
    targets = one_hot_targets(cfg.loss, labels, num_labels)     # deit.mixing
    images, targets = mixup_cutmix(cfg.augment, mix_key, images, targets)

Per image, in deit3-jax's (and timm's) order:

    [affine] -> horizontal flip -> policy -> color jitter -> [erasing 'torchvision'] -> normalise -> [erasing 'pixel']

The policy is `auto_augment`: a timm RandAugment string such as 'rand-m9-mstd0.5-inc1'
(`deit.randaugment`; its geometric ops fill with `AugmentConfig.geometric_fill`), or '3a' for
DeiT-III's 3-Augment (here). The affine (`affine_*`, off in every ImageNet recipe) is
torchvision's RandomAffine, for small images such as digits. Color jitter has torchvision semantics. Random erasing
(`deit.erasing`, `AugmentConfig.random_erasing_mode`) is deit3-jax's torchvision mode on the
[0, 255] image or timm's 'pixel' mode on the normalised one. The ops are `deit.imageops`,
faithful to PIL. Every image draws from its own key (split from the step key by its index in
the global batch), so images of a batch and the repeated copies of one sample are augmented
independently, and the result does not depend on how the batch is sharded: each device
augments its own slice (`deit.perdevice`).
"""

import functools
from collections.abc import Callable

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from deit.config import AugmentConfig
from deit.erasing import random_erasing
from deit import imageops
from deit.imageops import (FILL, Image, Number, Out, Scalar, brightness, color, contrast, gaussian_blur, grayscale,
                           hflip, solarize)
from deit.model import normalize
from deit.perdevice import PerImage, map_images, per_device
from deit.randaugment import GEOMETRIC_FILLS, Params, parse_rand_augment, rand_augment

Images = UInt8[Array | np.ndarray, "b h w 3"]


# ----------------------------------------------------------------------------- 3-Augment, jitter, flip


def sample_three_augment(key: PRNGKeyArray, sigma_range: tuple[Number, Number] = (0.1, 2.0)) -> dict[str, jax.Array]:
    """3-Augment's choice (0 grayscale, 1 solarize, 2 blur, uniform) and blur sigma."""
    k_choice, k_sigma = jax.random.split(key)
    lo, hi = (float(v) for v in sigma_range)
    return dict(choice=jax.random.randint(k_choice, (), 0, 3), sigma=jax.random.uniform(k_sigma, minval=lo, maxval=hi))


def apply_three_augment(params: Params, image: Image, max_sigma: Number = 2.0) -> Out:
    params = {k: jnp.asarray(v) for k, v in params.items()}
    branches = [lambda x, s: grayscale(x), lambda x, s: solarize(x, 128),
                lambda x, s: gaussian_blur(x, s, max_sigma=float(max_sigma))]
    return jax.lax.switch(params["choice"], branches, jnp.asarray(image, jnp.float32), params["sigma"])


def three_augment(key: PRNGKeyArray, image: Image, sigma_range: tuple[Number, Number] = (0.1, 2.0)) -> Out:
    """DeiT-III 3-Augment (timm's '3a'): one of grayscale, solarize (threshold 128) or Gaussian
    blur (PIL GaussianBlur, sigma uniform in `sigma_range`), chosen uniformly."""
    return apply_three_augment(sample_three_augment(key, sigma_range), image, max_sigma=sigma_range[1])


_JITTER_OPS = (brightness, contrast, color)


def sample_color_jitter(key: PRNGKeyArray, brightness_: Number = 0.0, contrast_: Number = 0.0,
                        saturation: Number = 0.0) -> dict[str, jax.Array]:
    """torchvision ColorJitter.get_params: factors uniform in [max(0, 1 - v), 1 + v] for
    brightness, contrast, saturation (1 when v = 0: skipped), and a random order of the three."""
    k_order, *k_f = jax.random.split(key, 4)
    factors = [jax.random.uniform(k, minval=max(0.0, 1.0 - v), maxval=1.0 + v) if v > 0 else jnp.float32(1.0)
               for k, v in zip(k_f, (float(brightness_), float(contrast_), float(saturation)))]
    return dict(factors=jnp.stack(factors), order=jax.random.permutation(k_order, 3))


def apply_color_jitter(params: Params, image: Image,
                       enabled: tuple[bool, bool, bool] = (True, True, True)) -> Out:
    """Apply brightness / contrast / saturation (PIL ImageEnhance) in `order`; a disabled one is
    skipped (torchvision skips an op whose range is the single value 1)."""
    params = {k: jnp.asarray(v) for k, v in params.items()}
    x = jnp.asarray(image, jnp.float32)
    branches = [(lambda j: (lambda img, f: _JITTER_OPS[j](img, f[j])) if enabled[j] else (lambda img, f: img))(j)
                for j in range(3)]
    for step in range(3):
        x = jax.lax.switch(params["order"][step], branches, x, params["factors"])
    return x


def color_jitter(key: PRNGKeyArray, image: Image, brightness_: Number = 0.0, contrast_: Number = 0.0,
                 saturation: Number = 0.0) -> Out:
    """torchvision ColorJitter(brightness, contrast, saturation) on a PIL image."""
    brightness_, contrast_, saturation = float(brightness_), float(contrast_), float(saturation)
    if brightness_ <= 0 and contrast_ <= 0 and saturation <= 0:
        return jnp.asarray(image, jnp.float32)
    params = sample_color_jitter(key, brightness_, contrast_, saturation)
    return apply_color_jitter(params, image, (brightness_ > 0, contrast_ > 0, saturation > 0))


def sample_affine(key: PRNGKeyArray, degrees: Number = 0.0, translate: Number = 0.0, scale: Number = 0.0,
                  shear: Number = 0.0, size: tuple[int, int] = (224, 224)) -> dict[str, jax.Array]:
    """torchvision RandomAffine.get_params for RandomAffine(degrees, translate=(t, t),
    scale=(1 - s, 1 + s), shear=shear): angle and x-shear uniform in +-, the shift uniform in
    +-t x size rounded to whole pixels, the scale uniform; a zero range draws its identity."""
    k_angle, k_tx, k_ty, k_scale, k_shear = jax.random.split(key, 5)
    u = lambda k, lo, hi: jax.random.uniform(k, minval=lo, maxval=hi)  # noqa: E731
    h, w = size
    t = float(translate)
    return dict(angle=u(k_angle, -float(degrees), float(degrees)),
                translate=jnp.stack([jnp.round(u(k_tx, -t * w, t * w)), jnp.round(u(k_ty, -t * h, t * h))]),
                scale=u(k_scale, 1.0 - float(scale), 1.0 + float(scale)),
                shear=u(k_shear, -float(shear), float(shear)))


def affine_coeffs(params: Params, h: int, w: int) -> Float[Array, "6"]:
    """PIL's inverse-map coefficients of torchvision's affine(angle, translate, scale, shear=(sx, 0)):
    about the centre (w/2, h/2), as torchvision's PIL path; angle and shear in degrees."""
    rot, sx = jnp.deg2rad(params["angle"]), jnp.deg2rad(params["shear"])
    tx, ty = params["translate"][0], params["translate"][1]
    cx, cy = w * 0.5, h * 0.5
    # forward map: translate . centre . rotate . shear_x . scale . centre^-1; its rotation-shear part
    a, b = jnp.cos(rot), -jnp.cos(rot) * jnp.tan(sx) - jnp.sin(rot)
    c, d = jnp.sin(rot), -jnp.sin(rot) * jnp.tan(sx) + jnp.cos(rot)
    # inverse (the determinant of rotation . shear is 1), then the centre and shift
    ia, ib, ic, id_ = d / params["scale"], -b / params["scale"], -c / params["scale"], a / params["scale"]
    e = ia * (-cx - tx) + ib * (-cy - ty) + cx
    f = ic * (-cx - tx) + id_ * (-cy - ty) + cy
    return jnp.stack([ia, ib, e, ic, id_, f])


def random_affine(key: PRNGKeyArray, image: Image, degrees: Number = 0.0, translate: Number = 0.0,
                  scale: Number = 0.0, shear: Number = 0.0) -> Out:
    """torchvision RandomAffine(degrees, (translate, translate), (1 - scale, 1 + scale), shear,
    interpolation=BILINEAR, fill=0) on a PIL image: black where the map leaves the image."""
    x = jnp.asarray(image, jnp.float32)
    h, w = x.shape[0], x.shape[1]
    params = sample_affine(key, degrees, translate, scale, shear, (h, w))
    return imageops.affine(x, affine_coeffs(params, h, w), (0, 0, 0), "bilinear")


def sample_elastic(key: PRNGKeyArray, alpha: Number, sigma: Number,
                   size: tuple[int, int]) -> Float[Array, "h w 2"]:
    """torchvision ElasticTransform.get_params, in pixels: per axis, uniform noise in [-1, 1)
    blurred by a Gaussian of `sigma` (kernel int(8 sigma + 1), made odd; reflect padding), times
    alpha / 2 (torchvision's alpha / size in grid units, whose half-width is size / 2 pixels).
    [..., 0] is the x displacement, [..., 1] the y one."""
    h, w = size
    sigma = float(sigma)
    u = jax.random.uniform(key, (2, h, w), minval=-1.0, maxval=1.0)
    if sigma > 0:
        k = int(8 * sigma + 1)
        k += 1 - k % 2
        t = jnp.arange(k, dtype=jnp.float32) - (k - 1) / 2
        g = jnp.exp(-0.5 * (t / sigma) ** 2)
        g = g / g.sum()
        r = k // 2
        u = jnp.pad(u, ((0, 0), (r, r), (r, r)), mode="reflect")
        u = sum(g[i] * u[:, :, i:i + w] for i in range(k))  # along x, then y (separable)
        u = sum(g[i] * u[:, i:i + h, :] for i in range(k))
    return jnp.moveaxis(u, 0, -1) * (float(alpha) / 2.0)


def elastic(image: Image, displacement: Float[Array | np.ndarray, "h w 2"]) -> Out:
    """torchvision F.elastic_transform (bilinear, zeros outside) with a pixel displacement:
    output pixel (x, y) samples the input at (x + dx, y + dy), pixel centres at integers; the
    result rounded to integer levels, as torchvision casts a uint8 image back."""
    x, displacement = jnp.asarray(image, jnp.float32), jnp.asarray(displacement, jnp.float32)
    h, w = x.shape[0], x.shape[1]
    xs = jnp.arange(w, dtype=jnp.float32)[None, :] + displacement[..., 0]
    ys = jnp.arange(h, dtype=jnp.float32)[:, None] + displacement[..., 1]
    x0, y0 = jnp.floor(xs), jnp.floor(ys)
    fx, fy = (xs - x0)[..., None], (ys - y0)[..., None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    flat = x.reshape(h * w, -1)

    def tap(i, j):
        yy, xx = y0 + i, x0 + j
        ok = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[..., None]
        v = jnp.take(flat, (jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)).reshape(-1), axis=0)
        return jnp.where(ok, v.reshape(h, w, -1), 0.0)

    top = tap(0, 0) * (1 - fx) + tap(0, 1) * fx
    bottom = tap(1, 0) * (1 - fx) + tap(1, 1) * fx
    return jnp.round(top * (1 - fy) + bottom * fy)


def random_elastic(key: PRNGKeyArray, image: Image, alpha: Number = 50.0, sigma: Number = 5.0) -> Out:
    """torchvision ElasticTransform(alpha, sigma, interpolation=BILINEAR, fill=0)."""
    x = jnp.asarray(image, jnp.float32)
    return elastic(x, sample_elastic(key, alpha, sigma, (x.shape[0], x.shape[1])))


def random_hflip(key: PRNGKeyArray, image: Image, p: Scalar = 0.5) -> Out:
    x = jnp.asarray(image, jnp.float32)
    return jnp.where(jax.random.uniform(key) < p, hflip(x), x)


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


def has_affine(cfg: AugmentConfig) -> bool:
    return (cfg.affine_degrees, cfg.affine_translate, cfg.affine_scale, cfg.affine_shear) != (0, 0, 0, 0)


def has_geometric(cfg: AugmentConfig) -> bool:
    """The small-image warps (affine, elastic) are on."""
    return has_affine(cfg) or cfg.elastic_alpha > 0


def augment_one(cfg: AugmentConfig, key: PRNGKeyArray, image: Image) -> Float[Array, "h w 3"]:
    """The whole per-image train transform: affine, flip, policy, jitter, erase ('torchvision' mode, on
    the [0, 255] image, as deit3-jax erases the uint8 PIL image), normalise, erase ('pixel' mode)."""
    k_flip, k_policy, k_jitter, k_erase = jax.random.split(key, 4)
    x = jnp.asarray(image, jnp.float32)
    if has_affine(cfg):  # its own key (folded in): the other ops draw as without it
        x = random_affine(jax.random.fold_in(key, 4), x, cfg.affine_degrees, cfg.affine_translate,
                          cfg.affine_scale, cfg.affine_shear)
    if cfg.elastic_alpha > 0:
        x = random_elastic(jax.random.fold_in(key, 5), x, cfg.elastic_alpha, cfg.elastic_sigma)
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


def train_transform(cfg: AugmentConfig, key: PRNGKeyArray, images: Images,
                    per_image: PerImage = "auto") -> Float[Array, "b h w 3"]:
    """`augment_one` per image (one key per image): uint8 in, ImageNet-normalised float out.

    With no policy, jitter or erasing (of either mode) this is flip (if cfg.hflip > 0) +
    normalise, batched. `per_image` says how a device's images go through `augment_one` (see
    `deit.perdevice.map_images`): 'auto' picks by backend, a test pins 'map' or 'vmap'.
    """
    images = jnp.asarray(images)
    if (cfg.auto_augment in (None, "", "none") and cfg.color_jitter <= 0 and cfg.random_erasing <= 0
            and not has_geometric(cfg)):
        x = images.astype(jnp.float32)
        if cfg.hflip > 0:
            flip = jax.random.uniform(key, (x.shape[0],)) < cfg.hflip
            x = jnp.where(flip[:, None, None, None], pix.flip_left_right(x), x)
        return normalize(x)
    keys = jax.random.split(key, images.shape[0])
    one = functools.partial(augment_one, cfg)
    return per_device(lambda _, im, ks: map_images(one, ks, im, per_image), (), (images, keys))


def eval_transform(images: Images) -> Float[Array, "b h w 3"]:
    """uint8 in, ImageNet-normalised float out: the model's input without augmentation."""
    return normalize(jnp.asarray(images))


__all__ = [
    "Images", "affine_coeffs", "apply_color_jitter", "apply_three_augment", "augment_one", "color_jitter",
    "elastic", "eval_transform", "has_affine", "has_geometric", "policy", "random_affine", "random_elastic",
    "random_hflip", "sample_affine", "sample_elastic", "sample_color_jitter", "sample_three_augment", "three_augment", "train_transform",
]
