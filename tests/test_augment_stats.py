"""Random augmentation, statistically: the distributions our samplers draw against the ones
timm / torchvision draw (two-sample KS tests at a tight p threshold, fixed seeds), and the
independence of the draws between the images of a batch and between repeated copies."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import skimage.data
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.mixup import cutmix_bbox_and_lam
from timm.data.random_erasing import RandomErasing

from deit import augment as A
from deit import crop
from deit import erasing as E
from deit import mixing as M
from deit import randaugment as RA
from deit.config import AugmentConfig, LossConfig

N = 4000
P_MIN = 1e-3  # a fixed-seed test: fails only on a real difference in distribution


def same_distribution(ours, theirs):
    p = scipy.stats.ks_2samp(np.asarray(ours, np.float64), np.asarray(theirs, np.float64)).pvalue
    assert p > P_MIN, f"KS p-value {p:.2e}"


# ----------------------------------------------------------------------------- host crops


@pytest.mark.parametrize("size", [(500, 375), (200, 640)])
def test_rrc_box_distribution_matches_torchvision(size):
    width, height = size
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    img = Image.new("RGB", size)
    ours = np.array([crop.rrc_box(rng, width, height) for _ in range(N)])  # left, top, w, h
    theirs = np.array([T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(N)])  # i, j, h, w
    same_distribution(ours[:, 2] * ours[:, 3] / (width * height), theirs[:, 2] * theirs[:, 3] / (width * height))
    same_distribution(np.log(ours[:, 2] / ours[:, 3]), np.log(theirs[:, 3] / theirs[:, 2]))
    same_distribution(ours[:, 0] / width, theirs[:, 1] / width)
    same_distribution(ours[:, 1] / height, theirs[:, 0] / height)
    assert (ours[:, 0] + ours[:, 2] <= width).all() and (ours[:, 1] + ours[:, 3] <= height).all()


def assert_bicubic_equal(ours, theirs):
    """crop.resize recomputes Pillow's bicubic in float32 instead of 22-bit fixed point: a value
    may be off by 1 where the exact result sits on a rounding boundary (~2 in 10^5)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_train_and_eval_crops_equal_torchvision():
    img = Image.fromarray(skimage.data.chelsea())  # 451 x 300
    rng = np.random.default_rng(1)
    for _ in range(4):
        state = rng.bit_generator.state
        left, top, w, h = crop.rrc_box(rng, *img.size)
        rng.bit_generator.state = state
        ours = crop.train_crop(rng, img, 96, "rrc")
        ref = TF.resized_crop(img, top, left, h, w, [96, 96], T.InterpolationMode.BICUBIC)
        assert_bicubic_equal(ours, ref)
    # Simple Random Crop: torchvision Resize(96, bicubic) + RandomCrop(96, padding=4, reflect),
    # offsets replayed from the generator (top then left, uniform over the 9 x (W' - 88) positions).
    padded = np.asarray(TF.pad(TF.resize(img, 96, T.InterpolationMode.BICUBIC), 4, padding_mode="reflect"))
    tops = []
    for _ in range(600):
        state = rng.bit_generator.state
        out = crop.train_crop(rng, img, 96, "src")
        rng.bit_generator.state = state
        t, l = int(rng.integers(0, 9)), int(rng.integers(0, padded.shape[1] - 96 + 1))
        assert_bicubic_equal(out, padded[t:t + 96, l:l + 96])
        tops.append(t)
    assert scipy.stats.chisquare(np.bincount(tops, minlength=9)).pvalue > P_MIN
    assert_bicubic_equal(crop.train_crop(rng, img, 96, "none"),
                         TF.center_crop(TF.resize(img, 96, T.InterpolationMode.BICUBIC), 96))
    for ratio in (0.875, 1.0):
        ref = TF.center_crop(TF.resize(img, int(96 / ratio), T.InterpolationMode.BICUBIC), 96)
        assert_bicubic_equal(crop.eval_crop(img, 96, ratio), ref)


# ----------------------------------------------------------------------------- Mixup / CutMix


def _lams(cfg, n=N, size=16):
    """lam of n independent batches of two images (from the mixed target of image 0)."""
    x = jnp.stack([jnp.zeros((size, size, 3)), jnp.ones((size, size, 3))])
    t = M.one_hot_targets(LossConfig(), jnp.arange(2), 2)
    run = jax.jit(jax.vmap(lambda k: M.mixup_cutmix(cfg, k, x, t)))
    images, targets = run(jax.random.split(jax.random.key(0), n))
    return np.asarray(targets[:, 0, 0]), np.asarray(images[:, 0])


def test_mixup_lambda_is_beta():
    lam, images = _lams(AugmentConfig(mixup=0.8, cutmix=0.0))
    assert scipy.stats.kstest(lam, scipy.stats.beta(0.8, 0.8).cdf).pvalue > P_MIN
    np.testing.assert_allclose(images[:, 0, 0, 0], 1 - lam, atol=1e-6)  # image 0 = lam*0 + (1-lam)*1


def test_cutmix_lambda_matches_timm():
    lam, images = _lams(AugmentConfig(mixup=0.0, cutmix=1.0))
    np.random.seed(0)
    theirs = [cutmix_bbox_and_lam((2, 3, 16, 16), np.random.beta(1.0, 1.0))[1] for _ in range(N)]
    same_distribution(lam, theirs)
    np.testing.assert_allclose(images.mean((1, 2, 3)), 1 - lam, atol=1e-6)  # box share = 1 - lam


def test_mixup_cutmix_switch_is_fair():
    lam, images = _lams(AugmentConfig(mixup=0.8, cutmix=1.0))
    cut = np.isin(images, [0.0, 1.0]).all((1, 2, 3)) & (np.abs(lam - 0.5) > 1e-3)
    share = cut.mean()
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / N), share


# ----------------------------------------------------------------------------- random erasing


def test_erasing_area_and_probability_match_timm():
    h = w = 48
    run = jax.jit(jax.vmap(lambda k: E.random_erasing(k, jnp.zeros((h, w, 3)), 1.0, "pixel")))
    out = np.asarray(run(jax.random.split(jax.random.key(0), N)))
    ours = (out != 0).all(-1).mean((1, 2))
    erasing = RandomErasing(1.0, mode="pixel", device="cpu")
    import random
    random.seed(0)
    torch.manual_seed(0)
    theirs = [float((erasing(torch.zeros(3, h, w)) != 0).all(0).float().mean()) for _ in range(N)]
    same_distribution(ours, theirs)
    assert ours.min() >= 0.015 and ours.max() <= 1 / 3 + 0.02
    noise = out[ours > 0.2]
    noise = noise[noise != 0]
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02  # N(0, 1) per pixel and channel
    p = jax.jit(jax.vmap(lambda k: E.random_erasing(k, jnp.zeros((h, w, 3)), 0.25, "pixel")))
    erased = np.asarray((p(jax.random.split(jax.random.key(1), N)) != 0).any((1, 2, 3)))
    assert abs(erased.mean() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / N)


# ----------------------------------------------------------------------------- policy draws


def test_rand_augment_draws():
    ra = RA.parse_rand_augment("rand-m9-mstd0.5-inc1")
    p = jax.jit(jax.vmap(lambda k: RA.sample_rand_augment(ra, k)))(jax.random.split(jax.random.key(0), N))
    ops = np.asarray(p["op"]).ravel()
    assert scipy.stats.chisquare(np.bincount(ops, minlength=15)).pvalue > P_MIN
    assert abs(np.asarray(p["apply"]).mean() - 0.5) < 0.02
    assert abs(np.asarray(p["negate"]).mean() - 0.5) < 0.02
    mag = np.asarray(p["magnitude"]).ravel()
    assert mag.max() <= 10.0 and abs(mag.mean() - 9.0) < 0.03 and abs(mag.std() - 0.5) < 0.03
    # the two layers of one image draw independently
    assert scipy.stats.chi2_contingency(np.histogram2d(*np.asarray(p["op"]).T, bins=15)[0]).pvalue > P_MIN


def test_three_augment_and_jitter_draws():
    keys = jax.random.split(jax.random.key(0), N)
    p = jax.jit(jax.vmap(A.sample_three_augment))(keys)
    assert scipy.stats.chisquare(np.bincount(np.asarray(p["choice"]), minlength=3)).pvalue > P_MIN
    assert scipy.stats.kstest(np.asarray(p["sigma"]), scipy.stats.uniform(0.1, 1.9).cdf).pvalue > P_MIN
    j = jax.jit(jax.vmap(lambda k: A.sample_color_jitter(k, 0.3, 0.3, 0.3)))(keys)
    f = np.asarray(j["factors"])
    for c in range(3):
        assert scipy.stats.kstest(f[:, c], scipy.stats.uniform(0.7, 0.6).cdf).pvalue > P_MIN
    orders = np.asarray(j["order"]) @ np.array([9, 3, 1])
    counts = np.unique(orders, return_counts=True)[1]
    assert len(counts) == 6 and scipy.stats.chisquare(counts).pvalue > P_MIN


# ----------------------------------------------------------------------------- independence


def test_images_and_repeated_copies_are_augmented_independently():
    """A batch laid out as the loader does with augment_repeats=3 (copy c of sample j at
    c * n + j): every image, and every copy of a sample, gets its own flip and policy draws."""
    cfg = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", hflip=0.5)
    ra = RA.parse_rand_augment(cfg.auto_augment)
    a = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((24, 24)))
    c = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((24, 24)))
    n, k, seeds = 32, 3, 8
    samples = np.stack([a if j % 2 else c for j in range(n)])
    x = jnp.asarray(np.concatenate([samples] * k))             # copy c of sample j at c * n + j
    run = jax.jit(lambda key: A.train_transform(cfg, key, x))
    identical = []
    for seed in range(seeds):
        out = np.asarray(run(jax.random.key(seed))).reshape(k, n, -1)
        identical += [len({out[cc, j].tobytes() for cc in range(k)}) == 1 for j in range(n)]
    # all 3 copies equal only when none got an op and all flipped alike: 0.25**3 / 4 = 0.4%
    assert np.mean(identical) < 0.03

    # The policy draws per image, as train_transform makes them: first op of copy 0 vs copy 1
    # of the same sample, and of neighbouring images, are independent.
    def first_ops(key):
        keys = jax.random.split(key, n * k)
        pol = jax.vmap(lambda kk: RA.sample_rand_augment(ra, jax.random.split(kk, 4)[1])["op"][0])(keys)
        return pol.reshape(k, n)

    ops = np.asarray(jax.jit(jax.vmap(first_ops))(jax.random.split(jax.random.key(1), 200)))  # [200, k, n]
    for u, v in ((ops[:, 0], ops[:, 1]), (ops[:, 0, :-1], ops[:, 0, 1:])):
        table = np.histogram2d(u.ravel(), v.ravel(), bins=15)[0]
        assert scipy.stats.chi2_contingency(table).pvalue > P_MIN

    # Flips: Bernoulli(0.5) per image, independent between copies and between neighbours.
    cfg_flip = AugmentConfig(hflip=0.5)
    flip_run = jax.jit(lambda key: A.train_transform(cfg_flip, key, x))
    ref = np.asarray(A.eval_transform(x))
    d = np.stack([~np.isclose(np.asarray(flip_run(jax.random.key(s))), ref, atol=1e-5).all((1, 2, 3))
                  for s in range(40)]).reshape(40, k, n)
    assert abs(d.mean() - 0.5) < 0.05
    for u, v in ((d[:, 0], d[:, 1]), (d[:, 0, :-1], d[:, 0, 1:])):
        assert scipy.stats.chi2_contingency(np.histogram2d(u.ravel(), v.ravel(), bins=2)[0]).pvalue > P_MIN
