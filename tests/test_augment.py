"""On-device augmentation: every op against PIL / timm / torchvision on real photographs, the
policies against timm's ops with the same random draws, and the batched train transform
(compiles once, stays data-sharded, leaves tiny-digits' transform a plain normalisation)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torchvision.transforms.functional as TF
from beartype.roar import BeartypeCallHintParamViolation
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import TypeCheckError
from PIL import Image, ImageFilter, ImageOps
from timm.data import auto_augment as taa
from timm.data.constants import IMAGENET_DEFAULT_MEAN

from deit import augment as A
from deit import imageops as O
from deit import mixing as M
from deit import perdevice
from deit import randaugment as RA
from deit.config import AugmentConfig, LossConfig, from_flat
from deit.model import IMAGENET_MEAN, IMAGENET_STD, normalize

ROOT = Path(__file__).resolve().parents[1]
BILINEAR, BICUBIC = Image.Resampling.BILINEAR, Image.Resampling.BICUBIC
COLOUR_TOL, GEOMETRIC_TOL = 1.0, 2.0  # mean |ours - PIL| per pixel, intensity levels


def _photos() -> dict[str, np.ndarray]:
    astro = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((224, 224), Image.Resampling.BICUBIC))
    coffee = np.asarray(Image.fromarray(skimage.data.coffee()).resize((131, 97), Image.Resampling.BICUBIC))
    return {"astronaut224": astro, "chelsea300x451": skimage.data.chelsea(), "coffee97x131": coffee}


PHOTOS = _photos()


def mad(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).mean())


def pil_posterize(im: Image.Image, bits: int, **_) -> Image.Image:
    """timm's posterize; keeping 0 bits gives black, as Pillow did before it started rejecting
    bits=0 (RandAugment's PosterizeIncreasing reaches 0 bits at magnitude 10)."""
    return Image.new(im.mode, im.size, 0) if bits == 0 else taa.posterize(im, bits)


def pil_affine(im: Image.Image, coeffs, resample=BILINEAR) -> Image.Image:
    return im.transform(im.size, Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=O.FILL)


# (name, PIL reference, ours, tolerance); each `ours` is jitted once per photo size.
OPS = [
    ("auto_contrast", ImageOps.autocontrast, O.auto_contrast, COLOUR_TOL),
    ("equalize", ImageOps.equalize, O.equalize, COLOUR_TOL),
    ("invert", ImageOps.invert, O.invert, COLOUR_TOL),
    ("posterize2", lambda im: taa.posterize(im, 2), lambda x: O.posterize(x, 2), COLOUR_TOL),
    ("posterize0", lambda im: pil_posterize(im, 0), lambda x: O.posterize(x, 0), COLOUR_TOL),
    ("solarize100", lambda im: taa.solarize(im, 100), lambda x: O.solarize(x, 100), COLOUR_TOL),
    ("solarize_add60", lambda im: taa.solarize_add(im, 60), lambda x: O.solarize_add(x, 60), COLOUR_TOL),
    ("color0.2", lambda im: taa.color(im, 0.2), lambda x: O.color(x, 0.2), COLOUR_TOL),
    ("color1.8", lambda im: taa.color(im, 1.8), lambda x: O.color(x, 1.8), COLOUR_TOL),
    ("contrast0.3", lambda im: taa.contrast(im, 0.3), lambda x: O.contrast(x, 0.3), COLOUR_TOL),
    ("contrast1.9", lambda im: taa.contrast(im, 1.9), lambda x: O.contrast(x, 1.9), COLOUR_TOL),
    ("brightness0.4", lambda im: taa.brightness(im, 0.4), lambda x: O.brightness(x, 0.4), COLOUR_TOL),
    ("brightness1.7", lambda im: taa.brightness(im, 1.7), lambda x: O.brightness(x, 1.7), COLOUR_TOL),
    ("sharpness0.1", lambda im: taa.sharpness(im, 0.1), lambda x: O.sharpness(x, 0.1), COLOUR_TOL),
    ("sharpness1.9", lambda im: taa.sharpness(im, 1.9), lambda x: O.sharpness(x, 1.9), COLOUR_TOL),
    ("grayscale", lambda im: TF.to_grayscale(im, 3), O.grayscale, COLOUR_TOL),
    ("blur0.1", lambda im: im.filter(ImageFilter.GaussianBlur(0.1)), lambda x: O.gaussian_blur(x, 0.1), COLOUR_TOL),
    ("blur1.3", lambda im: im.filter(ImageFilter.GaussianBlur(1.3)), lambda x: O.gaussian_blur(x, 1.3), COLOUR_TOL),
    ("blur2", lambda im: im.filter(ImageFilter.GaussianBlur(2.0)), lambda x: O.gaussian_blur(x, 2.0), COLOUR_TOL),
    ("blur4.5", lambda im: im.filter(ImageFilter.GaussianBlur(4.5)), lambda x: O.gaussian_blur(x, 4.5), COLOUR_TOL),
    ("hflip", lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), O.hflip, COLOUR_TOL),
    ("rotate23", lambda im: im.rotate(23.4, BILINEAR, fillcolor=O.FILL), lambda x: O.rotate(x, 23.4), GEOMETRIC_TOL),
    ("rotate-30", lambda im: im.rotate(-30.0, BILINEAR, fillcolor=O.FILL), lambda x: O.rotate(x, -30.0),
     GEOMETRIC_TOL),
    ("shear_x0.3", lambda im: pil_affine(im, (1, 0.3, 0, 0, 1, 0)), lambda x: O.shear_x(x, 0.3), GEOMETRIC_TOL),
    ("shear_y-0.2", lambda im: pil_affine(im, (1, 0, 0, -0.2, 1, 0)), lambda x: O.shear_y(x, -0.2), GEOMETRIC_TOL),
    ("translate_x40.5", lambda im: pil_affine(im, (1, 0, 40.5, 0, 1, 0)), lambda x: O.translate_x(x, 40.5),
     GEOMETRIC_TOL),
    ("translate_y-33.3", lambda im: pil_affine(im, (1, 0, 0, 0, 1, -33.3)), lambda x: O.translate_y(x, -33.3),
     GEOMETRIC_TOL),
    ("rotate17_bicubic", lambda im: im.rotate(17.0, BICUBIC, fillcolor=O.FILL),
     lambda x: O.rotate(x, 17.0, resample="bicubic"), GEOMETRIC_TOL),
    ("shear_y0.25_bicubic", lambda im: pil_affine(im, (1, 0, 0, 0.25, 1, 0), BICUBIC),
     lambda x: O.shear_y(x, 0.25, resample="bicubic"), GEOMETRIC_TOL),
    ("translate_x-20.7_bicubic", lambda im: pil_affine(im, (1, 0, -20.7, 0, 1, 0), BICUBIC),
     lambda x: O.translate_x(x, -20.7, resample="bicubic"), GEOMETRIC_TOL),
]


@pytest.mark.parametrize("name,ref,ours,tol", OPS, ids=[o[0] for o in OPS])
def test_op_matches_pil(name, ref, ours, tol):
    f = jax.jit(ours)
    for photo, a in PHOTOS.items():
        out = f(jnp.asarray(a))
        assert out.dtype == jnp.float32 and out.shape == a.shape
        expected = np.asarray(ref(Image.fromarray(a)))
        err = mad(out, expected)
        assert err <= tol, f"{name} on {photo}: mean abs diff {err:.3f} > {tol}"
        # Faithful well beyond the tolerance: PIL's own rounding is reproduced.
        assert err <= 0.1, f"{name} on {photo}: mean abs diff {err:.3f}"


def test_ops_accept_uint8_and_float_alike():
    a = PHOTOS["coffee97x131"]
    for f in (O.equalize, lambda x: O.rotate(x, 10.0), lambda x: O.contrast(x, 1.5), lambda x: O.gaussian_blur(x, 1.0)):
        np.testing.assert_array_equal(np.asarray(f(jnp.asarray(a))), np.asarray(f(jnp.asarray(a, jnp.float32))))


def test_geometric_fill_is_timm_imagenet_mean():
    assert O.FILL == (124, 116, 104)
    out = np.asarray(O.translate_x(jnp.asarray(PHOTOS["coffee97x131"]), 200.0))  # everything moved out
    assert (out == np.asarray(O.FILL, np.float32)).all()


def test_fill_constants_are_deit3_jax_and_timm_rules():
    mean = np.array(IMAGENET_DEFAULT_MEAN)
    assert O.DEIT3_JAX_FILL == tuple((mean * 0xFF).astype(int)) == (123, 116, 103)  # deit3-jax's img_mean
    assert O.FILL == tuple(min(255, round(255 * x)) for x in mean)                  # timm create_transform's
    assert RA.GEOMETRIC_FILLS == {"deit3-jax": O.DEIT3_JAX_FILL, "timm": O.FILL}


def _colours(image) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in px) for px in np.asarray(image).reshape(-1, 3)}


@pytest.mark.parametrize("fill", [O.DEIT3_JAX_FILL, O.FILL], ids=["deit3-jax", "timm"])
@pytest.mark.parametrize("op", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_rand_augment_geometric_ops_fill(op, fill):
    """On a black image a geometric op leaves black and its fill colour only."""
    ra = RA.RandAugment(num_layers=1, magnitude=10.0, prob=1.0, ops=(op,), fill=fill)
    for seed in range(2):  # both signs, both resamplings over the seeds
        out = RA.rand_augment(ra, jax.random.key(seed), np.zeros((40, 48, 3), np.uint8))
        assert _colours(out) == {(0, 0, 0), fill}
    arg = RA.op_argument(op, 5.0, False, 16, 16)
    assert _colours(RA.apply_op(op, np.zeros((16, 16, 3), np.uint8), arg, fill=fill)) == {(0, 0, 0), fill}


@pytest.mark.parametrize("name", ["deit3-jax", "timm"])
def test_train_transform_uses_configured_geometric_fill(name):
    cfg = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", hflip=0.0, geometric_fill=name)
    want, other = RA.GEOMETRIC_FILLS[name], RA.GEOMETRIC_FILLS["timm" if name == "deit3-jax" else "deit3-jax"]
    black = np.zeros((32, 24, 24, 3), np.uint8)
    out = np.asarray(jax.jit(lambda k, x: A.train_transform(cfg, k, x))(jax.random.key(0), black))
    levels = np.round((out * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)) * 255).astype(int)
    seen = set().union(*(_colours(im) for im in levels))
    assert want in seen and other not in seen
    # policy() is cached per (string, fill): the two fills are two policies
    assert A.policy(cfg.auto_augment, want).args[0].fill == want
    assert A.policy(cfg.auto_augment, want) is not A.policy(cfg.auto_augment, other)
    assert RA.parse_rand_augment(cfg.auto_augment).fill == O.FILL  # timm's rule unless told


# numpy inputs and Python / numpy scalars, for every public function: tests/test_numpy_inputs.py


def test_rejects_bad_shapes():
    with pytest.raises((TypeCheckError, BeartypeCallHintParamViolation)):
        O.equalize(jnp.zeros((8, 8, 4), jnp.uint8))
    with pytest.raises((TypeCheckError, BeartypeCallHintParamViolation)):
        A.train_transform(AugmentConfig(), jax.random.key(0), jnp.zeros((8, 8, 3), jnp.uint8))


# ----------------------------------------------------------------------------- RandAugment


def test_parse_rand_augment():
    ra = RA.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (ra.num_layers, ra.magnitude, ra.magnitude_std, ra.prob, ra.magnitude_max) == (2, 9.0, 0.5, 0.5, 10.0)
    assert ra.ops == RA.RAND_INCREASING_TRANSFORMS == tuple(taa._RAND_INCREASING_TRANSFORMS)
    assert ra.interpolation == "random"  # timm's default when no interpolation is configured
    assert RA.parse_rand_augment("rand-m7-n3-p0.8-mstd101-mmax12").ops == tuple(taa._RAND_TRANSFORMS)
    ra = RA.parse_rand_augment("rand-m7-n3-p0.8-mstd101-mmax12")
    assert (ra.num_layers, ra.magnitude, ra.prob, ra.magnitude_std, ra.magnitude_max) == (3, 7.0, 0.8, np.inf, 12.0)
    for bad in ("rand-x3", "augmix-m3", "rand-m"):
        with pytest.raises(ValueError):
            RA.parse_rand_augment(bad)
    with pytest.raises(ValueError, match="auto_augment"):
        A.policy("v0")


@pytest.mark.parametrize("name", sorted(set(taa._RAND_TRANSFORMS + taa._RAND_INCREASING_TRANSFORMS)))
def test_op_argument_matches_timm_level_to_arg(name, monkeypatch):
    hparams = dict(translate_const=100, img_mean=O.FILL)
    for negate in (False, True):
        # timm negates when random.random() > 0.5
        monkeypatch.setattr(taa.random, "random", lambda: 0.9 if negate else 0.1)
        for m in (0.0, 1.3, 5.0, 9.0, 9.7, 10.0):
            level_fn = taa.LEVEL_TO_ARG[name]
            want = level_fn(m, hparams)[0] if level_fn is not None else 0.0
            if name.endswith("Rel"):
                want *= 96 if "X" in name else 80  # timm multiplies by the image side in the op
            got = float(RA.op_argument(name, m, negate, 80, 96))
            assert got == pytest.approx(want, abs=1e-4), (name, m, negate)


@pytest.mark.parametrize("config,fill", [("rand-m9-mstd0.5-inc1", O.DEIT3_JAX_FILL), ("rand-m10-n3-p1.0", O.FILL)],
                         ids=["deit3-jax-fill", "timm-fill"])
def test_rand_augment_matches_timm_ops_with_same_draws(config, fill):
    """Our policy vs timm's ops applied in PIL with the draws our sampler made; timm gets the
    same fill colour (its `img_mean`) as ours."""
    ra = RA.parse_rand_augment(config, fill)
    a = PHOTOS["astronaut224"]
    h, w = a.shape[:2]
    hp = dict(translate_const=int(0.45 * 224), img_mean=fill)
    assert all(op.kwargs["fillcolor"] == fill for op in taa.rand_augment_transform(config, hp).ops)
    run = jax.jit(lambda k, x: (RA.sample_rand_augment(ra, k), RA.rand_augment(ra, k, x)))
    names_seen = set()
    for seed in range(24):
        params, out = run(jax.random.key(seed), jnp.asarray(a))
        im, geometric = Image.fromarray(a), False
        for layer in range(ra.num_layers):
            if not bool(params["apply"][layer]):
                continue
            name = ra.ops[int(params["op"][layer])]
            names_seen.add(name)
            geometric |= name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
            arg = float(RA.op_argument(name, params["magnitude"][layer], params["negate"][layer], h, w))
            if name.endswith("Rel"):  # timm's op takes the fraction
                arg /= w if "X" in name else h
            args = () if name in ("AutoContrast", "Equalize", "Invert") else (arg,)
            if name.startswith(("Posterize", "Solarize")):
                args = (int(arg),)
            op = pil_posterize if name.startswith("Posterize") else taa.NAME_TO_OP[name]
            resample = BICUBIC if bool(params["bicubic"][layer]) else BILINEAR
            im = op(im, *args, fillcolor=hp["img_mean"], resample=resample)
        err = mad(out, np.asarray(im))
        assert err <= (GEOMETRIC_TOL if geometric else COLOUR_TOL), (seed, params, err)
    assert len(names_seen) >= 8


def test_three_augment_matches_pil():
    a = PHOTOS["chelsea300x451"]
    run = jax.jit(lambda k, x: (A.sample_three_augment(k), A.three_augment(k, x)))
    seen = set()
    for seed in range(12):
        params, out = run(jax.random.key(seed), jnp.asarray(a))
        choice, sigma = int(params["choice"]), float(params["sigma"])
        seen.add(choice)
        assert 0.1 <= sigma <= 2.0
        im = Image.fromarray(a)
        ref = [lambda: TF.to_grayscale(im, 3), lambda: ImageOps.solarize(im, 128),
               lambda: im.filter(ImageFilter.GaussianBlur(sigma))][choice]()
        assert mad(out, np.asarray(ref)) <= 0.1, (choice, sigma)
    assert seen == {0, 1, 2}
    # timm's '3a' ops are the same operations: Desaturate at magnitude 10 is the grey image,
    # Solarize at magnitude 5 thresholds at 128.
    im = Image.fromarray(a)
    np.testing.assert_array_equal(np.asarray(taa.desaturate(im, 1.0)), np.asarray(TF.to_grayscale(im, 3)))
    assert taa._solarize_level_to_arg(5, {})[0] == 128


def test_color_jitter_matches_torchvision_with_same_draws():
    a = PHOTOS["coffee97x131"]
    run = jax.jit(lambda k, x: (A.sample_color_jitter(k, 0.4, 0.4, 0.4), A.color_jitter(k, x, 0.4, 0.4, 0.4)))
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for seed in range(8):
        params, out = run(jax.random.key(seed), jnp.asarray(a))
        factors = np.asarray(params["factors"])
        assert ((factors >= 0.6) & (factors <= 1.4)).all()
        im = Image.fromarray(a)
        for j in np.asarray(params["order"]):
            im = adjust[j](im, float(factors[j]))
        assert mad(out, np.asarray(im)) <= COLOUR_TOL


def test_random_affine_matches_torchvision_with_same_draws():
    a = PHOTOS["coffee97x131"]
    h, w = a.shape[:2]
    run = jax.jit(lambda k, x: (A.sample_affine(k, 20, 0.1, 0.2, 15, (h, w)), A.random_affine(k, x, 20, 0.1, 0.2, 15)))
    for seed in range(8):
        p, out = run(jax.random.key(seed), jnp.asarray(a))
        tx, ty = (float(v) for v in p["translate"])
        assert tx == round(tx) and ty == round(ty) and abs(tx) <= round(0.1 * w) and abs(ty) <= round(0.1 * h)
        assert abs(float(p["angle"])) <= 20 and abs(float(p["shear"])) <= 15 and 0.8 <= float(p["scale"]) <= 1.2
        ref = TF.affine(Image.fromarray(a), angle=float(p["angle"]), translate=[int(tx), int(ty)],
                        scale=float(p["scale"]), shear=[float(p["shear"]), 0.0],
                        interpolation=TF.InterpolationMode.BILINEAR, fill=0)
        diff = np.abs(np.asarray(out).astype(int) - np.asarray(ref).astype(int))
        assert diff.mean() <= 0.05 and diff.max() <= 1, (seed, diff.mean(), diff.max())  # f32 vs double maps


def test_elastic_matches_torchvision_with_same_displacement():
    import torch

    a = PHOTOS["coffee97x131"]
    h, w = a.shape[:2]
    for seed, (alpha, sigma) in enumerate([(50.0, 5.0), (80.0, 3.0), (20.0, 0.0)]):
        d = A.sample_elastic(jax.random.key(seed), alpha, sigma, (h, w))
        if sigma > 0:  # the field: torchvision's blur of the same uniform noise, times alpha / 2
            u = jax.random.uniform(jax.random.key(seed), (2, h, w), minval=-1.0, maxval=1.0)
            k = int(8 * sigma + 1) + (1 - int(8 * sigma + 1) % 2)
            blurred = TF.gaussian_blur(torch.from_numpy(np.asarray(u))[:, None], [k, k], [sigma, sigma])
            np.testing.assert_allclose(np.asarray(d), blurred[:, 0].permute(1, 2, 0).numpy() * alpha / 2, atol=1e-4)
        grid = torch.from_numpy(np.asarray(d) * (2.0 / np.array([w, h], np.float32)))[None]  # pixels -> grid units
        ref = TF.elastic_transform(Image.fromarray(a), grid, interpolation=TF.InterpolationMode.BILINEAR)
        diff = np.abs(np.asarray(A.elastic(a, d)).astype(int) - np.asarray(ref).astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01, (alpha, sigma, diff.max(), diff.mean())
    moved = A.random_elastic(jax.random.key(0), a, 50.0, 5.0)
    assert moved.shape == a.shape and not np.array_equal(np.asarray(moved), a)


def test_affine_is_off_by_default_and_draws_apart_from_the_other_ops():
    assert not A.has_geometric(AugmentConfig()) and all(
        not A.has_geometric(from_flat(json.loads(f.read_text())).augment)
        for f in (ROOT / "recipes").glob("deit*.json"))
    x, key = jnp.asarray(batch(2, 32)[0]), jax.random.key(5)
    jitter = AugmentConfig(color_jitter=0.3, hflip=0.0, random_crop="none")
    both = AugmentConfig(color_jitter=0.3, hflip=0.0, random_crop="none", affine_degrees=10.0, affine_scale=0.1)
    moved = A.random_affine(jax.random.fold_in(key, 4), x, 10, 0, 0.1, 0)
    assert not np.array_equal(np.asarray(moved), np.asarray(x, np.float32))
    k_jitter = jax.random.split(key, 4)[2]
    expect = normalize(A.color_jitter(k_jitter, moved, 0.3, 0.3, 0.3))
    np.testing.assert_allclose(np.asarray(A.augment_one(both, key, x)), np.asarray(expect), atol=1e-5)
    np.testing.assert_allclose(np.asarray(A.augment_one(jitter, key, x)),
                               np.asarray(normalize(A.color_jitter(k_jitter, x, 0.3, 0.3, 0.3))), atol=1e-5)


# ----------------------------------------------------------------------------- batch transforms

DEIT = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25, mixup=0.8, cutmix=1.0,
                     augment_repeats=3)
DEIT_LOSS = LossConfig(label_smoothing=0.1)
DEIT3 = AugmentConfig(auto_augment="3a", color_jitter=0.3, mixup=0.8, cutmix=1.0,
                      augment_repeats=3, random_crop="src")
DEIT3_LOSS = LossConfig(criterion="bce")


def batch(n: int = 8, size: int = 32) -> np.ndarray:
    a = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.Resampling.BICUBIC))
    c = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((size, size), Image.Resampling.BICUBIC))
    return np.stack([a, c] * (n // 2))


def test_tiny_digits_transform_is_affine_then_normalisation():
    """The quickstart's per-image transform: torchvision's RandomAffine (and ElasticTransform
    where set; no crop, no flip, no policy), normalised; Mixup as configured and smoothed one-hot targets."""
    full = from_flat(json.loads((ROOT / "recipes" / "tiny-digits.json").read_text()))
    cfg = full.augment
    assert cfg.auto_augment is None and cfg.hflip == 0 and cfg.random_crop == "none" and cfg.cutmix == 0
    assert A.has_affine(cfg) and cfg.color_jitter == cfg.random_erasing == 0
    x, key = jnp.asarray(batch(4, 32)), jax.random.key(0)
    out = jax.jit(lambda k, im: A.train_transform(cfg, k, im))(key, x)

    def one(k, im):
        im = A.random_affine(jax.random.fold_in(k, 4), im, cfg.affine_degrees, cfg.affine_translate,
                             cfg.affine_scale, cfg.affine_shear)
        if cfg.elastic_alpha > 0:
            im = A.random_elastic(jax.random.fold_in(k, 5), im, cfg.elastic_alpha, cfg.elastic_sigma)
        return normalize(im)

    expect = jnp.stack([one(k, im) for k, im in zip(jax.random.split(key, 4), x)])
    np.testing.assert_allclose(np.asarray(out), np.asarray(expect), atol=1e-5)
    t = M.one_hot_targets(full.loss, jnp.array([1, 2, 3, 4]), 10)
    np.testing.assert_allclose(np.asarray(t.sum(1)), 1.0, rtol=1e-6)
    assert float(t[0, 1]) == pytest.approx(0.9 + 0.01)
    mixed, mt = M.mixup_cutmix(cfg, jax.random.key(0), out, t)
    np.testing.assert_allclose(np.asarray(mt.sum(1)), 1.0, rtol=1e-5)
    assert (cfg.mixup > 0) == (not np.array_equal(np.asarray(mt), np.asarray(t)))
    np.testing.assert_array_equal(np.asarray(A.eval_transform(x)), np.asarray(normalize(x)))


def test_hflip_only_flips_or_keeps():
    cfg = AugmentConfig(hflip=0.5)
    x = jnp.asarray(batch(16, 16))
    out = np.asarray(A.train_transform(cfg, jax.random.key(3), x))
    n, f = np.asarray(normalize(x)), np.asarray(normalize(x[:, :, ::-1]))
    flipped = [bool((o == fl).all()) for o, fl in zip(out, f)]
    assert all((o == nn).all() or fl for o, nn, fl in zip(out, n, flipped))
    assert 0 < sum(flipped) < 16


@pytest.mark.parametrize("cfg", [DEIT, DEIT3], ids=["deit", "deit3"])
def test_train_transform_compiles_once_and_is_per_image(cfg):
    traces = []

    @jax.jit
    def step(key, images, labels):
        traces.append(1)
        k1, k2 = jax.random.split(key)
        x = A.train_transform(cfg, k1, images)
        return M.mixup_cutmix(cfg, k2, x, M.one_hot_targets(DEIT_LOSS if cfg is DEIT else DEIT3_LOSS, labels, 10))

    x, labels = jnp.asarray(batch(8)), jnp.arange(8) % 10
    outs = [step(jax.random.key(s), x, labels) for s in range(3)]
    assert len(traces) == 1
    images, targets = outs[0]
    assert images.shape == (8, 32, 32, 3) and images.dtype == jnp.float32 and targets.shape == (8, 10)
    assert bool(jnp.isfinite(images).all())
    assert not np.array_equal(np.asarray(outs[0][0]), np.asarray(outs[1][0]))
    np.testing.assert_allclose(np.asarray(targets.sum(1)), 1.0, rtol=1e-5)
    # Per image: image i of the batch is augment_one with the i-th split key.
    k = jax.random.key(7)
    full = jax.jit(A.train_transform, static_argnums=0)(cfg, k, x)
    one = jax.jit(A.augment_one, static_argnums=0)
    keys = jax.random.split(k, 8)
    for i in (0, 5):
        np.testing.assert_allclose(np.asarray(full[i]), np.asarray(one(cfg, keys[i], x[i])), atol=1e-5)


def test_mixup_cutmix_targets_follow_images():
    cfg = AugmentConfig(mixup=0.8, cutmix=1.0)
    # image i is the constant i: mixup gives lam*i + (1-lam)*(b-1-i), cutmix a box of b-1-i.
    b = 6
    x = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, 16, 16, 3))
    t = M.one_hot_targets(LossConfig(label_smoothing=0.0), jnp.arange(b), b)
    kinds = set()
    for seed in range(20):
        mixed, mt = M.mixup_cutmix(cfg, jax.random.key(seed), x, t)
        mixed, mt = np.asarray(mixed), np.asarray(mt)
        lam = mt[0, 0]
        np.testing.assert_allclose(mt.sum(1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(mt[np.arange(b), b - 1 - np.arange(b)], 1 - lam, atol=1e-6)
        own = (mixed[0] == 0).mean()
        if np.isin(mixed[0], [0.0, b - 1.0]).all():  # cutmix: lam = share of own pixels
            kinds.add("cutmix")
            assert own == pytest.approx(lam, abs=1e-6)
        else:
            kinds.add("mixup")
            np.testing.assert_allclose(mixed[0], (1 - lam) * (b - 1), atol=1e-5)
    assert kinds == {"cutmix", "mixup"}


def test_bce_targets_have_no_smoothing():
    cfg = AugmentConfig(mixup=0.8, cutmix=1.0)
    t = M.one_hot_targets(LossConfig(criterion="bce", label_smoothing=0.1), jnp.arange(4), 4)
    np.testing.assert_array_equal(np.asarray(t), np.eye(4))  # no smoothing with bce
    _, mt = M.mixup_cutmix(cfg, jax.random.key(0), jnp.zeros((4, 8, 8, 3)), t)
    mt = np.asarray(mt)
    np.testing.assert_allclose(mt.sum(1), 1.0, rtol=1e-6)
    # what the bce loss sees (targets > 0): each image's label and its partner's
    assert ((mt > 0).sum(1) <= 2).all() and (mt[np.arange(4), np.arange(4)] > 0).all()


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_data_sharded_mesh_keeps_slices_local(axis_type):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices: conftest sets XLA_FLAGS")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharding = NamedSharding(mesh, P("data"))
    x = batch(16, 16)
    xs = jax.device_put(x, sharding)
    labels = jax.device_put(jnp.arange(16) % 10, sharding)

    transform = jax.jit(lambda k, im: A.train_transform(DEIT, k, im))
    compiled = transform.lower(jax.random.key(0), xs).compile()
    out = compiled(jax.random.key(0), xs)
    assert out.sharding.spec[0] == "data" and out.sharding.mesh.shape == {"data": 8}
    # Same per-image result as on one device: keys are split by global index.
    np.testing.assert_allclose(np.asarray(out), np.asarray(transform(jax.random.key(0), jnp.asarray(x))), atol=1e-5)

    mix = jax.jit(lambda k, im, lb: M.mixup_cutmix(DEIT, k, im, M.one_hot_targets(DEIT_LOSS, lb, 10)))
    compiled_mix = mix.lower(jax.random.key(1), out, labels).compile()
    mixed, targets = compiled_mix(jax.random.key(1), out, labels)
    assert mixed.sharding.spec[0] == "data" and targets.sharding.spec[0] == "data"
    for c in (compiled, compiled_mix):
        hlo = c.as_text()
        assert not any(c in hlo for c in ("all-gather", "all-to-all", "collective-permute", "all-reduce")), \
            "augmentation must not move images between devices"
    # Partners are within each device's pair of images: slice d holds images 2d, 2d+1.
    t = np.asarray(targets)
    lab = np.arange(16) % 10
    for i in range(16):
        mates = set(np.nonzero(t[i] > 0.02)[0]) - {lab[i]}
        assert mates <= {lab[i ^ 1]}


def test_vmap_path_equals_map_path(monkeypatch):
    """GPU/TPU run chunks of images vmapped (every switch branch computed, then selected); the
    result is the same as the CPU path's lax.map of real branches."""
    x = jnp.asarray(batch(8, 24))
    monkeypatch.setattr(perdevice, "ACCELERATOR_CHUNK", 3)  # 8 images: chunks of 3 and a remainder
    for cfg in (DEIT, DEIT3):
        outs = {}
        for mode in ("map", "vmap"):
            fn = lambda k, im: A.train_transform(cfg, k, im, per_image=mode)  # noqa: E731  (fresh: traced anew)
            # real conditionals only on the map path
            assert ("cond[" in str(jax.make_jaxpr(fn)(jax.random.key(3), x))) == (mode == "map")
            outs[mode] = jax.jit(fn)(jax.random.key(3), x)
        np.testing.assert_allclose(np.asarray(outs["vmap"]), np.asarray(outs["map"]), atol=1e-4)
