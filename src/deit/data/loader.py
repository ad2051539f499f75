"""Batches for the training loop: the background-thread `Loader`, its worker pool, the train and
valid streams and the train stream's resume state.

Train: every epoch draws a seeded shard permutation, gives each process a disjoint share,
reads the share as a stream of raw (undecoded) records, shuffles it through a seeded buffer
(`deit.data.order`), then decodes and crops (in worker processes if asked, `deit.data.decode`)
and assembles batches in a background thread. Every random choice derives from
(shuffle_seed, epoch, ...), never from worker timing, so the batches are the same for any
worker count and a resumed loader repeats them exactly.

Repeated augmentation (augment_repeats k, as deit3-jax): each decoded sample is k consecutive
slots of the sample stream, each copy cropped independently; batches are cut from that stream
at any size (a sample's copies may straddle two batches), and inside each micro-batch the slots
are reordered `b[i::k]` for i < k so that copies land on different data-parallel devices.

Valid: every sample exactly once; batches padded with mask False, and every process yields
the same number of batches, so a multi-host eval loop never waits on a missing collective.
"""

import concurrent.futures
import functools
import itertools
import logging
import math
import multiprocessing
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from jaxtyping import Int

from deit.config import Config, check_divisible
from deit.data.decode import decode_train, decode_valid, probe_shards
from deit.data.order import epoch_usable, process_records, shuffle_rng, shuffled, train_records
from deit.data.prepare import DIGITS_SPLITS, ensure_digits
from deit.data.shards import IMAGE_EXTS, Record, check_shards, count_samples, expand_shards

log = logging.getLogger(__name__)


def resolve_shards(spec: str, num_labels: int = 0) -> list[str]:
    """`expand_shards`, plus `digits:train` / `digits:valid`: the bundled digits, prepared into
    the cache on first use (resolved here, so reading shards never depends on preparing them).

    Then the up-front data checks, each a ValueError naming the shard or spec and what is
    allowed (`deit.runtime.check_data` calls this before anything is written): every explicit
    local file exists (`expand_shards`); every local shard is a complete, non-empty tar
    (`shards.check_shards`: a stat, its first header and its last 1024 bytes, memoised); some of
    the first samples of the first local shards decode, with labels in [0, num_labels) unless
    num_labels is 0 (`decode.probe_shards`). Remote and
    `pipe:` shards are checked when the loader opens them (warned once, readable part used).
    """
    if spec.startswith("digits:"):
        split = spec.split(":", 1)[1]
        if split not in DIGITS_SPLITS:
            raise ValueError(f"shard spec {spec!r}: allowed digits splits are 'digits:train', 'digits:valid'")
        urls = sorted(str(p) for p in ensure_digits().glob(f"digits-{split}-*.tar"))
    else:
        urls = expand_shards(spec)
    check_shards(urls, spec)
    probe_shards(urls, spec, num_labels)
    return urls


# ----------------------------------------------------------------------------- worker pool

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
    # good: decoded samples of epoch `current`; a state inside an epoch handed some out already
    j, current, good = 0, state["epoch"], int(state["offset"] > 0 or state["copies"] > 0)
    logged = 0
    for recs, crops in ordered_map(fn, chunked(records, chunk), pool, 2 * cfg.data.train_loader_workers + 1):
        for (epoch, i, rec), crops_ in zip(recs, crops):
            if epoch != current:
                if not good:  # else an all-corrupt dataset would spin forever
                    raise ValueError(f"no decodable training samples for process {process_index} in epoch "
                                     f"{current} of {len(urls)} shard(s), e.g. {urls[0]} ({skipped} skipped so "
                                     "far); allowed: samples with a readable image and an integer .cls label"
                                     + (f" in [0, {cfg.model.labels})" if cfg.model.labels > 0 else ""))
                current, good = epoch, 0
            if crops_ is None:
                skipped, first = skipped + 1, 0
                logged = warn_skipped(rec, logged, "sample")
                continue
            good += 1
            for c in range(first, k):
                images[place[j]], labels[place[j]] = crops_[c], rec.label
                j += 1
                if j == local:
                    yield (images, labels), stream_state(epoch, i, c, k, skipped)
                    images, labels, j = np.empty_like(images), np.empty_like(labels), 0
            first = 0


def warn_skipped(rec: Record, logged: int, what: str, limit: int = 10) -> int:
    """Warn that a labelled record did not decode (the first `limit` of a stream; a bad label
    was warned about when read); the new count of warnings."""
    if rec.label is None or logged >= limit:
        return logged
    problem = ("it has no image member (allowed: KEY." + "/".join(IMAGE_EXTS) + ")" if rec.image is None
               else "its image bytes are not a readable image")
    log.warning("skipping %s %r in %s: %s%s", what, rec.key, rec.url, problem,
                f" ({limit} logged, further ones counted only)" if logged + 1 == limit else "")
    return logged + 1


def skip_state(urls: list[str], cfg: Config, process_index: int, process_count: int, steps: int) -> dict[str, int]:
    """Resume state after `steps` batches, computed from `sample_usable` alone (no image is decoded).

    `steps` batches are steps * local slots of the repeated stream: `need` = ceil(slots / k)
    records begun, the last with `slots % k` copies out (0: all k). Whole epochs are skipped by
    counting; in the last one the shuffle buffer is replayed on indices (its order depends only
    on the seed and the count, not on the data). Exact unless images that fail to decode came
    before that point (only decoding finds those); the `state` of a running loader is exact always.
    """
    seed, num_labels, k = cfg.data.shuffle_seed, cfg.model.labels, cfg.augment.augment_repeats
    slots = steps * (cfg.data.train_batch_size // process_count)
    need, copies = -(-slots // k), slots % k
    skipped = 0
    if need == 0:
        return {"epoch": 0, "offset": 0, "copies": 0, "skipped": 0}
    for epoch in itertools.count():
        usable = epoch_usable(urls, seed, epoch, num_labels, process_index, process_count)
        if not usable.any():
            raise ValueError(f"no training samples for process {process_index} of {process_count} "
                             f"in {len(urls)} shard(s), e.g. {urls[0]}")
        good = int(usable.sum())
        if need > good:
            need, skipped = need - good, skipped + len(usable) - good
            continue
        order = np.fromiter(shuffled(range(len(usable)), cfg.data.shuffle_buffer,
                                     shuffle_rng(seed, epoch, process_index)), int, len(usable))
        last = int(np.searchsorted(np.cumsum(usable[order]), need))  # index of the need-th good record
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
    urls = resolve_shards(cfg.data.train_dataset_shards, cfg.model.labels)
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

    skipped, emitted, j, logged = 0, 0, 0, 0
    images, labels, mask = empty()
    for recs, crops in ordered_map(fn, chunked(records, max(1, min(batch, 32))), pool, 2 * workers + 1):
        for rec, img in zip(recs, crops):
            if img is None:
                skipped += 1
                logged = warn_skipped(rec, logged, "validation sample")
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
    urls = resolve_shards(cfg.data.valid_dataset_shards, cfg.model.labels)
    return Loader(functools.partial(valid_stream, urls=urls, cfg=cfg, process_index=process_index,
                                    process_count=process_count, batch=batch),
                  cfg.data.valid_loader_workers, prefetch, {"skipped": 0})
