"""Repeated augmentation in the train loader, against an independent re-implementation of
deit3-jax's stream + collate: repeat_samples (each decoded sample k times in a row), a
DataLoader batch of train_batch_size // process_count // grad_accum, and collate_and_shuffle
(`sum([batch[i::k] for i in range(k)], [])`)."""

import collections
import itertools
import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from deit import crop
from deit.config import AugmentConfig, Config, DataConfig, ModelConfig, OptimConfig
from deit.data.decode import crop_rng, decode_image
from deit.data.loader import Loader, skip_state, slot_positions, spread_order, train_batches
from deit.data.order import train_records
from deit.data.prepare import digit_image, encode_png, write_shard
from deit.data.shards import expand_shards, shard_records

DIGITS = load_digits()
K = 3


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    """2 shards, 8 + 7 samples, one without an image, one unlabelled: 13 good samples an epoch,
    39 slots, so batches of 10, 16, 64 cross epochs and end inside a sample's copies."""
    root = tmp_path_factory.mktemp("repeats")
    for s, n in enumerate((8, 7)):
        samples = []
        for p in range(n):
            i = 8 * s + p
            files = {"png": encode_png(digit_image(DIGITS.images[i])), "cls": b"%d" % DIGITS.target[i]}
            if (s, p) == (0, 3):
                del files["png"]  # no image: found by skip_state's flags too (a bad one is not)
            if (s, p) == (1, 5):
                del files["cls"]
            samples.append((f"s{s}-{p}", files))
        write_shard(root / f"r-{s}.tar", samples)
    return str(root / "r-{0..1}.tar")


def config(spec: str, batch: int, accum: int = 1, k: int = K) -> Config:
    return Config(model=ModelConfig(layers=1, dim=32, heads=2, labels=10, patch_size=4, image_size=32),
                  data=DataConfig(train_dataset_shards=spec, valid_dataset_shards=spec, train_batch_size=batch,
                                  shuffle_buffer=5),
                  augment=AugmentConfig(random_crop="rrc", augment_repeats=k),
                  optim=OptimConfig(grad_accum=accum))


def run(cfg: Config, n: int, **kw) -> tuple[list, list[dict]]:
    """n batches of a loader and its state after each."""
    loader = train_batches(cfg, **kw)
    batches, states = [], []
    for _ in range(n):
        batches.append(next(loader))
        states.append(dict(loader.state))
    loader.close()
    return batches, states


def deit3_jax_batches(cfg: Config, n: int, process_index: int = 0, process_count: int = 1) -> list[list[tuple]]:
    """n host batches of (epoch, shard, pos, copy, label) slots, built the way deit3-jax builds them."""
    k, accum = cfg.augment.augment_repeats, cfg.optim.grad_accum
    micro = cfg.data.train_batch_size // process_count // accum
    urls = expand_shards(cfg.data.train_dataset_shards)
    records = train_records(urls, cfg.data.shuffle_seed, cfg.data.shuffle_buffer, cfg.model.labels,
                                 process_index, process_count)
    good = ((e, r) for e, _, r in records if r.label is not None and decode_image(r.image) is not None)
    stream = ((e, r.shard, r.pos, c, r.label) for e, r in good for c in range(k))  # repeat_samples
    out = []
    for _ in range(n):
        batch = []
        for _ in range(accum):  # one DataLoader batch per micro-batch, each collate_and_shuffle'd
            loader_batch = list(itertools.islice(stream, micro))
            batch += sum([loader_batch[i::k] for i in range(k)], [])
        out.append(batch)
    return out


def expected_crop(cfg: Config, epoch: int, shard: int, pos: int, copy: int) -> np.ndarray:
    urls = expand_shards(cfg.data.train_dataset_shards)
    rec = next(r for r in shard_records(urls, [shard], cfg.model.labels) if r.pos == pos)
    rng = crop_rng(cfg.data.shuffle_seed, epoch, shard, pos, copy)
    return crop.train_crop(rng, decode_image(rec.image), cfg.model.image_size, cfg.augment.random_crop)


def assert_matches(cfg: Config, batches: list, ref: list[list[tuple]]) -> None:
    for (x, y), slots in zip(batches, ref, strict=True):
        assert x.shape[0] == y.shape[0] == len(slots)
        assert y.tolist() == [s[4] for s in slots]
        for t, (epoch, shard, pos, copy, _) in enumerate(slots):
            np.testing.assert_array_equal(x[t], expected_crop(cfg, epoch, shard, pos, copy), err_msg=f"slot {t}")


def test_spread_order_is_deit3_jax_collate():
    for n, k in itertools.product((1, 2, 5, 10, 16, 64), (1, 2, 3, 4)):
        batch = list(range(n))
        assert spread_order(n, k).tolist() == sum([batch[i::k] for i in range(k)], [])
    # micro-batches are spread on their own: slot j of micro-batch u goes to u * 5 + position in [i::3]
    assert slot_positions(10, 2, 3).tolist() == [0, 2, 4, 1, 3, 5, 7, 9, 6, 8]


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("batch", [10, 16, 64])
def test_batches_are_deit3_jax_stream(spec, batch, accum):
    cfg = config(spec, batch, accum)
    n = -(-100 // batch) + 1  # > 2 epochs of 39 slots
    batches, states = run(cfg, n)
    ref = deit3_jax_batches(cfg, n)
    assert_matches(cfg, batches, ref)
    assert states[-1]["epoch"] >= 2 and states[-1]["skipped"] >= 4
    straddling = 0
    for (x, _), slots in zip(batches, ref):
        by_sample: dict[tuple, list[int]] = {}
        for t, s in enumerate(slots):
            by_sample.setdefault(s[:3], []).append(t)
        straddling += sum(len(ts) < K for ts in by_sample.values())
        for ts in by_sample.values():  # copies of one sample in one batch: independent crops
            assert len({x[t].tobytes() for t in ts}) == len(ts)
        assert any(len(ts) > 1 for ts in by_sample.values())
    assert straddling > 0  # some sample's copies fell into two batches


@pytest.mark.parametrize("batch,accum", [(10, 1), (10, 2), (16, 2)])
def test_resume_mid_sample_is_exact(spec, batch, accum):
    cfg = config(spec, batch, accum)
    n = -(-90 // batch) + 2
    full, states = run(cfg, n)
    assert any(s["copies"] for s in states) and any(not s["copies"] for s in states)
    assert states[-1]["epoch"] >= 1
    urls = expand_shards(spec)
    for step in range(1, n - 1):
        assert skip_state(urls, cfg, 0, 1, step) == states[step - 1], step
        for kw in ({"state": states[step - 1]}, {"start_step": step}):
            resumed, after = run(cfg, 2, **kw)
            for (x, y), (x2, y2) in zip(full[step:step + 2], resumed, strict=True):
                np.testing.assert_array_equal(x, x2, err_msg=f"{kw}")
                np.testing.assert_array_equal(y, y2, err_msg=f"{kw}")
            assert after == states[step:step + 2]


@pytest.mark.parametrize("process_count,batch", [(2, 16), (3, 30)])  # 3 > 2 shards: split by sample
def test_processes_get_disjoint_data(spec, process_count, batch):
    cfg = config(spec, batch, accum=2)
    urls = expand_shards(spec)
    seen = []
    for p in range(process_count):
        n = 40 // (batch // process_count) + 1  # this process's whole first epoch (<= 39 slots)
        batches, states = run(cfg, n, process_index=p, process_count=process_count)
        ref = deit3_jax_batches(cfg, n, p, process_count)
        assert_matches(cfg, batches, ref)
        assert skip_state(urls, cfg, p, process_count, n - 1) == states[n - 2]
        epoch0 = [s[:3] for b in ref for s in b if s[0] == 0]
        assert set(collections.Counter(epoch0).values()) == {K}  # every copy, none twice
        seen.append(set(epoch0))
    assert sum(map(len, seen)) == len(set().union(*seen)) == 13


def test_old_state_without_copies_loads(spec):
    cfg = config(spec, 10)
    full, states = run(cfg, 6)
    step = next(i for i, s in enumerate(states[:4]) if s["copies"] == 0 and s["offset"] > 0)
    old = {key: v for key, v in states[step].items() if key != "copies"}
    loader = train_batches(cfg, state=old)
    assert loader.state == {**old, "copies": 0}
    for (x, y), (x2, y2) in zip(full[step + 1:step + 3], [next(loader) for _ in range(2)], strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    loader.close()
    with pytest.raises(ValueError, match="copies must be in"):
        train_batches(cfg, state={**old, "copies": K})
    with pytest.raises(ValueError, match="expected keys"):
        train_batches(cfg, state={"epoch": 0, "offset": 0})


def test_grad_accum_must_divide_the_process_batch(spec):
    with pytest.raises(ValueError, match="grad_accum=4: must divide the per-process batch 10"):
        train_batches(config(spec, 10, accum=4))


class FakeCoordinator:
    """The coordinator's key-value store as two processes see it; process 1 has written
    `other` (or nothing: its reads time out)."""

    def __init__(self, other):
        self.kv, self.other = {}, other

    def key_value_set(self, key, value):
        self.kv[key] = value

    def blocking_key_value_get(self, key, timeout_ms):
        if key.endswith("/1"):
            if self.other is None:
                raise runtime_module().jax.errors.JaxRuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out: {key}")
            return json.dumps(self.other)
        return self.kv[key]

    def key_value_delete(self, key):
        self.kv.pop(key)


def runtime_module():
    from deit import runtime

    return runtime


def test_gather_loader_states_carries_copies(monkeypatch):
    runtime = runtime_module()
    state = {"epoch": 2, "offset": 5, "copies": 1, "skipped": 3}
    loader = Loader(lambda pool: iter(()), workers=0, prefetch=1, state=state)
    loader.close()
    assert runtime.gather_loader_states(loader) == [state]
    other = {key: v + 1 for key, v in state.items()}
    monkeypatch.setattr(runtime.jax, "process_count", lambda: 2)
    monkeypatch.setattr(runtime, "_client", lambda: FakeCoordinator(other))
    assert runtime.gather_loader_states(loader) == [state, other]
    # A process that never writes its state is named when the host timeout passes.
    monkeypatch.setattr(runtime, "_client", lambda: FakeCoordinator(None))
    with pytest.raises(runtime.HostTimeout, match=r"process 0 waited host_timeout=\d+ s for process 1 at the loader-state"):
        runtime.gather_loader_states(loader)
