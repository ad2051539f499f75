"""Raw records -> cropped uint8 images: JPEG/PNG/... decoding and the train/valid crop calls.

These are the worker-process tasks of the loader, so they take plain lists and return plain
arrays (picklable), and every random choice comes from `crop_rng`: a function of where the
sample lives, never of which worker ran it.
"""

import io

import numpy as np
import simplejpeg
from PIL import Image

from deit import crop
from deit.data.shards import Record


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
            # most images are RGB already: convert() would copy the pixels for nothing
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
        return None


def crop_rng(seed: int, epoch: int, shard: int, pos: int, copy: int) -> np.random.Generator:
    """Crop randomness of one copy of one sample: a function of where the sample lives and
    the epoch only, so it does not depend on workers, buffering or resumption."""
    return np.random.default_rng([seed, epoch, 2, shard, pos, copy])


def decode_train(items: list[tuple[int, int, Record]], size: int, mode: str, repeats: int,
                 seed: int) -> list[np.ndarray | None]:
    """[repeats, size, size, 3] crops per (epoch, index, record), None for corrupt ones (worker task)."""
    out: list[np.ndarray | None] = []
    for epoch, _, rec in items:
        img = decode_image(rec.image) if rec.label is not None else None
        crops = [] if img is None else [crop.train_crop(crop_rng(seed, epoch, rec.shard, rec.pos, c), img, size, mode)
                                        for c in range(repeats)]
        out.append(None if img is None else crops[0][None] if repeats == 1 else np.stack(crops))
    return out


def decode_valid(items: list[Record], size: int, crop_ratio: float) -> list[np.ndarray | None]:
    """The eval crop (resize + center crop) per record, None for corrupt ones (worker task)."""
    out: list[np.ndarray | None] = []
    for rec in items:
        img = decode_image(rec.image) if rec.label is not None else None
        out.append(None if img is None else crop.eval_crop(img, size, crop_ratio))
    return out
