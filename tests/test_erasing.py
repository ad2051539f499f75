"""Random erasing, both modes: 'torchvision' (deit3-jax: torchvision's RandomErasing on the
uint8 PIL image after colour jitter) against the installed torchvision itself, bit for bit where
the draws are given and statistically where they are not; 'pixel' (timm, on the normalised image)
where it sits in the pipeline. timm's 'pixel' statistics are in test_augment_stats.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import skimage.data
import torch
import torchvision.transforms.v2 as T2
import torchvision.transforms.v2.functional as F2
from PIL import Image

from deit import augment as A
from deit import erasing as E
from deit.config import AugmentConfig
from deit.model import IMAGENET_MEAN, IMAGENET_STD, normalize

N = 4000
P_MIN = 1e-3  # fixed seeds: a test fails only on a real difference in distribution
H, W, BG = 32, 40, 77  # non-square, so a swapped height / width shows; no N(0, 1) draw maps to 77


def same_distribution(ours, theirs):
    p = scipy.stats.ks_2samp(np.asarray(ours, np.float64), np.asarray(theirs, np.float64)).pvalue
    assert p > P_MIN, f"KS p-value {p:.2e}"


def boxes(images: np.ndarray, background) -> dict[str, np.ndarray]:
    """Box (top, left, h, w) of each erased image [n, H, W, 3] of a constant `background`: the
    pixels where any channel differs (an erased pixel keeps all three channels only if
    |z| >= 77 in each)."""
    mask = (images != background).any(-1)
    rows, cols = mask.any(2), mask.any(1)
    h, w = rows.sum(1), cols.sum(1)
    assert (mask.sum((1, 2)) == h * w).all(), "erased region is not one rectangle"
    return dict(top=rows.argmax(1), left=cols.argmax(1), h=h, w=w, mask=mask)


# The uint8 levels z ~ N(0, 1) takes through trunc-and-wrap, and their probabilities.
LEVELS = {0: (-1, 1), 1: (1, 2), 255: (-2, -1), 2: (2, 3), 254: (-3, -2)}


def level_counts(values: np.ndarray) -> np.ndarray:
    """Counts of levels 0, 1, 255, 2, 254 and of everything else."""
    counts = [(values == v).sum() for v in LEVELS]
    return np.asarray(counts + [values.size - sum(counts)])


# ----------------------------------------------------------------------------- exact kernel


def test_uint8_cast_equals_torch_assignment():
    """torchvision's erase assigns the float32 noise into the uint8 image tensor
    (`image[..., i:i+h, j:j+w] = v`): our mapping must be torch's, value for value."""
    rng = np.random.default_rng(0)
    edges = np.array([0.0, -0.0, 0.999, -0.999, 1.0, -1.0, 1.5, -1.5, 2.0, -2.0, 255.0, 255.5, 256.0,
                      -255.0, -256.0, -257.3, 300.7, -300.5, 1e-8, -1e-8], np.float32)
    z = np.concatenate([edges, rng.standard_normal(100_000), 300 * rng.standard_normal(100_000)]).astype(np.float32)
    t = torch.zeros(z.size, dtype=torch.uint8)
    t[:] = torch.from_numpy(z)
    np.testing.assert_array_equal(np.asarray(E.torch_uint8_cast(z)), t.numpy().astype(np.float32))
    np.testing.assert_array_equal(np.asarray(E.torch_uint8_cast(jnp.asarray(edges[:8]))),
                                  [0, 0, 0, 0, 1, 255, 1, 255])


def test_erase_equals_torchvision_kernel_on_pil():
    """Given box and noise, our erase + uint8 cast is torchvision's PIL erase kernel exactly."""
    a = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((W, H)))
    rng = np.random.default_rng(1)
    for i, j, h, w in [(0, 0, 5, 7), (3, 11, 20, 9), (H - 4, W - 6, 4, 6), (10, 0, 1, W - 1)]:
        z = (2 * rng.standard_normal((3, h, w))).astype(np.float32)
        ref = np.asarray(F2.erase(Image.fromarray(a), i, j, h, w, torch.from_numpy(z)))
        values = np.zeros((H, W, 3), np.float32)
        values[i:i + h, j:j + w] = z.transpose(1, 2, 0)
        ours = np.asarray(E.erase(a, (i, j, h, w), E.torch_uint8_cast(values)))
        np.testing.assert_array_equal(ours, ref.astype(np.float32))


# ----------------------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def erased():
    img = np.full((H, W, 3), BG, np.uint8)
    run = jax.jit(jax.vmap(lambda k: E.random_erasing(k, img, 1.0, "torchvision")))
    ours = np.asarray(run(jax.random.split(jax.random.key(0), N)))
    torch.manual_seed(0)
    tv, pil = T2.RandomErasing(p=1.0, value="random"), Image.fromarray(img)
    theirs = np.stack([np.asarray(tv(pil)) for _ in range(N)]).astype(np.float32)
    return ours, theirs


def test_torchvision_mode_box_matches_torchvision(erased):
    ours, theirs = (boxes(x, BG) for x in erased)
    assert (ours["h"] > 0).all() and (theirs["h"] > 0).all()  # p = 1 (a fit fails ~never here)
    for k in ("h", "w", "top", "left"):
        same_distribution(ours[k], theirs[k])
    same_distribution(ours["h"] * ours["w"], theirs["h"] * theirs["w"])
    same_distribution(np.log(ours["h"] / ours["w"]), np.log(theirs["h"] / theirs["w"]))
    # every position is reachable, the last one (box on the bottom / right edge) included
    for edge in (lambda b: b["top"] == 0, lambda b: b["top"] + b["h"] == H,
                 lambda b: b["left"] == 0, lambda b: b["left"] + b["w"] == W):
        table = [[edge(b).sum(), (~edge(b)).sum()] for b in (ours, theirs)]
        assert min(table[0][0], table[1][0]) > 0 and scipy.stats.chi2_contingency(table).pvalue > P_MIN, table
    for b in (ours, theirs):  # torchvision's limits: h < H, w < W, area <= 0.33 H W (+ rounding)
        assert b["h"].max() < H and b["w"].max() < W and (b["top"] + b["h"]).max() <= H
        assert (b["h"] * b["w"]).max() <= 0.33 * H * W + H + W


def test_torchvision_mode_values_match_torchvision(erased):
    ours, theirs = (x[boxes(x, BG)["mask"]].ravel() for x in erased)
    assert not np.isin(BG, ours) and not np.isin(BG, theirs)  # every erased channel is noise
    co, ct = level_counts(ours), level_counts(theirs)
    assert scipy.stats.chi2_contingency(np.stack([co, ct])).pvalue > P_MIN, (co, ct)
    # and both follow trunc(z) mod 256 of z ~ N(0, 1): 68% 0, 14% each 1 and 255, 2% each 2 and 254
    phi = scipy.stats.norm.cdf
    probs = np.asarray([phi(b) - phi(a) for a, b in LEVELS.values()])
    probs = np.append(probs, 1 - probs.sum())
    for counts in (co, ct):
        assert scipy.stats.chisquare(counts, probs * counts.sum()).pvalue > P_MIN, counts / counts.sum()
    assert abs(co[0] / co.sum() - 0.6827) < 0.005


@pytest.mark.parametrize("mode", ["torchvision", "pixel"])
def test_probability_is_respected(mode):
    img = np.full((24, 24, 3), BG, np.uint8)
    run = jax.jit(jax.vmap(lambda k: E.random_erasing(k, img, 0.25, mode)))
    share = (np.asarray(run(jax.random.split(jax.random.key(2), N))) != BG).any((1, 2, 3)).mean()
    tol = 4 * math.sqrt(0.25 * 0.75 / N)
    assert abs(share - 0.25) < tol, share
    if mode == "torchvision":  # torchvision skips when rand >= p
        torch.manual_seed(2)
        tv, pil = T2.RandomErasing(p=0.25, value="random"), Image.fromarray(img)
        theirs = np.mean([(np.asarray(tv(pil)) != BG).any() for _ in range(N)])
        assert abs(theirs - 0.25) < tol, theirs
    never = jax.jit(jax.vmap(lambda k: E.random_erasing(k, img, 0.0, mode)))(jax.random.split(jax.random.key(3), 64))
    assert (np.asarray(never) == BG).all()


# ----------------------------------------------------------------------------- place in the pipeline

MEAN, STD = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)


def _run(cfg: AugmentConfig, n: int = 48, size: int = 32) -> np.ndarray:
    x = np.full((n, size, size, 3), BG, np.uint8)
    return np.asarray(jax.jit(lambda k, im: A.train_transform(cfg, k, im))(jax.random.key(5), x))


def test_torchvision_mode_erases_uint8_after_jitter_before_normalise():
    """Erased levels are exactly the uint8 noise levels, normalised: not moved by the jitter
    (contrast / brightness would shift a 0 or 255), and a 0 becomes (0 - mean) / std."""
    cfg = AugmentConfig(random_erasing=1.0, random_erasing_mode="torchvision", color_jitter=0.4, hflip=0.0)
    out = _run(cfg)
    levels = out * STD + MEAN                           # back to [0, 1]
    q = np.round(levels * 255)
    np.testing.assert_allclose(levels * 255, q, atol=2e-3)  # on the integer grid: erased before normalising
    background = np.asarray([np.bincount(im[..., 0].astype(int).ravel()).argmax() for im in q])
    mask = (q != background[:, None, None, None]).any(-1)
    assert mask.any((1, 2)).all()
    values = q[mask]
    assert np.isin(values, [*range(6), *range(251, 256)]).all(), np.unique(values)  # |z| < 6
    zeros = (values == 0).all(-1)
    assert 0.25 < zeros.mean() < 0.45  # all three channels 0: 0.68 ** 3 = 0.32
    np.testing.assert_allclose(out[mask][zeros], np.broadcast_to(-MEAN / STD, (zeros.sum(), 3)), rtol=1e-6)


def test_pixel_mode_erases_after_normalise():
    """'pixel' noise is N(0, 1) in normalised units, off the uint8 grid."""
    cfg = AugmentConfig(random_erasing=1.0, random_erasing_mode="pixel", hflip=0.0)
    out = _run(cfg)
    background = np.asarray(normalize(jnp.full((1, 1, 3), BG, jnp.uint8)))[0, 0]
    mask = (np.abs(out - background) > 1e-6).any(-1)
    assert mask.any((1, 2)).all()
    noise = out[mask]
    assert abs(noise.mean()) < 0.03 and abs(noise.std() - 1) < 0.03
    off_grid = np.abs((noise * STD + MEAN) * 255 - np.round((noise * STD + MEAN) * 255)) > 1e-2
    assert off_grid.mean() > 0.9


def test_fast_path_only_without_erasing():
    x = np.full((4, 16, 16, 3), BG, np.uint8)
    for mode in ("torchvision", "pixel"):
        cfg = AugmentConfig(random_erasing=0.0, random_erasing_mode=mode, hflip=0.0)
        jaxpr = str(jax.make_jaxpr(lambda k, im: A.train_transform(cfg, k, im))(jax.random.key(0), x))
        assert "cond[" not in jaxpr and "scan[" not in jaxpr   # batched flip + normalise only
        cfg = AugmentConfig(random_erasing=0.5, random_erasing_mode=mode, hflip=0.0)
        out = np.asarray(A.train_transform(cfg, jax.random.key(0), x))
        assert not np.allclose(out, np.asarray(normalize(jnp.asarray(x))))
