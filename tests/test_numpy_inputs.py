"""Every public array function of the augmentation stack and `deit.predict` accepts numpy arrays
and Python / numpy scalars, and gives bit for bit what it gives for jax arrays.

The functions are enumerated from the modules (`inspect`): a new public function fails
`test_every_public_function_has_a_call` until it gets a call in CALLS (or, if it takes no
arrays, a line in EXCLUDED saying why).
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

import deit
from deit import augment as A
from deit import crop as C
from deit import erasing as E
from deit import imageops as O
from deit import mixing as M
from deit import perdevice as PD
from deit import randaugment as RA
from deit.config import AugmentConfig, LossConfig, ModelConfig

MODULES = (A, O, RA, E, M, C, PD)

# Public functions that take no array and no number that could be one; why each is left out.
EXCLUDED = {
    "augment.policy": "maps an auto_augment string (and a fill tuple) to a function; that function is "
                      "three_augment or rand_augment, both called below",
    "randaugment.parse_rand_augment": "parses a config string into a RandAugment",
    "augment.has_affine": "reads an AugmentConfig: no array",
    "augment.has_geometric": "reads an AugmentConfig: no array",
    "crop.bicubic_weights": "takes two sizes (ints), no array; cached by them; resize below uses it",
}


def public_functions() -> dict[str, object]:
    """'module.name' -> function, for every function defined (not imported) in MODULES whose name
    does not start with '_', plus deit.predict."""
    out = {}
    for module in MODULES:
        for name, obj in vars(module).items():
            f = inspect.unwrap(obj) if callable(obj) else None
            if name.startswith("_") or not inspect.isfunction(f) or f.__module__ != module.__name__:
                continue
            out[f"{module.__name__.removeprefix('deit.')}.{name}"] = obj
    out["deit.predict"] = deit.predict
    return out


# ----------------------------------------------------------------------------- inputs: real photos, small crops

ASTRO = np.ascontiguousarray(skimage.data.astronaut()[100:124, 180:212])   # 24x32 uint8 RGB: the face
CAT = np.ascontiguousarray(skimage.data.chelsea()[80:104, 120:152])        # 24x32 uint8 RGB
BATCH = np.stack([ASTRO, CAT])                                              # [2, 24, 32, 3] uint8
FLOATS = np.random.default_rng(0).normal(0, 100, (24, 32, 3)).astype(np.float32)
KEY = jax.random.key(0)
RANDAUG = RA.parse_rand_augment("rand-m9-mstd0.5-inc1", O.DEIT3_JAX_FILL)
CFG = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3, random_erasing=1.0, hflip=0.5)
MIX = AugmentConfig(mixup=0.8, cutmix=1.0)
LOSS = LossConfig(label_smoothing=0.1)
# Draws kept as numpy, so the apply_* functions get numpy parameters.
RA_PARAMS = jax.tree.map(np.asarray, RA.sample_rand_augment(RANDAUG, jax.random.key(3)))
JITTER_PARAMS = jax.tree.map(np.asarray, A.sample_color_jitter(jax.random.key(4), 0.4, 0.4, 0.4))
AFFINE_PARAMS = jax.tree.map(np.asarray, A.sample_affine(jax.random.key(5), 20, 0.125, 0.25, 10, (24, 32)))
DISPLACEMENT = np.asarray(A.sample_elastic(jax.random.key(6), 50, 4, (24, 32)))


@functools.cache
def tiny_model() -> deit.ViT:
    return deit.init_model(ModelConfig(layers=1, dim=16, heads=2, labels=5, patch_size=8, image_size=16), seed=1)


class In:
    """How one variant passes inputs: `im` an image that may be uint8 or float (in `dtype`), `a` any
    other array (its dtype kept), `s` a number that may be traced (magnitude, factor,
    probability...), `n` a number that configures (ranges, fractions), `b` a boolean scalar."""

    def __init__(self, dtype, array, scalar, number, boolean):
        self.dtype, self._array, self._scalar, self._number, self._boolean = dtype, array, scalar, number, boolean
        self.took_image = False

    def im(self, x):
        self.took_image = True
        return self._array(np.asarray(x).astype(self.dtype))

    def a(self, x):
        return jax.tree.map(self._array, x)

    def s(self, v):
        return self._scalar(v)

    def n(self, v):
        return self._number(v)

    def b(self, v):
        return self._boolean(v)


def _jax_scalar(v):
    return jnp.asarray(v, jnp.float32 if isinstance(v, float) else jnp.int32)


def _np_scalar(v):
    return np.float32(v) if isinstance(v, float) else np.int64(v)


def _np64_scalar(v):
    return np.float64(v) if isinstance(v, float) else np.int32(v)


def reference(dtype) -> In:
    """jax arrays and jax 0-d arrays; configuring numbers stay Python numbers."""
    return In(dtype, jnp.asarray, _jax_scalar, lambda v: v, jnp.bool_)


VARIANTS = {
    "numpy arrays, Python scalars": lambda: In(np.uint8, np.asarray, lambda v: v, lambda v: v, bool),
    "numpy arrays, numpy scalars": lambda: In(np.uint8, np.asarray, _np_scalar, _np_scalar, np.bool_),
    "float32 numpy images, 0-d numpy arrays": lambda: In(np.float32, np.asarray, np.asarray, _np64_scalar, np.asarray),
}

# Test values are exact in float32, so a numpy float32 scalar is the same number as the Python one.
# Each call: (In) -> result (an array or a pytree of them).
CALLS = {
    # imageops
    "imageops.luma": lambda i: O.luma(i.im(ASTRO)),
    "imageops.invert": lambda i: O.invert(i.im(ASTRO)),
    "imageops.posterize": lambda i: O.posterize(i.im(ASTRO), i.s(3)),
    "imageops.solarize": lambda i: (O.solarize(i.im(ASTRO), i.s(100)), O.solarize(i.im(ASTRO))),
    "imageops.solarize_add": lambda i: O.solarize_add(i.im(ASTRO), i.s(60), i.s(200)),
    "imageops.auto_contrast": lambda i: O.auto_contrast(i.im(CAT)),
    "imageops.equalize": lambda i: O.equalize(i.im(CAT)),
    "imageops.grayscale": lambda i: O.grayscale(i.im(ASTRO)),
    "imageops.brightness": lambda i: O.brightness(i.im(ASTRO), i.s(1.75)),
    "imageops.color": lambda i: (O.color(i.im(ASTRO), i.s(0.25)), O.color(i.im(ASTRO), i.s(2))),
    "imageops.contrast": lambda i: O.contrast(i.im(CAT), i.s(1.875)),
    "imageops.smooth": lambda i: O.smooth(i.im(CAT)),
    "imageops.sharpness": lambda i: O.sharpness(i.im(ASTRO), i.s(1.75)),
    "imageops.affine": lambda i: (
        O.affine(i.im(ASTRO), i.a(np.array([1.0, 0.25, -3.0, 0.125, 1.0, 2.0], np.float32)),
                 i.a(np.array(O.FILL, np.int64)), "bicubic"),
        O.affine(i.im(ASTRO), (i.s(1), i.s(0.25), i.s(-3), i.s(0), i.s(1), i.s(2.5)), (i.n(10), i.n(20), i.n(30)))),
    "imageops.rotate_coeffs": lambda i: O.rotate_coeffs(i.s(30.0), 24, 32),
    "imageops.rotate": lambda i: O.rotate(i.im(ASTRO), i.s(30.0), resample="bicubic"),
    "imageops.shear_x": lambda i: O.shear_x(i.im(ASTRO), i.s(0.25)),
    "imageops.shear_y": lambda i: O.shear_y(i.im(ASTRO), i.s(-0.25), resample="bicubic"),
    "imageops.translate_x": lambda i: O.translate_x(i.im(ASTRO), i.s(5)),
    "imageops.translate_y": lambda i: O.translate_y(i.im(ASTRO), i.s(-4.5)),
    "imageops.hflip": lambda i: O.hflip(i.im(ASTRO)),
    # sigma <= 2 (the default bound of a jax sigma), so every variant blurs the same
    "imageops.gaussian_blur": lambda i: (O.gaussian_blur(i.im(ASTRO), i.s(1.25)), O.gaussian_blur(i.im(CAT), i.s(2))),
    # randaugment
    "randaugment.op_argument": lambda i: [RA.op_argument(name, i.s(7.5), i.b(True), 24, 32, i.n(0.375))
                                          for name in sorted(RA._OP_NAMES)],
    "randaugment.apply_op": lambda i: [RA.apply_op(name, i.im(ASTRO), i.s(arg), "bicubic", (i.n(1), i.n(2), i.n(3)))
                                       for name, arg in (("Rotate", 20.0), ("ShearX", 0.25), ("TranslateYRel", 5),
                                                         ("Posterize", 2), ("Solarize", 100), ("SolarizeAdd", 40),
                                                         ("Sharpness", 1.5), ("Equalize", 0))],
    "randaugment.sample_rand_augment": lambda i: RA.sample_rand_augment(RANDAUG, KEY),
    "randaugment.apply_rand_augment": lambda i: RA.apply_rand_augment(RANDAUG, i.a(RA_PARAMS), i.im(CAT)),
    "randaugment.rand_augment": lambda i: RA.rand_augment(RANDAUG, KEY, i.im(ASTRO)),
    # augment
    "augment.sample_three_augment": lambda i: A.sample_three_augment(KEY, (i.n(0.25), i.n(2))),
    "augment.apply_three_augment": lambda i: [
        A.apply_three_augment(i.a(dict(choice=np.int32(c), sigma=np.float32(1.5))), i.im(ASTRO), i.n(2))
        for c in range(3)],
    "augment.three_augment": lambda i: A.three_augment(jax.random.key(2), i.im(ASTRO), (i.n(0.25), i.n(2))),
    "augment.sample_color_jitter": lambda i: A.sample_color_jitter(KEY, i.n(0.375), i.n(0), i.n(1)),
    "augment.apply_color_jitter": lambda i: A.apply_color_jitter(i.a(JITTER_PARAMS), i.im(ASTRO), (True, False, True)),
    "augment.color_jitter": lambda i: A.color_jitter(KEY, i.im(ASTRO), i.n(0.375), i.n(0.25), i.n(0.5)),
    "augment.sample_affine": lambda i: A.sample_affine(KEY, i.n(20), i.n(0.125), i.n(0.25), i.n(10), (24, 32)),
    "augment.affine_coeffs": lambda i: A.affine_coeffs(i.a(AFFINE_PARAMS), 24, 32),
    "augment.random_affine": lambda i: A.random_affine(KEY, i.im(ASTRO), i.n(20), i.n(0.125), i.n(0.25), i.n(10)),
    "augment.sample_elastic": lambda i: A.sample_elastic(KEY, i.n(50), i.n(4), (24, 32)),
    "augment.elastic": lambda i: A.elastic(i.im(ASTRO), i.a(DISPLACEMENT)),
    "augment.random_elastic": lambda i: A.random_elastic(KEY, i.im(ASTRO), i.n(50), i.n(4)),
    "augment.random_hflip": lambda i: [A.random_hflip(KEY, i.im(ASTRO), i.s(p)) for p in (1, 0, 0.5)],
    "augment.augment_one": lambda i: A.augment_one(CFG, KEY, i.im(ASTRO)),
    # the per-image path (per_device, map_images) with its cheapest op; augment_one has them all
    "augment.train_transform": lambda i: A.train_transform(AugmentConfig(random_erasing=1.0), KEY, i.a(BATCH), "map"),
    "augment.eval_transform": lambda i: A.eval_transform(i.a(BATCH)),
    # erasing
    "erasing.erase_box": lambda i: E.erase_box(KEY, 24, 32, i.n(0.125), i.n(0.5), i.n(0.25), i.n(4)),
    "erasing.torch_uint8_cast": lambda i: (E.torch_uint8_cast(i.a(FLOATS)), E.torch_uint8_cast(i.s(-1.5))),
    "erasing.erase": lambda i: (E.erase(i.im(ASTRO), i.a(np.array([2, 3, 10, 12])), i.a(FLOATS)),
                                E.erase(i.im(CAT), (i.n(1), i.n(0), i.n(5), i.n(30)), i.a(FLOATS))),
    "erasing.random_erasing": lambda i: [E.random_erasing(KEY, i.im(ASTRO), i.s(1), mode)
                                         for mode in ("torchvision", "pixel")],
    # mixing
    "mixing.one_hot_targets": lambda i: M.one_hot_targets(LOSS, i.a(np.array([3, 0, 9])), 10),
    "mixing.cutmix_box": lambda i: M.cutmix_box(KEY, i.s(0.625), 24, 32),
    "mixing.mixup_cutmix": lambda i: [
        M.mixup_cutmix(cfg, KEY, i.a(BATCH.astype(np.float32)), i.a(np.eye(2, 4, dtype=np.float32)))
        for cfg in (MIX, AugmentConfig())],
    # crop (host side: numpy in, numpy out; numpy Generators, one per call)
    "crop.rrc_box": lambda i: C.rrc_box(np.random.default_rng(0), 451, 300, (i.n(0.25), i.n(1)), (i.n(0.75), i.n(1.5))),
    "crop.as_rgb_array": lambda i: C.as_rgb_array(i.a(ASTRO)),
    "crop.resize": lambda i: (C.resize(i.a(ASTRO), 20, 14), C.resize(i.a(CAT), 48, 30)),
    "crop.resize_shorter": lambda i: C.resize_shorter(i.a(ASTRO), 16),
    "crop.center_crop": lambda i: C.center_crop(i.a(ASTRO), 16),
    "crop.simple_random_crop": lambda i: C.simple_random_crop(np.random.default_rng(0), i.a(ASTRO), 16),
    "crop.train_crop": lambda i: [C.train_crop(np.random.default_rng(0), i.a(ASTRO), 16, mode)
                                  for mode in ("rrc", "src", "none")],
    "crop.eval_crop": lambda i: (C.eval_crop(i.a(ASTRO), 16, i.n(0.875)), C.eval_crop(i.a(CAT), 16, i.n(1))),
    # perdevice
    "perdevice.per_device": lambda i: PD.per_device(lambda index, k, x: x * 2 + index + jax.random.uniform(k),
                                                    (KEY,), (i.a(BATCH.astype(np.float32)),)),
    "perdevice.map_images": lambda i: PD.map_images(lambda k, x: O.invert(x) + jax.random.uniform(k),
                                                    jax.random.split(KEY, 2), i.a(BATCH), "map"),
    # model
    "deit.predict": lambda i: deit.predict(tiny_model(), i.a(BATCH[:, 4:20, 8:24])),
}

HOST_SIDE = "crop."  # functions that return numpy arrays (the loader's), not jax arrays


def _leaves(tree) -> list:
    return jax.tree.leaves(tree)


def assert_bitwise_equal(got, want, name: str, variant: str):
    assert jax.tree.structure(got) == jax.tree.structure(want), f"{name} [{variant}]: different outputs"
    for g, w in zip(_leaves(got), _leaves(want)):
        if isinstance(w, (int, float)):
            assert type(g) is type(w) and g == w, f"{name} [{variant}]: {g!r} != {w!r}"
            continue
        if not name.startswith(HOST_SIDE):
            assert isinstance(g, jax.Array), f"{name} [{variant}]: returned {type(g).__name__}, not a jax Array"
        g, w = np.asarray(g), np.asarray(w)
        assert (g.dtype, g.shape) == (w.dtype, w.shape), f"{name} [{variant}]: {g.dtype}{g.shape} != {w.dtype}{w.shape}"
        if g.tobytes() != w.tobytes():
            raise AssertionError(f"{name} [{variant}]: values differ (max |diff| "
                                 f"{np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))})")


def test_every_public_function_has_a_call():
    found = set(public_functions())
    missing = sorted(found - set(CALLS) - set(EXCLUDED))
    assert not missing, f"public functions without a call in CALLS (or a reason in EXCLUDED): {missing}"
    stale = sorted((set(CALLS) | set(EXCLUDED)) - found)
    assert not stale, f"CALLS / EXCLUDED name functions that do not exist: {stale}"
    assert not set(CALLS) & set(EXCLUDED)


@pytest.mark.parametrize("name", sorted(set(public_functions()) - set(EXCLUDED)))
def test_numpy_inputs_give_the_jax_result(name):
    if name not in CALLS:
        pytest.fail(f"{name}: no call in CALLS")
    call = CALLS[name]
    ref = reference(np.uint8)
    refs = {np.uint8: call(ref)}
    # a call without an image of either dtype has one reference: its other inputs do not change
    refs[np.float32] = call(reference(np.float32)) if ref.took_image else refs[np.uint8]
    for variant, inputs in VARIANTS.items():
        inputs = inputs()
        assert_bitwise_equal(call(inputs), refs[inputs.dtype], name, variant)
