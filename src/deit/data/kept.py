"""A per-process map with a byte budget: what the loader keeps in memory between epochs.

Both of the loader's in-memory caches (small shards' samples in `shards`, small decoded images in
`decode`) are one of these: an entry is kept only while the total stays within the budget, and
nothing is ever evicted, so the first data read fills it and the rest is read as before. Threads
share it (the loader's background thread and worker threads): writes take the lock, reads are
plain dict lookups.
"""

import threading
from collections.abc import Hashable, Iterator
from typing import Any


class Kept:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._items: dict[Hashable, tuple[Any, int]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        """The value kept under `key`, or None."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> bool:
        """Keep `value` (counted as `nbytes`) under `key` if it fits in the budget. What `key` held
        before is dropped either way (a stale entry, e.g. a rewritten shard's samples), its bytes
        freed first. Whether `value` was kept."""
        with self._lock:
            if (old := self._items.pop(key, None)) is not None:
                self._bytes -= old[1]
            if self._bytes + nbytes > self.budget_bytes:
                return False
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            return True

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)
