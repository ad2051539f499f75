"""On-device augmentation: pure JAX functions over uint8 batches that arrive at model size.

The host only decodes, crops/resizes to `image_size` and batches (see `deit.crop`); all
per-pixel work happens here, on the device that holds the batch slice.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt8

from deit.config import AugmentConfig
from deit.model import normalize


def hflip(key: PRNGKeyArray, image: Float[Array, "h w c"], p: float) -> Float[Array, "h w c"]:
    return jnp.where(jax.random.bernoulli(key, p), image[:, ::-1], image)


def _train_one(cfg: AugmentConfig, key: PRNGKeyArray, image: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
    if cfg.hflip > 0:
        image = hflip(key, image, cfg.hflip)
    return image


def train_transform(cfg: AugmentConfig, key: PRNGKeyArray, images: UInt8[Array, "b h w 3"]) -> Float[Array, "b h w 3"]:
    """Per-image random transforms (one key per image), then ImageNet normalisation."""
    keys = jax.random.split(key, images.shape[0])
    x = jax.vmap(lambda k, im: _train_one(cfg, k, im))(keys, images.astype(jnp.float32))
    return normalize(x)


def eval_transform(images: UInt8[Array, "b h w 3"]) -> Float[Array, "b h w 3"]:
    return normalize(images)


def one_hot_targets(cfg: AugmentConfig, labels: Int[Array, " b"], num_labels: int) -> Float[Array, "b c"]:
    """One-hot targets; label smoothing for the ce criterion (deit3-jax applies none with bce)."""
    t = jax.nn.one_hot(labels, num_labels, dtype=jnp.float32)
    eps = cfg.label_smoothing if cfg.criterion == "ce" else 0.0
    return t * (1.0 - eps) + eps / num_labels


def mixup_cutmix(cfg: AugmentConfig, key: PRNGKeyArray, images: Float[Array, "b h w c"],
                 targets: Float[Array, "b n"]) -> tuple[Float[Array, "b h w c"], Float[Array, "b n"]]:
    """Batch-level Mixup or CutMix (chosen with probability 0.5 when both are on).

    Partners are the batch reversed (timm's rule); under a data-sharded mesh the flip is a
    collective, acceptable since it is one image-sized permute per step.
    """
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return images, targets
    k_sw, k_mix, k_cut, k_box = jax.random.split(key, 4)
    b, h, w, _ = images.shape
    partner_img, partner_t = images[::-1], targets[::-1]

    def do_mixup():
        lam = jax.random.beta(k_mix, cfg.mixup, cfg.mixup) if cfg.mixup > 0 else jnp.float32(1.0)
        return lam * images + (1 - lam) * partner_img, lam

    def do_cutmix():
        lam = jax.random.beta(k_cut, cfg.cutmix, cfg.cutmix) if cfg.cutmix > 0 else jnp.float32(1.0)
        cut = jnp.sqrt(1.0 - lam)
        ch, cw = (cut * h).astype(jnp.int32), (cut * w).astype(jnp.int32)
        cy, cx = jax.random.randint(k_box, (2,), 0, jnp.array([h, w]))
        y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
        x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
        yy, xx = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        box = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        lam = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)  # corrected to the clipped box
        return jnp.where(box[None, :, :, None], partner_img, images), lam

    if cfg.mixup > 0 and cfg.cutmix > 0:
        use_cut = jax.random.bernoulli(k_sw, 0.5)
        (im_m, lam_m), (im_c, lam_c) = do_mixup(), do_cutmix()
        mixed, lam = jnp.where(use_cut, im_c, im_m), jnp.where(use_cut, lam_c, lam_m)
    elif cfg.cutmix > 0:
        mixed, lam = do_cutmix()
    else:
        mixed, lam = do_mixup()
    lam = jnp.asarray(lam, jnp.float32)
    return mixed, lam * targets + (1 - lam) * partner_t
