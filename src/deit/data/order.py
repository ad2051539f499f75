"""Which raw records a process reads in an epoch, and in which order.

Every choice derives from (shuffle_seed, epoch, process_index) alone: the epoch's shard
permutation is the same on every process (so their shares are disjoint) and the shuffle buffer's
order depends only on the seed and the record count, not on the data, so `skip_state` can replay
it on indices and a resumed loader sees the same records.
"""

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from deit.data.shards import Record, sample_usable, shard_records


def process_records(urls: list[str], order: list[int], num_labels: int, process_index: int,
                    process_count: int) -> Iterator[Record]:
    """This process's records: its shards (order[p::P]) or, with fewer shards than
    processes, every P-th sample of the whole stream."""
    if len(order) >= process_count:
        return shard_records(urls, order[process_index::process_count], num_labels)
    return itertools.islice(shard_records(urls, order, num_labels), process_index, None, process_count)


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


def shuffle_rng(seed: int, epoch: int, process_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, 1, process_index])


def epoch_stream(urls: list[str], seed: int, epoch: int, buffer_size: int, num_labels: int,
                 process_index: int, process_count: int) -> Iterator[Record]:
    """One epoch of this process's raw records, in final (shuffled) order."""
    records = process_records(urls, shard_order(len(urls), seed, epoch), num_labels, process_index, process_count)
    return shuffled(records, buffer_size, shuffle_rng(seed, epoch, process_index))


def epoch_usable(urls: list[str], seed: int, epoch: int, num_labels: int, process_index: int,
                 process_count: int) -> np.ndarray:
    """`sample_usable` of this process's records of an epoch, in pre-shuffle order."""
    order = shard_order(len(urls), seed, epoch)
    mine = order[process_index::process_count] if len(order) >= process_count else order
    usable = np.concatenate([sample_usable(urls[s], num_labels) for s in mine])
    return usable if len(order) >= process_count else usable[process_index::process_count]


def train_records(urls: list[str], seed: int, buffer_size: int, num_labels: int, process_index: int,
                  process_count: int, epoch: int = 0, offset: int = 0) -> Iterator[tuple[int, int, Record]]:
    """(epoch, index in epoch, record) forever, starting at record `offset` of `epoch`."""
    for e in itertools.count(epoch):
        n = 0
        for i, rec in enumerate(epoch_stream(urls, seed, e, buffer_size, num_labels, process_index, process_count)):
            n += 1
            if i >= offset:
                yield e, i, rec
        if n == 0:
            raise ValueError(f"no training samples for process {process_index} of {process_count} "
                             f"in {len(urls)} shard(s), e.g. {urls[0]}")
        offset = 0
