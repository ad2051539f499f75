"""Host input pipeline: webdataset shards -> decoded, cropped uint8 batches.

Train: every epoch draws a seeded shard permutation, gives each process a disjoint share,
reads the share as a stream of raw (undecoded) records, shuffles it through a seeded buffer,
then decodes and crops (in worker processes if asked) and assembles batches in a background
thread. Every random choice derives from (shuffle_seed, epoch, ...), never from worker timing,
so the batches are the same for any worker count and a resumed loader repeats them exactly.

Repeated augmentation (augment_repeats k, as deit3-jax): each decoded sample is k consecutive
slots of the sample stream, each copy cropped independently; batches are cut from that stream
at any size (a sample's copies may straddle two batches), and inside each micro-batch the slots
are reordered `b[i::k]` for i < k so that copies land on different data-parallel devices.

Valid: every sample exactly once; batches padded with mask False, and every process yields
the same number of batches, so a multi-host eval loop never waits on a missing collective.
"""

import concurrent.futures
import functools
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import queue
import re
import shutil
import tarfile
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from glob import glob
from pathlib import Path
from typing import Any, NamedTuple

import braceexpand
import numpy as np
import simplejpeg
from jaxtyping import Float, Int, UInt8
from PIL import Image
from tqdm import tqdm
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from deit import crop
from deit.config import Config, check_divisible
from deit.fileio import atomic_path, write_text

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
DIGITS_SPLITS = {"train": slice(0, 1437), "valid": slice(1437, 1797)}
URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


# ----------------------------------------------------------------------------- shard writing

def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write `(key, {ext: bytes})` samples as one tar shard, atomically; returns the count.

    Fixed mtime/owner so the same samples give byte-identical shards.
    """
    n = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


def encode_png(img: UInt8[np.ndarray, "h w 3"]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def digit_image(pixels: Float[np.ndarray, "8 8"]) -> UInt8[np.ndarray, "32 32 3"]:
    """One load_digits image (values 0..16) as 32x32 RGB uint8, upscaled bicubically.

    Bicubic rather than nearest: with 4x4-pixel patches a nearest upscale makes every patch
    token a single flat grey level, and a ViT learned several times slower from such tokens
    on this data (59% vs 22% val top-1 after 300 steps in our runs); smooth strokes give
    each patch local shape, as real photos do.
    """
    gray = np.round(pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(gray).resize((32, 32), Image.Resampling.BICUBIC))
    return np.repeat(big[:, :, None], 3, axis=2)


def prepare_digits(out_dir: str | os.PathLike, shard_size: int = 256) -> tuple[str, str]:
    """Write sklearn's digits as webdataset shards (png + cls); returns (train_spec, valid_spec).

    The first 1437 images (load_digits order) are train, the last 360 valid; several shards
    per split so multi-process sharding has something to split.
    """
    from sklearn.datasets import load_digits

    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be >= 1")
    digits = load_digits()
    specs = []
    for split, sl in DIGITS_SPLITS.items():
        idx = np.arange(len(digits.images))[sl]
        n_shards = math.ceil(len(idx) / shard_size)
        for s in range(n_shards):
            part = idx[s * shard_size:(s + 1) * shard_size]
            write_shard(Path(out_dir) / f"digits-{split}-{s:04d}.tar",
                        ((f"{i:05d}", {"png": encode_png(digit_image(digits.images[i])),
                                       "cls": str(int(digits.target[i])).encode()}) for i in part))
        specs.append(str(Path(out_dir) / f"digits-{split}-{{0000..{n_shards - 1:04d}}}.tar"))
    return specs[0], specs[1]


def folder_classes(src: Path) -> list[str]:
    """ImageFolder classes: the sorted subfolder names (torchvision's class order)."""
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {str(src)!r} has no class subfolders; expected SRC/<class>/<image>")
    return classes


def folder_files(src: Path, class_to_idx: dict[str, int]) -> list[tuple[Path, int]]:
    """(image path, label) for every image file under SRC/<class>/ (any depth), sorted."""
    files = []
    for name in folder_classes(src):
        if name not in class_to_idx:
            raise ValueError(f"class folder {name!r} is not in the class index; known: {len(class_to_idx)} classes")
        files += [(p, class_to_idx[name]) for p in sorted((src / name).rglob("*"))
                  if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS]
    return files


def prepare_folder(src: str | os.PathLike, out_dir: str | os.PathLike, *, prefix: str | None = None,
                   shard_size: int = 1000, seed: int = 0, classes: str | os.PathLike | None = None,
                   progress: bool = True) -> tuple[str, dict[str, int]]:
    """ImageFolder tree (SRC/<class>/<image>) -> shuffled webdataset shards; returns (spec, class_to_idx).

    The image bytes are stored as they are (no re-encode); keys are running numbers and a
    `json` member keeps the source path. Files are shuffled (seeded) before sharding, since
    a class-sorted shard would defeat the loader's shard + buffer shuffle. The class index
    is written to OUT/<prefix>-classes.json; pass `classes` (e.g. train's JSON) to give a
    validation folder the same label numbers.
    """
    src, out = Path(src), Path(out_dir)
    if not src.is_dir():
        raise ValueError(f"image folder {str(src)!r} does not exist")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be >= 1")
    prefix = prefix or src.name
    class_to_idx = (json.loads(Path(classes).read_text()) if classes is not None
                    else {c: i for i, c in enumerate(folder_classes(src))})
    files = folder_files(src, class_to_idx)
    if not files:
        raise ValueError(f"image folder {str(src)!r} has no images with extensions {IMAGE_EXTS}")
    order = np.random.default_rng(seed).permutation(len(files))
    n_shards = math.ceil(len(files) / shard_size)
    bar = tqdm(total=len(files), desc=f"{prefix} shards", unit="img", disable=not progress)

    def samples(part: np.ndarray) -> Iterator[tuple[str, dict[str, bytes]]]:
        for i in part:
            path, label = files[i]
            ext = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            meta = json.dumps({"path": str(path.relative_to(src)), "label": label}).encode()
            yield f"{i:08d}", {ext: path.read_bytes(), "cls": str(label).encode(), "json": meta}
            bar.update()

    for s in range(n_shards):
        write_shard(out / f"{prefix}-{s:04d}.tar", samples(order[s * shard_size:(s + 1) * shard_size]))
    bar.close()
    write_text(out / f"{prefix}-classes.json", json.dumps(class_to_idx, indent=1))
    return str(out / f"{prefix}-{{0000..{n_shards - 1:04d}}}.tar"), class_to_idx


def cache_root() -> Path:
    """`$DEIT_CACHE`, else ~/.cache/deit."""
    return Path(os.environ.get("DEIT_CACHE") or Path.home() / ".cache" / "deit")


DIGITS_FORMAT = 2  # bump when the encoding of the digits shards changes: old caches are not reused


def ensure_digits() -> Path:
    """The digits shard folder in the cache, prepared once; safe when processes race.

    Each process prepares into its own temp folder and renames it into place; a loser of the
    race (rename onto a non-empty folder fails) drops its copy.
    """
    final = cache_root() / f"digits-v{DIGITS_FORMAT}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".digits-"))
    try:
        prepare_digits(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- shard specs

def expand_shards(spec: str) -> list[str]:
    """Shard URLs of a spec: brace patterns, local paths/globs, `pipe:CMD`, scheme:// URLs,
    or `digits:train` / `digits:valid` (prepared into the cache on first use)."""
    if spec.startswith("digits:"):
        split = spec.split(":", 1)[1]
        if split not in DIGITS_SPLITS:
            raise ValueError(f"shard spec {spec!r}: allowed digits splits are 'digits:train', 'digits:valid'")
        return sorted(str(p) for p in ensure_digits().glob(f"digits-{split}-*.tar"))
    urls: list[str] = []
    for url in braceexpand.braceexpand(spec):
        if url.startswith("pipe:") or URL_RE.match(url):
            urls.append(url)  # opened by webdataset's gopen (pipe, http(s), gs, ...)
        elif any(c in url for c in "*?["):
            urls.extend(sorted(glob(url)))
        elif os.path.exists(url):
            urls.append(url)
    if not urls:
        raise ValueError(f"shard spec {spec!r} matches no shards; allowed: existing local paths/globs, "
                         "brace patterns, pipe:CMD, scheme:// URLs, digits:train, digits:valid")
    return urls


def is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or URL_RE.match(url))


# ----------------------------------------------------------------------------- reading

class Record(NamedTuple):
    """One raw sample: where it lives (shard index in the spec, position in the shard) and its
    undecoded image bytes and label; image/label None mark a corrupt sample."""

    url: str
    key: str
    shard: int
    pos: int
    image: bytes | None
    label: int | None


def group_samples(files: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Consecutive tar members with the same key prefix -> {"__key__", ext: bytes}."""
    sample: dict[str, Any] | None = None
    for f in files:
        key, ext = base_plus_ext(f["fname"])
        if key is None:
            continue
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        sample[ext.lower()] = f["data"]
    if sample is not None:
        yield sample


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard; a shard that cannot be opened or read to the end is logged and
    ends early (as webdataset's warn_and_continue), so one bad shard does not stop training."""
    try:
        stream = gopen(url, "rb")
        try:
            yield from group_samples(tar_file_iterator(stream))
        finally:
            stream.close()
    except Exception as exn:  # noqa: BLE001 - any I/O or tar error ends this shard only
        log.warning("skipping the rest of shard %s: %s", url, exn)


def count_samples(url: str) -> int:
    """Samples in a shard (memoised; local tars are scanned by header)."""
    return len(sample_flags(url, 0))


def sample_flags(url: str, labels: int) -> np.ndarray:
    """bool per sample of a shard, in shard order: has an image and a readable label.

    Memoised; a local tar is scanned by header, reading only the tiny `cls` members, so
    resuming from a step can skip whole epochs without reading image bytes.
    """
    if is_local(url):
        st = os.stat(url)
        return _flags_local(url, st.st_mtime_ns, st.st_size, labels)
    return _flags_stream(url, labels)


def _flags(samples: Iterable[dict[str, Any]], url: str, labels: int) -> np.ndarray:
    return np.array([image_bytes(s) is not None and parse_label(s, url, labels) is not None for s in samples], bool)


@functools.lru_cache(maxsize=None)
def _flags_local(path: str, mtime_ns: int, size: int, labels: int) -> np.ndarray:
    try:
        with tarfile.open(path, "r:") as tar:  # seeks past the members it does not read
            files = [{"fname": m.name, "data": tar.extractfile(m).read() if m.name.lower().endswith(".cls") else b""}
                     for m in tar if m.isreg() and not is_meta(m.name)]
    except (OSError, tarfile.TarError) as exn:
        log.warning("scanning shard %s failed (%s); reading it as a stream", path, exn)
        return _flags_stream(path, labels)
    return _flags(group_samples(files), path, labels)


@functools.lru_cache(maxsize=None)
def _flags_stream(url: str, labels: int) -> np.ndarray:
    return _flags(iter_shard(url), url, labels)


def is_meta(name: str) -> bool:
    """Tar members webdataset's tar_file_iterator skips (`__meta__` files and folders)."""
    return bool(re.match(r"__[^/]*__($|/)", name))


def image_bytes(sample: dict[str, Any]) -> bytes | None:
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def parse_label(sample: dict[str, Any], url: str, labels: int) -> int | None:
    """The `cls` label; None if missing or unreadable, ValueError if outside [0, labels)."""
    try:
        label = int(sample["cls"].decode().strip())
    except (KeyError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    if labels > 0 and not 0 <= label < labels:
        raise ValueError(f"label {label} of sample {sample['__key__']!r} in shard {url} is outside [0, {labels})")
    return label


def shard_records(urls: list[str], order: Iterable[int], labels: int) -> Iterator[Record]:
    for s in order:
        for pos, sample in enumerate(iter_shard(urls[s])):
            yield Record(urls[s], sample["__key__"], s, pos, image_bytes(sample), parse_label(sample, urls[s], labels))


def process_records(urls: list[str], order: list[int], labels: int, process_index: int,
                    process_count: int) -> Iterator[Record]:
    """This process's records: its shards (order[p::P]) or, with fewer shards than
    processes, every P-th sample of the whole stream."""
    if len(order) >= process_count:
        return shard_records(urls, order[process_index::process_count], labels)
    return itertools.islice(shard_records(urls, order, labels), process_index, None, process_count)


def shuffled(items: Iterable[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Seeded shuffle buffer: emit a random buffered item per new item, then drain in random order."""
    if buffer_size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        j = int(rng.integers(buffer_size))
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[j]


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """Epoch's shard permutation, identical on every process (so shares are disjoint)."""
    return [int(i) for i in np.random.default_rng([seed, epoch, 0]).permutation(n_shards)]


def epoch_stream(urls: list[str], seed: int, epoch: int, buffer_size: int, labels: int,
                 process_index: int, process_count: int) -> Iterator[Record]:
    """One epoch of this process's raw records, in final (shuffled) order."""
    records = process_records(urls, shard_order(len(urls), seed, epoch), labels, process_index, process_count)
    return shuffled(records, buffer_size, shuffle_rng(seed, epoch, process_index))


def shuffle_rng(seed: int, epoch: int, process_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, 1, process_index])


def epoch_flags(urls: list[str], seed: int, epoch: int, labels: int, process_index: int,
                process_count: int) -> np.ndarray:
    """`sample_flags` of this process's records of an epoch, in pre-shuffle order."""
    order = shard_order(len(urls), seed, epoch)
    mine = order[process_index::process_count] if len(order) >= process_count else order
    flags = np.concatenate([sample_flags(urls[s], labels) for s in mine])
    return flags if len(order) >= process_count else flags[process_index::process_count]


def train_records(urls: list[str], seed: int, buffer_size: int, labels: int, process_index: int,
                  process_count: int, epoch: int = 0, offset: int = 0) -> Iterator[tuple[int, int, Record]]:
    """(epoch, index in epoch, record) forever, starting at record `offset` of `epoch`."""
    for e in itertools.count(epoch):
        n = 0
        for i, rec in enumerate(epoch_stream(urls, seed, e, buffer_size, labels, process_index, process_count)):
            n += 1
            if i >= offset:
                yield e, i, rec
        if n == 0:
            raise ValueError(f"no training samples for process {process_index} of {process_count} "
                             f"in {len(urls)} shard(s), e.g. {urls[0]}")
        offset = 0


# ----------------------------------------------------------------------------- decoding

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
    out: list[np.ndarray | None] = []
    for rec in items:
        img = decode_image(rec.image) if rec.label is not None else None
        out.append(None if img is None else crop.eval_crop(img, size, crop_ratio))
    return out


def chunked(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def ordered_map(fn: Callable[[list[Any]], list[Any]], chunks: Iterable[list[Any]],
                pool: concurrent.futures.Executor | None, inflight: int) -> Iterator[tuple[list[Any], list[Any]]]:
    """(chunk, fn(chunk)) in input order, at most `inflight` chunks submitted ahead."""
    if pool is None:
        for c in chunks:
            yield c, fn(c)
        return
    pending: deque = deque()
    for c in chunks:
        pending.append((c, pool.submit(fn, c)))
        if len(pending) >= inflight:
            c0, fut = pending.popleft()
            yield c0, fut.result()
    while pending:
        c0, fut = pending.popleft()
        yield c0, fut.result()


def make_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor | None:
    # spawn, not fork: forking a process that has started JAX's threads can deadlock.
    if workers < 0:
        raise ValueError(f"loader workers={workers}: must be >= 0")
    if workers == 0:
        return None
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


# ----------------------------------------------------------------------------- the loader

class Loader:
    """Iterator over batches made by a background thread (bounded prefetch).

    `state` is the resume state after the last batch handed out, `skipped` the number of
    corrupt samples dropped so far. Call `close()` (or drop the loader) to stop the thread.
    """

    def __init__(self, stream: Callable[[concurrent.futures.Executor | None], Iterator[tuple[Any, dict]]],
                 workers: int, prefetch: int, state: dict[str, int]):
        self.state = dict(state)
        self._pool = make_pool(workers)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=_produce, args=(stream(self._pool), self._queue, self._stop),
                                        daemon=True, name="deit-loader")
        self._thread.start()

    @property
    def skipped(self) -> int:
        return self.state.get("skipped", 0)

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> tuple:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "batch":
            batch, self.state = value
            return batch
        self.close()
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        self._done = True
        if hasattr(self, "_stop"):  # __init__ may have failed before creating it
            self._stop.set()
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        self.close()


def _produce(batches: Iterator[tuple[Any, dict]], q: queue.Queue, stop: threading.Event) -> None:
    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        for item in batches:
            if not put(("batch", item)):
                return
    except BaseException as exn:  # noqa: BLE001 - handed to the consumer
        if not stop.is_set():
            put(("error", exn))
        return
    put(("end", None))


STATE_KEYS = ("epoch", "offset", "copies", "skipped")
"""Train loader state: the next slot of the repeated stream is copy `copies` of record `offset`
of `epoch` (records before it are done); `skipped` counts the corrupt records dropped so far."""


def spread_order(n: int, k: int) -> Int[np.ndarray, " n"]:
    """deit3-jax's order of n consecutive stream slots in its loader batch,
    `sum([batch[i::k] for i in range(k)], [])`: a sample's k copies end up about n/k apart."""
    return np.concatenate([np.arange(i, n, k) for i in range(k)])


def slot_positions(local: int, accum: int, k: int) -> Int[np.ndarray, " local"]:
    """Host-batch index of each of the batch's `local` consecutive stream slots.

    The train step splits the batch into `accum` contiguous micro-batches, and deit3-jax's loader
    batch is one micro-batch, so each micro-batch is cut from the stream and spread on its own.
    """
    m = local // accum
    return (np.arange(accum)[:, None] * m + np.argsort(spread_order(m, k))[None]).reshape(-1)


def stream_state(epoch: int, index: int, copy: int, k: int, skipped: int) -> dict[str, int]:
    """State after handing out copy `copy` (of k) of record `index`: past it once all copies are out."""
    done = copy + 1 == k
    return {"epoch": epoch, "offset": index + done, "copies": 0 if done else copy + 1, "skipped": skipped}


def full_state(state: dict[str, int], k: int) -> dict[str, int]:
    """A given train state with every key; states of older checkpoints lack `copies` (0 pending)."""
    if set(state) not in (set(STATE_KEYS), set(STATE_KEYS) - {"copies"}):
        raise ValueError(f"loader state {state}: expected keys {', '.join(STATE_KEYS)} (copies may be absent)")
    state = {key: int(state.get(key, 0)) for key in STATE_KEYS}
    if not 0 <= state["copies"] < k:
        raise ValueError(f"loader state {state}: copies must be in [0, augment_repeats={k})")
    return state


def check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}, process_count={process_count}: "
                         "need 0 <= process_index < process_count")


def train_stream(pool: concurrent.futures.Executor | None, urls: list[str], cfg: Config, process_index: int,
                 process_count: int, state: dict[str, int]) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], dict]]:
    """Batches with the resume state after each: the stream position just past the batch's last slot.

    The stream holds each decoded record k times in a row (copy c cropped with `crop_rng(..., c)`);
    a batch is its next `local` slots, placed by `slot_positions`. A state with `copies` > 0 resumes
    inside a record: its first `copies` copies went out in the previous batch.
    """
    size, k = cfg.model.image_size, cfg.augment.augment_repeats
    local = cfg.data.train_batch_size // process_count
    place = slot_positions(local, cfg.optim.grad_accum, k)
    seed = cfg.data.shuffle_seed
    records = train_records(urls, seed, cfg.data.shuffle_buffer, cfg.model.labels, process_index,
                            process_count, state["epoch"], state["offset"])
    fn = functools.partial(decode_train, size=size, mode=cfg.augment.random_crop, repeats=k, seed=seed)
    chunk = max(1, min(-(-local // k), 32))
    skipped, first = state["skipped"], state["copies"]  # first: copies of the first record already out
    images = np.empty((local, size, size, 3), np.uint8)
    labels = np.empty((local,), np.int32)
    j, current, good = 0, state["epoch"], 1  # good: decoded samples of epoch `current`
    for recs, crops in ordered_map(fn, chunked(records, chunk), pool, 2 * cfg.data.train_loader_workers + 1):
        for (epoch, i, rec), crops_ in zip(recs, crops):
            if epoch != current:
                if not good:  # else an all-corrupt dataset would spin forever
                    raise ValueError(f"no decodable training samples for process {process_index} in epoch "
                                     f"{current} of {len(urls)} shard(s), e.g. {urls[0]}")
                current, good = epoch, 0
            if crops_ is None:
                skipped, first = skipped + 1, 0
                if skipped <= 10:
                    log.warning("skipping corrupt sample %r in %s", rec.key, rec.url)
                continue
            good += 1
            for c in range(first, k):
                images[place[j]], labels[place[j]] = crops_[c], rec.label
                j += 1
                if j == local:
                    yield (images, labels), stream_state(epoch, i, c, k, skipped)
                    images, labels, j = np.empty_like(images), np.empty_like(labels), 0
            first = 0


def skip_state(urls: list[str], cfg: Config, process_index: int, process_count: int, steps: int) -> dict[str, int]:
    """Resume state after `steps` batches, computed from per-shard sample flags alone.

    `steps` batches are steps * local slots of the repeated stream: `need` = ceil(slots / k)
    records begun, the last with `slots % k` copies out (0: all k). Whole epochs are skipped by
    counting; in the last one the shuffle buffer is replayed on indices (its order depends only
    on the seed and the count, not on the data). Exact unless images that fail to decode came
    before that point (only decoding finds those); the `state` of a running loader is exact always.
    """
    seed, labels, k = cfg.data.shuffle_seed, cfg.model.labels, cfg.augment.augment_repeats
    slots = steps * (cfg.data.train_batch_size // process_count)
    need, copies = -(-slots // k), slots % k
    skipped = 0
    if need == 0:
        return {"epoch": 0, "offset": 0, "copies": 0, "skipped": 0}
    for epoch in itertools.count():
        flags = epoch_flags(urls, seed, epoch, labels, process_index, process_count)
        if not flags.any():
            raise ValueError(f"no training samples for process {process_index} of {process_count} "
                             f"in {len(urls)} shard(s), e.g. {urls[0]}")
        good = int(flags.sum())
        if need > good:
            need, skipped = need - good, skipped + len(flags) - good
            continue
        order = np.fromiter(shuffled(range(len(flags)), cfg.data.shuffle_buffer,
                                     shuffle_rng(seed, epoch, process_index)), int, len(flags))
        last = int(np.searchsorted(np.cumsum(flags[order]), need))  # index of the need-th good record
        # a partly handed-out record is still pending: the stream resumes at it, not past it
        return {"epoch": epoch, "offset": last + (copies == 0), "copies": copies,
                "skipped": skipped + last + 1 - need}
    raise AssertionError("unreachable")


def train_batches(cfg: Config, *, process_index: int = 0, process_count: int = 1, start_step: int = 0,
                  state: dict[str, int] | None = None, prefetch: int = 4) -> Loader:
    """Infinite iterator of (images uint8 [local_batch, S, S, 3], labels int32 [local_batch]).

    local_batch = train_batch_size // process_count, of any size. With augment_repeats k each
    decoded sample is k consecutive slots of this process's sample stream (cropped independently)
    and a batch is the next local_batch slots, so a sample's copies may fall into two batches.
    As in deit3-jax, whose loader batch is one micro-batch, each of the grad_accum micro-batches
    (local_batch / grad_accum slots) is ordered `b[i::k]` for i < k, so copies sit about
    micro/k apart, on different devices. Resume with the `state` of a previous loader (exact;
    older states without `copies` load) or `start_step` (replays the stream).
    """
    check_process(process_index, process_count)
    local = check_divisible("train_batch_size", cfg.data.train_batch_size, process_count, f"process_count={process_count}")
    accum = cfg.optim.grad_accum
    if local % accum:
        raise ValueError(f"grad_accum={accum}: must divide the per-process batch {local}")
    if cfg.data.shuffle_seed < 0:
        raise ValueError(f"shuffle_seed={cfg.data.shuffle_seed}: must be >= 0")
    if state is not None and start_step:
        raise ValueError(f"start_step={start_step} and state={state}: give one of them")
    if start_step < 0:
        raise ValueError(f"start_step={start_step}: must be >= 0")
    urls = expand_shards(cfg.data.train_dataset_shards)
    state = (skip_state(urls, cfg, process_index, process_count, start_step) if state is None
             else full_state(state, cfg.augment.augment_repeats))
    return Loader(functools.partial(train_stream, urls=urls, cfg=cfg, process_index=process_index,
                                    process_count=process_count, state=state),
                  cfg.data.train_loader_workers, prefetch, state)


def valid_plan(urls: list[str], process_count: int, batch: int) -> int:
    """Batches every process yields: enough for the process with the most samples."""
    counts = [count_samples(u) for u in urls]
    if len(urls) >= process_count:
        per = [sum(counts[p::process_count]) for p in range(process_count)]
    else:
        total = sum(counts)
        per = [len(range(p, total, process_count)) for p in range(process_count)]
    return math.ceil(max(per) / batch)


def valid_stream(pool: concurrent.futures.Executor | None, urls: list[str], cfg: Config, process_index: int,
                 process_count: int, batch: int) -> Iterator[tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict]]:
    size = cfg.model.image_size
    n_batches = valid_plan(urls, process_count, batch)
    records = process_records(urls, list(range(len(urls))), cfg.model.labels, process_index, process_count)
    fn = functools.partial(decode_valid, size=size, crop_ratio=cfg.augment.test_crop_ratio)
    workers = cfg.data.valid_loader_workers

    def empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.zeros((batch, size, size, 3), np.uint8), np.zeros((batch,), np.int32), np.zeros((batch,), bool)

    skipped, emitted, j = 0, 0, 0
    images, labels, mask = empty()
    for recs, crops in ordered_map(fn, chunked(records, max(1, min(batch, 32))), pool, 2 * workers + 1):
        for rec, img in zip(recs, crops):
            if img is None:
                skipped += 1
                log.warning("skipping corrupt sample %r in %s", rec.key, rec.url)
                continue
            images[j], labels[j], mask[j] = img, rec.label, True
            j += 1
            if j == batch:
                if emitted == n_batches:
                    raise RuntimeError(f"valid shards hold more samples than counted ({n_batches} batches of {batch})")
                yield (images, labels, mask), {"skipped": skipped}
                emitted, j = emitted + 1, 0
                images, labels, mask = empty()
    while emitted < n_batches:
        yield (images, labels, mask), {"skipped": skipped}
        emitted, j = emitted + 1, 0
        images, labels, mask = empty()


def valid_batches(cfg: Config, *, process_index: int = 0, process_count: int = 1, prefetch: int = 4) -> Loader:
    """One pass of (images uint8 [B, S, S, 3], labels int32 [B], mask bool [B]), B =
    valid_batch_size // process_count; each sample exactly once, padding masked out, the
    same number of batches on every process."""
    check_process(process_index, process_count)
    batch = check_divisible("valid_batch_size", cfg.data.valid_batch_size, process_count, f"process_count={process_count}")
    urls = expand_shards(cfg.data.valid_dataset_shards)
    return Loader(functools.partial(valid_stream, urls=urls, cfg=cfg, process_index=process_index,
                                    process_count=process_count, batch=batch),
                  cfg.data.valid_loader_workers, prefetch, {"skipped": 0})
