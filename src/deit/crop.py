"""Host-side geometry at decode time: the train crop and the eval resize + center crop.

The random crop runs on the full-resolution decoded image (an 8%-area crop keeps its own
pixels, as in timm), so it belongs here rather than on the device. Every random choice
comes from the `numpy.random.Generator` the loader passes in, derived from the seed, the
epoch and the sample index, so crops are reproducible and resumable.

Images are uint8 [H, W, 3] numpy arrays (the loader's decoder output; a jax array or a PIL image
is accepted too, and made one) and a crop is a view of the decoded array. `resize` is Pillow's bicubic resize (the
interpolation torchvision uses on PIL images: Catmull-Rom, a = -0.5, the kernel widened by the
scale factor when downscaling, i.e. antialiased) recomputed with Pillow's own coefficients and
pass order as two sparse float32 matrix products: about a quarter less time than Pillow's scalar
loops. Pillow rounds in 22-bit fixed point and we in float32, so an output value can differ by
1 where the exact result sits within ~1e-5 of a rounding boundary (about 2 values in 10^5).
"""

import functools
import math

import jax
import numpy as np
import scipy.sparse
from PIL import Image

ImageArray = np.ndarray | jax.Array  # uint8 [H, W, 3]; made a numpy array on entry
Number = int | float | np.integer | np.floating  # Python or numpy


def rrc_box(rng: np.random.Generator, width: int, height: int, scale: tuple[Number, Number] = (0.08, 1.0),
            ratio: tuple[Number, Number] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (left, top, width, height), torchvision's sampling rule.

    Area uniform in `scale` of the image, aspect log-uniform in `ratio`; 10 tries, then a
    center crop clamped to `ratio`.
    """
    area = width * height
    scale, ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
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


def as_rgb_array(img: "ImageArray | Image.Image") -> np.ndarray:
    """uint8 [H, W, 3]: numpy arrays pass through, jax arrays become numpy ones, PIL images are
    converted to RGB."""
    if isinstance(img, Image.Image):
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image of shape {img.shape} and dtype {img.dtype}: expected uint8 [H, W, 3]")
    return img


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * -0.5, 0.0))


@functools.lru_cache(maxsize=512)
def bicubic_weights(in_size: int, out_size: int) -> tuple[scipy.sparse.csr_array, scipy.sparse.csr_array, int, int]:
    """Pillow's bicubic resampling coefficients (Resample.c precompute_coeffs, quantised to its
    22 fraction bits) for one axis, as a sparse [out_size, in_size] float32 matrix; also that
    matrix restricted to the input range [first, last) the outputs read, and the range."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    x = np.arange(ksize)
    valid = x[None] < xmax[:, None]
    w = np.where(valid, _bicubic((x[None] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = w.sum(1, keepdims=True)
    w = np.where(total != 0, w / np.where(total != 0, total, 1.0), w)
    w = np.trunc(w * (1 << 22) + np.where(w < 0, -0.5, 0.5)) / (1 << 22)
    rows = np.broadcast_to(np.arange(out_size)[:, None], valid.shape)[valid]
    cols = (xmin[:, None] + x[None])[valid]
    m = scipy.sparse.csr_array((w[valid].astype(np.float32), (rows, cols)), shape=(out_size, in_size))
    first, last = int(xmin[0]), int(xmin[-1] + xmax[-1])
    return m, m[:, first:last], first, last


def _transpose(a: np.ndarray) -> np.ndarray:
    """[p, q, c] -> contiguous [q, p, c], moving whole pixels (numpy copies a [p, q, c]
    transpose one channel value at a time, several times slower)."""
    p, q, c = a.shape
    if a.strides[1:] != (c * a.itemsize, a.itemsize):  # a crop view (strided rows) needs no copy
        a = np.ascontiguousarray(a)
    pixels = a.view(np.dtype((np.void, c * a.itemsize)))[..., 0]
    return np.ascontiguousarray(pixels.T).view(a.dtype).reshape(q, p, c)


def _resample_rows(m: scipy.sparse.csr_array, a: np.ndarray) -> np.ndarray:
    """One Pillow pass along axis 0 of [n, k, c]: float32 [out, k, c], rounded half up and
    clipped to 0..255 as Pillow stores each pass in uint8."""
    n, k, c = a.shape
    out = m @ a.reshape(n, k * c).astype(np.float32, copy=False)
    out += 0.5
    np.floor(out, out=out)
    return np.clip(out, 0, 255, out=out).reshape(-1, k, c)


def resize(img: ImageArray, width: int, height: int) -> np.ndarray:
    """Bicubic resize of a uint8 [H, W, 3] array (a view is fine) to [height, width, 3], as
    Pillow's Image.resize(BICUBIC) computes it (module docstring)."""
    img = np.asarray(img)
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    # Pillow's pass order: vertical first only when that axis shrinks more than twice as much
    if not (h - height > 0 and h - height > 2 * (w - width)) and w != width:
        _, rows, first, last = bicubic_weights(h, height)
        out = _transpose(_resample_rows(bicubic_weights(w, width)[0], _transpose(img[first:last])))
        if h != height:
            out = _resample_rows(rows, out)
    else:
        out = _resample_rows(bicubic_weights(h, height)[0], img) if h != height else img
        if w != width:
            out = _transpose(_resample_rows(bicubic_weights(w, width)[0], _transpose(out)))
    return out.astype(np.uint8)


def resize_shorter(img: ImageArray, size: int) -> np.ndarray:
    img = np.asarray(img)
    h, w = img.shape[:2]
    if min(w, h) == size:
        return img
    if w <= h:
        return resize(img, size, max(1, int(size * h / w)))
    return resize(img, max(1, int(size * w / h)), size)


def center_crop(img: ImageArray, size: int) -> np.ndarray:
    img = np.asarray(img)
    h, w = img.shape[:2]
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img[top:top + size, left:left + size]


def simple_random_crop(rng: np.random.Generator, img: ImageArray, size: int, pad: int = 4) -> np.ndarray:
    """DeiT-III 'src': resize the shorter side to `size`, reflect-pad 4, random size x size crop."""
    arr = np.pad(resize_shorter(img, size), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    top = int(rng.integers(0, arr.shape[0] - size + 1))
    left = int(rng.integers(0, arr.shape[1] - size + 1))
    return arr[top:top + size, left:left + size]


def train_crop(rng: np.random.Generator | None, img: "ImageArray | Image.Image", size: int, mode: str) -> np.ndarray:
    """uint8 [size, size, 3] for a `random_crop` mode, as deit3-jax's torchvision pipeline:
    'rrc' RandomResizedCrop (bicubic), 'src' Simple Random Crop, 'none' resize the shorter side
    (bicubic) + center crop (draws nothing: `rng` may be None)."""
    img = as_rgb_array(img)
    if mode in ("rrc", "src") and rng is None:
        raise ValueError(f"random_crop={mode!r} draws a crop: it needs a random generator, got None")
    if mode == "rrc":
        h, w = img.shape[:2]
        left, top, cw, ch = rrc_box(rng, w, h)
        # crop, then resize (torchvision's resized_crop): resizing with a box would also read the
        # pixels just outside it, which timm's crops never see.
        return resize(img[top:top + ch, left:left + cw], size, size)
    if mode == "src":
        return simple_random_crop(rng, img, size)
    if mode == "none":
        return center_crop(resize_shorter(img, size), size)
    raise ValueError(f"random_crop={mode!r}: allowed 'rrc', 'src', 'none'")


def eval_crop(img: "ImageArray | Image.Image", size: int, crop_ratio: Number) -> np.ndarray:
    """Resize the shorter side to size / crop_ratio (bicubic), then center crop `size`."""
    crop_ratio = float(crop_ratio)
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"test_crop_ratio={crop_ratio}: must be in (0, 1]")
    return center_crop(resize_shorter(as_rgb_array(img), int(math.floor(size / crop_ratio))), size)
