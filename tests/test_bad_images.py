"""Bad images given to `deit.predict` and to `src/predict.py`: one clear error naming what is wrong.

`deit.predict` raises one ValueError (one line) naming the wrong size, dtype or shape and what
is allowed. `python src/predict.py` given a file it cannot use prints one line naming the file on
stderr, nothing on stdout (not even for the good images given with it), and exits 2.
"""

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from matrix import Case
from PIL import Image

import deit
from deit.interop import save_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dataclasses.replace(deit.ModelConfig(), layers=1, dim=16, heads=2, labels=5, patch_size=8, image_size=16)
ASTRONAUT = skimage.data.astronaut()  # 512x512 uint8 RGB


def photos(n: int, h: int, w: int) -> np.ndarray:
    """n real uint8 RGB images [n, h, w, 3]: crops of the astronaut's face, 16 px apart."""
    return np.array([ASTRONAUT[60 + 16 * i:60 + 16 * i + h, 160 + 16 * i:160 + 16 * i + w] for i in range(n)],
                    np.uint8).reshape(n, h, w, 3)


# (case, model: 'learnable' 16 px or 'sincos2d' (8 px patches), images)
API = [
    (Case("images", "deit.predict: 32 px images to a 16 px learnable-position model",
          "image size 32x32 does not match this model's image_size=16", "ValueError"),
     "learnable", lambda: photos(2, 32, 32)),
    (Case("images", "deit.predict: 16x24 px images to a 16 px learnable-position model",
          "image size 16x24 does not match this model's image_size=16", "ValueError"),
     "learnable", lambda: photos(2, 16, 24)),
    (Case("images", "deit.predict: 20 px images to a sincos2d model with 8 px patches",
          "image size 20x20 is not divisible by patch_size=8", "ValueError"),
     "sincos2d", lambda: photos(2, 20, 20)),
    (Case("images", "deit.predict: float32 images (a numpy array)",
          "images of dtype float32: only uint8 is allowed", "ValueError"),
     "learnable", lambda: photos(2, 16, 16).astype(np.float32)),
    (Case("images", "deit.predict: float32 images (a jax array, values in [0, 1])",
          "images of dtype float32: only uint8 is allowed", "ValueError"),
     "learnable", lambda: jnp.asarray(photos(2, 16, 16), jnp.float32) / 255),
    (Case("images", "deit.predict: int64 images",
          "images of dtype int64: only uint8 is allowed", "ValueError"),
     "learnable", lambda: photos(2, 16, 16).astype(np.int64)),
    (Case("images", "deit.predict: bool images",
          "images of dtype bool: only uint8 is allowed", "ValueError"),
     "learnable", lambda: photos(2, 16, 16) > 127),
    (Case("images", "deit.predict: one image [H, W, 3] without a batch axis",
          "images of shape (16, 16, 3): expected [B, H, W, 3]", "ValueError"),
     "learnable", lambda: photos(1, 16, 16)[0]),
    (Case("images", "deit.predict: RGBA images [B, H, W, 4]",
          "images of shape (2, 16, 16, 4): expected [B, H, W, 3]", "ValueError"),
     "learnable", lambda: np.concatenate([photos(2, 16, 16), np.full((2, 16, 16, 1), 255, np.uint8)], -1)),
    (Case("images", "deit.predict: grayscale images [B, H, W]",
          "images of shape (2, 16, 16): expected [B, H, W, 3]", "ValueError"),
     "learnable", lambda: photos(2, 16, 16)[..., 0]),
    (Case("images", "deit.predict: channels-first images [B, 3, H, W]",
          "images of shape (2, 3, 16, 16): expected [B, H, W, 3]", "ValueError"),
     "learnable", lambda: photos(2, 16, 16).transpose(0, 3, 1, 2)),
    (Case("images", "deit.predict: an empty batch [0, H, W, 3]",
          "images of shape (0, 16, 16, 3): empty", "ValueError"),
     "learnable", lambda: photos(0, 16, 16)),
]


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


CAT = skimage.data.chelsea()
# (case, bad file's name, how to make it: bytes to write, "dir" or None for missing)
CLI = [
    (Case("images", "src/predict.py: garbage bytes named .jpg",
          "garbage.jpg: not in an image format PIL decodes"),
     "garbage.jpg", lambda: bytes(range(256)) * 8),
    (Case("images", "src/predict.py: an empty file named .png",
          "empty.png: an empty file"),
     "empty.png", lambda: b""),
    (Case("images", "src/predict.py: a missing file", "nope.png: no such file"),
     "nope.png", lambda: None),
    (Case("images", "src/predict.py: a directory given as an image", "photos: a directory, not an image file"),
     "photos", lambda: "dir"),
    (Case("images", "src/predict.py: a JPEG truncated to half its bytes",
          "half.jpg: OSError: image file is truncated"),
     "half.jpg", lambda: (lambda b: b[:len(b) // 2])(_jpeg(CAT))),
    (Case("images", "src/predict.py: a PNG truncated to half its bytes",
          "half.png: OSError: image file is truncated"),
     "half.png", lambda: (lambda b: b[:len(b) // 2])(_png(CAT))),
    (Case("images", "src/predict.py: a JPEG cut inside its header (first 200 bytes)",
          "header.jpg: OSError: Truncated File Read"),
     "header.jpg", lambda: _jpeg(CAT)[:200]),
]

MATRIX = [c for c, *_ in API] + [c for c, *_ in CLI]


@pytest.fixture(scope="module")
def models():
    return {"learnable": deit.init_model(TINY, seed=0),
            "sincos2d": deit.init_model(dataclasses.replace(TINY, posemb="sincos2d", pooling="gap"), seed=0)}


@pytest.mark.parametrize("case,model,images", API, ids=[c.id for c, *_ in API])
def test_predict_bad_images_one_value_error(models, case, model, images):
    with pytest.raises(ValueError) as e:
        deit.predict(models[model], images())
    message = str(e.value)
    assert "\n" not in message
    assert case.sees in message


def test_predict_takes_numpy_and_sincos2d_any_multiple_of_the_patch(models):
    images = photos(2, 16, 16)
    want = np.asarray(deit.predict(models["learnable"], jnp.asarray(images)))
    np.testing.assert_array_equal(np.asarray(deit.predict(models["learnable"], images)), want)
    for h, w in ((16, 16), (24, 32), (8, 40)):
        out = deit.predict(models["sincos2d"], photos(2, h, w))
        assert out.shape == (2, TINY.labels) and bool(jnp.all(jnp.isfinite(out)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad-images")
    path = save_model(deit.ViT(TINY, key=jax.random.key(0)), d / "tiny.safetensors")
    Image.fromarray(CAT).save(d / "cat.jpg")
    return path


@pytest.mark.parametrize("case,name,make", CLI, ids=[c.id for c, *_ in CLI])
def test_cli_bad_image_one_line_exit_2(checkpoint, tmp_path, case, name, make):
    bad = tmp_path / name
    content = make()
    if content == "dir":
        bad.mkdir()
        Image.fromarray(CAT).save(bad / "inside.jpg")  # a directory of images is still not an image
    elif content is not None:
        bad.write_bytes(content)
    good = checkpoint.parent / "cat.jpg"
    r = subprocess.run([sys.executable, str(ROOT / "src" / "predict.py"), "--checkpoint", str(checkpoint),
                        str(good), str(bad)], capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""},
                       timeout=300)
    assert r.returncode == int(case.exit), r.stderr
    assert r.stdout == ""  # not even the good image's line
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("predict: error: cannot read image ") and str(bad) in lines[0]
    assert case.sees in lines[0]
