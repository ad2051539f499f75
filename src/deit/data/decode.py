"""Raw records -> cropped uint8 images: JPEG/PNG/... decoding and the train/valid crop calls.

These are the worker-process tasks of the loader, so they take plain lists and return plain
arrays (picklable), and every random choice comes from `crop_rng`: a function of where the
sample lives, never of which worker ran it.
"""

import functools
import io
import itertools
import os
import warnings

import numpy as np
import simplejpeg
from PIL import Image

from deit import crop
from deit.data.kept import Kept
from deit.data.shards import IMAGE_EXTS, Record, image_bytes, is_local_path, iter_shard, label_problem

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def decode_image(data: bytes | None) -> np.ndarray | None:
    """RGB uint8 [H, W, 3], or None if the bytes are not a readable image.

    JPEGs go to simplejpeg (libjpeg-turbo, the same library and settings as Pillow's decoder,
    so the pixels are identical) straight into a numpy array: about a quarter less time than
    Pillow, which decodes into its own 4-byte-per-pixel buffer. CMYK/YCCK JPEGs, what simplejpeg
    refuses (e.g. recoverable corruption) and every other format go to Pillow, as before.
    """
    if data is None:
        return None
    if data[:2] == b"\xff\xd8":
        try:
            # CMYK / YCCK: libjpeg-turbo's RGB output would differ from Pillow's conversion
            if simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray"):
                return simplejpeg.decode_jpeg(data, "RGB")
        except Exception:  # noqa: BLE001 - Pillow below decides
            pass
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now, while the buffer is open
            return to_rgb(img)
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
        return None


# Small decoded images are kept per process, keyed on their bytes (the same bytes decode to the
# same pixels): a dataset of small images such as the bundled digits is decoded once, not every
# epoch (Pillow's per-image open/decode overhead was 70% of tiny-digits' loader CPU time).
# ImageNet-sized images are never kept; the budget bounds what a big dataset of small images pins.
MEMO_IMAGE_BYTES = 64 << 10  # decoded size: up to ~147x147 RGB
MEMO_TOTAL_BYTES = 512 << 20
_memo = Kept(MEMO_TOTAL_BYTES)  # encoded bytes -> pixels, counted as both


def decode_kept(data: bytes | None) -> np.ndarray | None:
    """`decode_image`, remembered for small images (see MEMO_IMAGE_BYTES). The array is shared
    between the reads of the same bytes, so it is read-only."""
    if data is None:
        return None
    if len(data) > MEMO_IMAGE_BYTES:  # a big encoding (ImageNet's JPEGs): not kept, not worth hashing
        return decode_image(data)
    if (img := _memo.get(data)) is not None:
        return img
    img = decode_image(data)
    if img is not None and img.nbytes <= MEMO_IMAGE_BYTES and data not in _memo:
        img = np.array(img)  # its own buffer (not Pillow's), then frozen
        img.setflags(write=False)
        _memo.put(data, img, img.nbytes + len(data))
    return img


def to_rgb(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image as RGB uint8, as timm's loader (`img.convert("RGB")`) except for
    16-bit grayscale.

    Grayscale (L), palette (P), LA/RGBA (alpha dropped), CMYK, 1-bit, ...: `convert("RGB")`.
    A palette image with transparency goes through RGBA (the same pixels; Pillow warns on the
    direct conversion when the transparency is a byte string). 16-bit grayscale (Pillow's
    I;16 modes, and mode I of a PNG, which older Pillows gave 16-bit PNGs) is scaled to 8 bits
    as `v >> 8`: Pillow's own I;16 -> L and I;16 -> RGB conversions clip every value above 255
    to white (checked with Pillow 13), which turns a normal 16-bit photo into a white sheet;
    `>> 8` is what Pillow itself does to 16-bit RGB and RGBA PNGs (it keeps the high byte).
    """
    if img.mode == "RGB":  # most images: convert() would copy the pixels for nothing
        return np.asarray(img)
    if img.mode in SIXTEEN_BIT or (img.mode == "I" and img.format == "PNG"):
        gray = (np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"))


# ----------------------------------------------------------------------------- up-front probe

PROBE_SAMPLES, PROBE_SHARDS = 16, 4


def probe_shards(urls: list[str], spec: str, num_labels: int = 0) -> None:
    """ValueError naming `spec` when none of the first PROBE_SAMPLES samples of each of its first
    PROBE_SHARDS local shards has a readable image and an integer label (in [0, num_labels)
    unless num_labels is 0) (all corrupt: training could only skip them). Stops at the first usable sample, so a healthy dataset costs one
    sample's decode; memoised on the shards' (path, mtime, size). Remote and pipe: shards are not
    read up front: an all-corrupt remote dataset is caught by the loader after one pass.
    """
    local = [u for u in urls if is_local_path(u)][:PROBE_SHARDS]
    if local:
        stats = tuple((u, st.st_mtime_ns, st.st_size) for u, st in ((u, os.stat(u)) for u in local))
        problem = _probe(stats, num_labels)
        if problem is not None:
            raise ValueError(f"shard spec {spec!r} has no usable sample among the first {PROBE_SAMPLES} of "
                             f"{'its first shard' if len(local) == 1 else f'each of its first {len(local)} shards'} "
                             f"({problem}); allowed: samples with a readable image ({'/'.join(IMAGE_EXTS)}) "
                             f"and an integer .cls label{f' in [0, {num_labels})' if num_labels > 0 else ''}")


@functools.lru_cache(maxsize=None)
def _probe(stats: tuple[tuple[str, int, int], ...], num_labels: int) -> str | None:
    first = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. Pillow's DecompressionBombWarning: the loader will show it
        for url, _, _ in stats:
            n = 0
            for sample in itertools.islice(iter_shard(url, quiet=True), PROBE_SAMPLES):
                n += 1
                data = image_bytes(sample)
                _, problem = label_problem(sample, num_labels)
                if problem is None:
                    problem = ("has no image member" if data is None
                               else None if decode_image(data) is not None else "has unreadable image bytes")
                if problem is None:
                    return None
                first = first or f"e.g. sample {sample['__key__']!r} of {url} {problem}"
            first = first or (f"e.g. {url} yields no sample" if n == 0 else None)
    return first


def crop_rng(seed: int, epoch: int, shard: int, pos: int, copy: int) -> np.random.Generator:
    """Crop randomness of one copy of one sample: a function of where the sample lives and
    the epoch only, so it does not depend on workers, buffering or resumption."""
    return np.random.default_rng([seed, epoch, 2, shard, pos, copy])


def decode_train(items: list[tuple[int, int, Record]], size: int, mode: str, repeats: int,
                 seed: int) -> list[np.ndarray | None]:
    """[repeats, size, size, 3] crops per (epoch, index, record), None for corrupt ones (worker task)."""
    out: list[np.ndarray | None] = []
    for epoch, _, rec in items:
        img = decode_kept(rec.image) if rec.label is not None else None
        # 'none' draws nothing: no generator to seed (a third of the loader's time on tiny images)
        crops = [] if img is None else [crop.train_crop(None if mode == "none" else crop_rng(seed, epoch, rec.shard, rec.pos, c),
                                                        img, size, mode)
                                        for c in range(repeats)]
        out.append(None if img is None else crops[0][None] if repeats == 1 else np.stack(crops))
    return out


def decode_valid(items: list[Record], size: int, crop_ratio: float) -> list[np.ndarray | None]:
    """The eval crop (resize + center crop) per record, None for corrupt ones (worker task)."""
    out: list[np.ndarray | None] = []
    for rec in items:
        img = decode_kept(rec.image) if rec.label is not None else None
        out.append(None if img is None else crop.eval_crop(img, size, crop_ratio))
    return out
