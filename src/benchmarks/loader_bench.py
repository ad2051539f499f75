"""Host loader throughput: how many decoded, cropped images per second the input pipeline makes.

`benchmark_loader` times the real `train_batches` / `valid_batches` iterators (tar reading,
shuffle, JPEG decode, crop, batching, worker processes) with nothing consuming on a device, so
the figure is the ceiling the host can feed. `photo_shards` writes ImageNet-like JPEG shards
for a benchmark when no dataset is at hand.

JPEG decoder (`jpeg_decoder`, reported by `benchmark.py loader`): simplejpeg, full resolution.
It wraps libjpeg-turbo with the same settings as Pillow (accurate integer DCT, fancy
upsampling), so its pixels equal Pillow's bit for bit (tests/test_data.py checks), but it
decodes straight into a numpy RGB array: on 500x375 q90 photos about 600 us against Pillow's
800 us, which decodes into a 4-byte-per-pixel buffer the crop then copies again.
cv2.imdecode is as fast but needs a 60 MB OpenCV wheel; PyTurboJPEG needs a system
libturbojpeg. No DCT-domain downscaling (simplejpeg min_factor, PIL draft): it keeps the
crop exact only where the RandomResizedCrop box is at least 2x the output on both sides,
which a 224 crop of a 500x375 image never is. timm's side keeps Pillow (`pil_jpeg_decoder`),
as timm's ImageFolder does. The crop's resize is `crop.resize`: Pillow's antialiased bicubic
recomputed as sparse float32 matrix products (equal to Pillow's within 1 on ~2 values in 10^5).
"""

import io
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from deit.config import AugmentConfig, Config, DataConfig, ModelConfig
from deit.data.loader import train_batches, valid_batches
from deit.data.prepare import write_shard


def jpeg_decoder() -> str:
    """The decoder `deit.data.decode.decode_image` uses for (YCbCr / grayscale) JPEGs."""
    import simplejpeg

    return f"simplejpeg {simplejpeg.__version__} (libjpeg-turbo), full-resolution decode into numpy RGB"


def pil_jpeg_decoder() -> str:
    import PIL
    from PIL import features

    turbo = "libjpeg-turbo" if features.check_feature("libjpeg_turbo") else "libjpeg"
    return f"PIL {PIL.__version__} ({turbo} {features.version('jpg')}), full-resolution decode, no draft"


def loader_config(spec: str, *, image_size: int, batch_size: int, workers: int, random_crop: str,
                  augment_repeats: int, shuffle_buffer: int) -> Config:
    # labels=0: no head, so the loader skips the label range check (any dataset's labels pass).
    model = ModelConfig(layers=1, dim=8, heads=1, labels=0, patch_size=image_size, image_size=image_size)
    return Config(model=model,
                  data=DataConfig(train_dataset_shards=spec, valid_dataset_shards=spec, train_batch_size=batch_size,
                                  valid_batch_size=batch_size, train_loader_workers=workers,
                                  valid_loader_workers=workers, shuffle_buffer=shuffle_buffer),
                  augment=AugmentConfig(random_crop=random_crop, augment_repeats=augment_repeats))


def benchmark_loader(spec: str, *, split: str = "train", image_size: int = 224, batch_size: int = 64,
                     workers: int = 0, random_crop: str = "rrc", augment_repeats: int = 1, batches: int = 20,
                     warmup: int = 2, shuffle_buffer: int = 1000) -> dict[str, float | int | str]:
    """Images per second of the host loader over `batches` batches after `warmup` ones.

    `images_per_s_per_core` divides by the decoding processes (workers, or 1 for the main
    process); `distinct_images_per_s` counts decodes (a batch holds batch/augment_repeats).
    `images_per_cpu_s` (workers=0 only, else None) divides by this process's CPU time instead
    of wall time, which other processes competing for the cores distort far less.
    A valid split stops early at the end of its single pass.
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split={split!r}: allowed 'train', 'valid'")
    cfg = loader_config(spec, image_size=image_size, batch_size=batch_size, workers=workers,
                        random_crop=random_crop, augment_repeats=augment_repeats, shuffle_buffer=shuffle_buffer)
    loader = train_batches(cfg) if split == "train" else valid_batches(cfg)
    try:
        for _ in range(warmup):
            next(loader)
        start, cpu_start, n = time.perf_counter(), time.process_time(), 0
        for _ in range(batches):
            try:
                next(loader)
            except StopIteration:
                break
            n += 1
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        loader.close()
    if n == 0:
        raise ValueError(f"shard spec {spec!r} gave no {split} batches after {warmup} warmup batches")
    per_s = n * batch_size / seconds
    return {
        "split": split, "images_per_s": per_s, "images_per_s_per_core": per_s / max(1, workers),
        "distinct_images_per_s": per_s / (augment_repeats if split == "train" else 1),
        "workers": workers, "cpu_count": os.cpu_count() or 1, "batch_size": batch_size,
        "image_size": image_size, "random_crop": random_crop if split == "train" else "eval",
        "batches": n, "seconds": seconds, "skipped": loader.skipped, "cpu_seconds": cpu_seconds,
        "images_per_cpu_s": n * batch_size / cpu_seconds if workers == 0 and cpu_seconds > 0 else None,
    }


def photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A smooth random colour field with some texture: JPEG-compresses and decodes like a
    photograph (pure noise would make unrealistically large, slow files)."""
    w, h = size
    coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def skimage_sources() -> list[np.ndarray]:
    """The colour photographs bundled with scikit-image (no download): people, animals, a
    rocket, a street scene, a microscope slide, a retina, a deep-sky field."""
    import skimage.data as d

    return [d.astronaut(), d.chelsea(), d.coffee(), d.rocket(), d.hubble_deep_field(), d.immunohistochemistry(),
            d.retina(), d.stereo_motorcycle()[0]]


def skimage_photo(rng: np.random.Generator, sources: list[np.ndarray], size: tuple[int, int]) -> Image.Image:
    """A random crop (30-100% of the shorter side, aspect near `size`'s), flip and resize of one
    skimage photo to `size` (portrait one time in four), so no two files are the same."""
    w, h = size if rng.random() >= 0.25 else size[::-1]
    src = sources[int(rng.integers(len(sources)))]
    sh, sw = src.shape[:2]
    aspect = w / h * float(np.exp(rng.uniform(-0.1, 0.1)))
    ch = int(min(sh, sw / aspect) * rng.uniform(0.3, 1.0))
    cw = max(1, min(sw, int(round(ch * aspect))))
    y, x = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    img = Image.fromarray(src[y:y + ch, x:x + cw])
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    resample = (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS)[int(rng.integers(3))]
    return img.resize((w, h), resample)


def photo_shards(out_dir: str | os.PathLike, count: int = 512, *, size: tuple[int, int] = (500, 375),
                 shard_size: int = 256, quality: int = 90, seed: int = 0, source: str = "skimage") -> str:
    """Write `count` JPEGs of about `size` (ImageNet's typical 500x375) as shards; returns the spec.

    source 'skimage': random crops / flips / resizes of scikit-image's bundled photographs
    (real image statistics, so JPEG sizes and decode times are ImageNet-like); 'synthetic':
    smooth random colour fields (`photo`).
    """
    if source not in ("skimage", "synthetic"):
        raise ValueError(f"source={source!r}: allowed 'skimage', 'synthetic'")
    rng = np.random.default_rng(seed)
    sources = skimage_sources() if source == "skimage" else []
    n_shards = -(-count // shard_size)
    for s in range(n_shards):
        def samples(lo: int = s * shard_size):
            for i in range(lo, min(count, lo + shard_size)):
                buf = io.BytesIO()
                img = skimage_photo(rng, sources, size) if sources else photo(rng, size)
                img.save(buf, format="JPEG", quality=quality)
                yield f"{i:08d}", {"jpg": buf.getvalue(), "cls": str(i % 1000).encode()}
        write_shard(Path(out_dir) / f"photos-{s:04d}.tar", samples())
    return str(Path(out_dir) / f"photos-{{0000..{n_shards - 1:04d}}}.tar")
