"""Webdataset shards: specs -> shard URLs, tar members -> samples -> raw records, which samples
are usable (an image and a readable label), and how many samples a shard holds.

Nothing here decodes an image or knows about the `digits:` specs: those name prepared shards,
which `deit.data.loader.resolve_shards` turns into paths before they reach this module.
"""

import functools
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from glob import glob
from typing import Any, NamedTuple

import braceexpand
import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def expand_shards(spec: str) -> list[str]:
    """Shard URLs of a spec: brace patterns, local paths/globs, `pipe:CMD`, scheme:// URLs."""
    urls: list[str] = []
    for url in braceexpand.braceexpand(spec):
        if not is_local_path(url):
            urls.append(url)  # opened by webdataset's gopen (pipe, http(s), gs, ...)
        elif any(c in url for c in "*?["):
            urls.extend(sorted(glob(url)))
        elif os.path.exists(url):
            urls.append(url)
    if not urls:
        raise ValueError(f"shard spec {spec!r} matches no shards; allowed: existing local paths/globs, "
                         "brace patterns, pipe:CMD, scheme:// URLs, digits:train, digits:valid")
    return urls


def is_local_path(url: str) -> bool:
    """Not a `pipe:` command or a scheme:// URL (fileio.is_local would parse a pipe's command line
    as an fsspec URL): a local file, which can be stat'ed and scanned by header."""
    return not (url.startswith("pipe:") or URL_RE.match(url))


# ----------------------------------------------------------------------------- reading

class Record(NamedTuple):
    """One raw sample: where it lives (shard index in the spec, position in the shard) and its
    undecoded image bytes and label; image/label None mark an unusable sample."""

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


def is_meta(name: str) -> bool:
    """Tar members webdataset's tar_file_iterator skips (`__meta__` files and folders)."""
    return bool(re.match(r"__[^/]*__($|/)", name))


def image_bytes(sample: dict[str, Any]) -> bytes | None:
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def parse_label(sample: dict[str, Any], url: str, num_labels: int) -> int | None:
    """The `cls` label; None if missing or unreadable, ValueError if outside [0, num_labels)
    (num_labels 0: no range check)."""
    try:
        label = int(sample["cls"].decode().strip())
    except (KeyError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    if num_labels > 0 and not 0 <= label < num_labels:
        raise ValueError(f"label {label} of sample {sample['__key__']!r} in shard {url} is outside [0, {num_labels})")
    return label


def shard_records(urls: list[str], order: Iterable[int], num_labels: int) -> Iterator[Record]:
    """Raw records of the shards `urls[s]` for s in `order`, in shard order."""
    for s in order:
        for pos, sample in enumerate(iter_shard(urls[s])):
            yield Record(urls[s], sample["__key__"], s, pos, image_bytes(sample),
                         parse_label(sample, urls[s], num_labels))


# ----------------------------------------------------------------------------- usable samples

def count_samples(url: str) -> int:
    """Samples in a shard (memoised; local tars are scanned by header)."""
    return len(sample_usable(url, 0))


def sample_usable(url: str, num_labels: int) -> np.ndarray:
    """bool per sample of a shard, in shard order: has an image and a readable label.

    Memoised; a local tar is scanned by header, reading only the tiny `cls` members, so
    resuming from a step can skip whole epochs without reading image bytes. (An image that
    fails to decode still counts as usable here: only decoding finds it.)
    """
    if is_local_path(url):
        st = os.stat(url)
        return _usable_local(url, st.st_mtime_ns, st.st_size, num_labels)
    return _usable_stream(url, num_labels)


def _usable(samples: Iterable[dict[str, Any]], url: str, num_labels: int) -> np.ndarray:
    return np.array([image_bytes(s) is not None and parse_label(s, url, num_labels) is not None
                     for s in samples], bool)


@functools.lru_cache(maxsize=None)
def _usable_local(path: str, mtime_ns: int, size: int, num_labels: int) -> np.ndarray:
    # mtime and size are in the cache key so a rewritten shard is scanned again
    try:
        with tarfile.open(path, "r:") as tar:  # seeks past the members it does not read
            files = [{"fname": m.name, "data": tar.extractfile(m).read() if m.name.lower().endswith(".cls") else b""}
                     for m in tar if m.isreg() and not is_meta(m.name)]
    except (OSError, tarfile.TarError) as exn:
        log.warning("scanning shard %s failed (%s); reading it as a stream", path, exn)
        return _usable_stream(path, num_labels)
    return _usable(group_samples(files), path, num_labels)


@functools.lru_cache(maxsize=None)
def _usable_stream(url: str, num_labels: int) -> np.ndarray:
    return _usable(iter_shard(url), url, num_labels)
