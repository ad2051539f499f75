"""Training targets and batch mixing: one-hot (smoothed) targets, Mixup / CutMix as timm.

Mixing pairs images within each device's slice of the batch (see `mixup_cutmix`), so the step
stays free of cross-device traffic, as timm under DDP and deit3-jax under pmap.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from deit.config import AugmentConfig, LossConfig
from deit.imageops import Scalar
from deit.perdevice import per_device


def one_hot_targets(loss: LossConfig, labels: Int[Array | np.ndarray, " b"], num_labels: int) -> Float[Array, "b c"]:
    """One-hot targets; label smoothing for the ce criterion (deit3-jax applies none with bce).

    Smoothing as timm's: off = eps / C, on = 1 - eps + eps / C.
    """
    t = jax.nn.one_hot(jnp.asarray(labels), num_labels, dtype=jnp.float32)
    eps = loss.target_smoothing
    return t * (1.0 - eps) + eps / num_labels


def cutmix_box(key: PRNGKeyArray, lam: Scalar, h: int, w: int) -> tuple[Int[Array, "4"], Float[Array, ""]]:
    """timm's rand_bbox + correct_lam: a box of side int(sqrt(1 - lam) * side) centred uniformly,
    clipped to the image: (y0, y1, x0, x1) and the corrected lam = 1 - box area / (h w)."""
    cut = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
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


def mixup_cutmix(cfg: AugmentConfig, key: PRNGKeyArray, images: Float[Array | np.ndarray, "b h w c"],
                 targets: Float[Array | np.ndarray, "b n"]) -> tuple[Float[Array, "b h w c"], Float[Array, "b n"]]:
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
    images, targets = jnp.asarray(images), jnp.asarray(targets)
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return images, targets

    return per_device(lambda index, k, x, t: _mix_local(cfg, jax.random.fold_in(k, index), x, t), (key,),
                      (images, targets))


__all__ = ["cutmix_box", "mixup_cutmix", "one_hot_targets"]
