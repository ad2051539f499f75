"""Host-side geometry at decode time: the train crop and the eval resize + center crop.

The random crop runs on the full-resolution decoded image (an 8%-area crop keeps its own
pixels, as in timm), so it belongs here rather than on the device. Every random choice
comes from the `numpy.random.Generator` the loader passes in, derived from the seed, the
epoch and the sample index, so crops are reproducible and resumable.
"""

import math

import numpy as np
from PIL import Image

BICUBIC = Image.Resampling.BICUBIC


def rrc_box(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float] = (0.08, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (left, top, width, height), torchvision's sampling rule.

    Area uniform in `scale` of the image, aspect log-uniform in `ratio`; 10 tries, then a
    center crop clamped to `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, max(1, int(size * h / w)))
    else:
        new = (max(1, int(size * w / h)), size)
    return img.resize(new, BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def simple_random_crop(rng: np.random.Generator, img: Image.Image, size: int, pad: int = 4) -> np.ndarray:
    """DeiT-III 'src': resize the shorter side to `size`, reflect-pad 4, random size x size crop."""
    arr = np.asarray(resize_shorter(img, size))
    arr = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    top = int(rng.integers(0, arr.shape[0] - size + 1))
    left = int(rng.integers(0, arr.shape[1] - size + 1))
    return arr[top:top + size, left:left + size]


def train_crop(rng: np.random.Generator, img: Image.Image, size: int, mode: str) -> np.ndarray:
    """uint8 [size, size, 3] for a `random_crop` mode, as deit3-jax's torchvision pipeline:
    'rrc' RandomResizedCrop (bicubic), 'src' Simple Random Crop, 'none' resize the shorter side
    (bicubic) + center crop."""
    if img.mode != "RGB":  # convert() copies even when the mode already matches
        img = img.convert("RGB")
    if mode == "rrc":
        left, top, w, h = rrc_box(rng, *img.size)
        # crop, then resize (torchvision's resized_crop): resize(box=...) would also read the
        # pixels just outside the box, which timm's crops never see.
        return np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size), BICUBIC))
    if mode == "src":
        return simple_random_crop(rng, img, size)
    if mode == "none":
        return np.asarray(center_crop(resize_shorter(img, size), size))
    raise ValueError(f"random_crop={mode!r}: allowed 'rrc', 'src', 'none'")


def eval_crop(img: Image.Image, size: int, crop_ratio: float) -> np.ndarray:
    """Resize the shorter side to size / crop_ratio (bicubic), then center crop `size`."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"test_crop_ratio={crop_ratio}: must be in (0, 1]")
    img = resize_shorter(img.convert("RGB"), int(math.floor(size / crop_ratio)))
    return np.asarray(center_crop(img, size))
