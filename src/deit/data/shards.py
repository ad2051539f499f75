"""Webdataset shards: specs -> shard URLs, tar members -> samples -> raw records, which samples
are usable (an image and a readable label), and how many samples a shard holds.

Nothing here decodes an image or knows about the `digits:` specs: those name prepared shards,
which `deit.data.loader.resolve_shards` turns into paths before they reach this module.

Bad data (issue 15). Up front (`expand_shards`, `check_shards`, before anything is written): a
spec naming a local file that does not exist, a directory, an empty file, a file that is not a
tar, an empty archive or a truncated one is a ValueError naming the shard and what is allowed.
The check is cheap: per local shard a stat, its first 512-byte header and its last 1024 bytes
(memoised on path, mtime and size, in a thread pool for many shards). Remote and `pipe:` shards
are checked lazily, when the loader opens them: one that cannot be opened or ends early is
warned about once and its readable samples are used (the rest of it is not read, so it is not
counted). Per sample: a missing, non-integer or out-of-range `.cls` makes the sample unusable
(skipped and counted by the loader, one warning line per shard at most).
"""

import concurrent.futures
import functools
import logging
import os
import re
import stat
import tarfile
from collections.abc import Iterable, Iterator
from glob import glob
from typing import Any, NamedTuple

import braceexpand
import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from deit.data.kept import Kept

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


SPEC_ALLOWED = ("existing local files or globs, brace patterns, pipe:CMD, scheme:// URLs, digits:train, "
                "digits:valid")
TAR_ALLOWED = "complete tar archives of webdataset samples (KEY.jpg/png/... + KEY.cls members)"


def expand_shards(spec: str) -> list[str]:
    """Shard URLs of a spec: brace patterns, local paths/globs, `pipe:CMD`, scheme:// URLs.

    Every explicit local path (not a glob) must exist: a spec whose files are all missing
    "matches no shards", one missing some names the first missing file. A glob matching nothing
    in a brace alternative is allowed as long as the whole spec matches something.
    """
    urls: list[str] = []
    missing: list[str] = []
    for url in braceexpand.braceexpand(spec):
        if not is_local_path(url):
            urls.append(url)  # opened by webdataset's gopen (pipe, http(s), gs, ...)
        elif any(c in url for c in "*?["):
            urls.extend(sorted(glob(url)))
        elif os.path.exists(url):
            urls.append(url)
        else:
            missing.append(url)
    if not urls:
        why = f" ({missing[0]} does not exist)" if missing else ""
        raise ValueError(f"shard spec {spec!r} matches no shards{why}; allowed: {SPEC_ALLOWED}")
    if missing:
        raise ValueError(f"shard {missing[0]} of spec {spec!r} does not exist ({len(missing)} of "
                         f"{len(missing) + len(urls)} shards missing); allowed: a spec whose every file exists")
    return urls


def is_local_path(url: str) -> bool:
    """Not a `pipe:` command or a scheme:// URL (fileio.is_local would parse a pipe's command line
    as an fsspec URL): a local file, which can be stat'ed and scanned by header."""
    return not (url.startswith("pipe:") or URL_RE.match(url))


# ----------------------------------------------------------------------------- up-front checks

COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: tars webdataset reads as well


def shard_problem(path: str) -> str | None:
    """What is wrong with a local shard, or None: it exists as a file, is not empty, starts
    with a valid tar header and ends with the two zero 512-byte blocks of a complete tar.

    Reads 512 + 1024 bytes. Python's tarfile and GNU tar also pad to a 10240-byte record, which
    is not required (some writers end right after the two zero blocks). A compressed tar
    (gzip/bzip2/xz magic) is only checked to be non-empty: its end is found when it is read.
    Memoised on (path, mtime, size).
    """
    try:
        st = os.stat(path)
    except OSError as exn:
        return f"cannot be read ({exn.strerror or exn})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    return _shard_problem(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=None)
def _shard_problem(path: str, mtime_ns: int, size: int) -> str | None:
    if size == 0:
        return "is empty (0 bytes)"
    try:
        with open(path, "rb") as f:
            head = f.read(tarfile.BLOCKSIZE)
            f.seek(max(0, size - 2 * tarfile.BLOCKSIZE))
            tail = f.read()
    except OSError as exn:
        return f"cannot be read ({exn.strerror or exn})"
    if head.startswith(COMPRESSED):
        return None
    if len(head) < tarfile.BLOCKSIZE:
        return f"is not a tar archive ({size} bytes, less than one 512-byte tar header)"
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.EOFHeaderError:
        return "holds no samples (an empty tar archive)"
    except tarfile.HeaderError:
        return "is not a tar archive (its first 512 bytes are not a tar header)"
    if size % tarfile.BLOCKSIZE:
        return f"is truncated ({size} bytes, not a whole number of 512-byte tar blocks)"
    if tail.count(0) != len(tail) or len(tail) < 2 * tarfile.BLOCKSIZE:
        return "is truncated (it does not end with the two zero 512-byte blocks of a complete tar)"
    return None


def check_shards(urls: list[str], spec: str, threads: int = 16) -> None:
    """ValueError naming the first bad local shard of `spec` (`shard_problem`), with how many
    more are bad; remote and pipe: URLs are checked when opened (`iter_shard`)."""
    local = [u for u in urls if is_local_path(u)]
    if len(local) > 4:
        with concurrent.futures.ThreadPoolExecutor(min(threads, len(local))) as pool:
            problems = list(pool.map(shard_problem, local))
    else:
        problems = [shard_problem(u) for u in local]
    bad = [(u, p) for u, p in zip(local, problems) if p is not None]
    if bad:
        url, problem = bad[0]
        of = "" if spec == url else f" of spec {spec!r}"
        more = f" ({len(bad) - 1} more of its {len(urls)} shards are bad too)" if len(bad) > 1 else ""
        raise ValueError(f"shard {url}{of} {problem}{more}; allowed: {TAR_ALLOWED}")


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


_warned: set[tuple[str, str]] = set()


def warn_once(kind: str, url: str, msg: str, *args: Any) -> None:
    """log.warning, once per (kind, shard) in this process."""
    if (kind, url) not in _warned:
        _warned.add((kind, url))
        log.warning(msg, *args)


# A small local shard read to its end without a fault is kept in memory (per process, keyed on
# its path and stamped with its mtime and size, so a rewritten shard is read again and replaces
# its old entry): a tiny dataset such as the bundled digits (1.2 MB) would otherwise go through
# Python's tarfile every epoch, which was 45% of tiny-digits' loader time. The budget bounds what
# a dataset of many small shards can pin.
CACHE_SHARD_BYTES = 8 << 20
CACHE_TOTAL_BYTES = 256 << 20
_Stamp = tuple[int, int]  # (mtime_ns, size)
_shard_cache = Kept(CACHE_TOTAL_BYTES)  # absolute path -> (stamp, samples), counted as the shard's size


def _cache_stamp(url: str) -> tuple[str, _Stamp] | None:
    """(absolute path, stamp) of a local shard small enough to keep, else None."""
    if not is_local_path(url):
        return None
    try:
        st = os.stat(url)
    except OSError:
        return None  # opening it reports the fault
    return (os.path.abspath(url), (st.st_mtime_ns, st.st_size)) if st.st_size <= CACHE_SHARD_BYTES else None


def iter_shard(url: str, quiet: bool = False) -> Iterator[dict[str, Any]]:
    """Samples of one shard. A shard that cannot be opened or read to the end yields the samples
    read before the fault and ends early, warned about once per shard (unless `quiet`), so one
    bad shard does not stop training; a sample cut by the fault keeps the members read. The
    samples are shared with later reads of a small shard (see CACHE_SHARD_BYTES): read-only."""
    key = _cache_stamp(url)
    if key is not None and (kept := _shard_cache.get(key[0])) is not None and kept[0] == key[1]:
        yield from kept[1]
        return
    read: list[dict[str, Any]] = []
    faults: list[Exception] = []

    def files() -> Iterator[dict[str, Any]]:
        try:
            stream = gopen(url, "rb")
        except Exception as exn:  # noqa: BLE001 - any open error ends this shard only
            faults.append(exn)
            return
        try:
            yield from tar_file_iterator(stream)
        except Exception as exn:  # noqa: BLE001 - any I/O or tar error ends this shard only
            faults.append(exn)
        finally:
            try:
                stream.close()  # a pipe: checks the command's exit status here
            except Exception as exn:  # noqa: BLE001
                faults.append(exn)

    members = files()
    n = 0
    try:
        for sample in group_samples(members):
            n += 1
            if key is not None:
                read.append(sample)
            yield sample
    finally:
        members.close()
    if key is not None and not faults and _cache_stamp(url) == key:  # unchanged while it was read
        _shard_cache.put(key[0], (key[1], tuple(read)), key[1][1])  # a rewritten shard's old samples go
    if faults and not quiet:
        warn_once("read", url, "shard %s ends early (%s): using the %d sample(s) read before; the rest of "
                  "it is not read (warned once per shard)", url, faults[0], n)


def is_meta(name: str) -> bool:
    """Tar members webdataset's tar_file_iterator skips (`__meta__` files and folders)."""
    return bool(re.match(r"__[^/]*__($|/)", name))


def image_bytes(sample: dict[str, Any]) -> bytes | None:
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def label_problem(sample: dict[str, Any], num_labels: int) -> tuple[int | None, str | None]:
    """(label, None) for a readable `cls` label (in [0, num_labels) unless num_labels is 0),
    else (None, what is wrong with it)."""
    raw = sample.get("cls")
    if raw is None:
        return None, "has no .cls label"
    try:
        label = int(raw.decode().strip())
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None, f"has label {raw[:20]!r}, not an integer"
    if num_labels > 0 and not 0 <= label < num_labels:
        return None, f"has label {label}, outside [0, {num_labels})"
    return label, None


def parse_label(sample: dict[str, Any], url: str, num_labels: int, warn: bool = True) -> int | None:
    """The `cls` label; None if missing, not an integer or outside [0, num_labels) (num_labels 0:
    no range check), which the loader skips and counts. The first such sample of a shard is
    warned about (one line per shard at most), if `warn`."""
    label, problem = label_problem(sample, num_labels)
    if problem is not None and warn:
        allowed = f"an integer in [0, {num_labels})" if num_labels > 0 else "an integer"
        warn_once("label", url, "skipping sample %r in shard %s: it %s (allowed: %s; further bad labels of "
                  "this shard are skipped and counted, not logged)", sample["__key__"], url, problem, allowed)
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
    # count_samples (num_labels 0) does not warn: a warning should name the model's label range
    return np.array([image_bytes(s) is not None and parse_label(s, url, num_labels, num_labels > 0) is not None
                     for s in samples], bool)


@functools.lru_cache(maxsize=None)
def _usable_local(path: str, mtime_ns: int, size: int, num_labels: int) -> np.ndarray:
    # mtime and size are in the cache key so a rewritten shard is scanned again
    try:
        with tarfile.open(path, "r:") as tar:  # seeks past the members it does not read
            files = []
            for m in tar:
                if m.offset_data + m.size > size:  # truncated here: the stream ends at this member too
                    break
                if m.isreg() and not is_meta(m.name):
                    files.append({"fname": m.name,
                                  "data": tar.extractfile(m).read() if m.name.lower().endswith(".cls") else b""})
    except (OSError, tarfile.TarError) as exn:
        log.warning("scanning shard %s failed (%s); reading it as a stream", path, exn)
        return _usable_stream(path, num_labels)
    return _usable(group_samples(files), path, num_labels)


@functools.lru_cache(maxsize=None)
def _usable_stream(url: str, num_labels: int) -> np.ndarray:
    return _usable(iter_shard(url), url, num_labels)
