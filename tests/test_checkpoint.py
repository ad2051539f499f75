"""Checkpoints: round trip, async writes, remote (fsspec) output dirs, newest-first fallback."""

import dataclasses
import json

import equinox as eqx
import fsspec
import jax
import numpy as np
import pytest

import deit

from deit import checkpoint, optim, recipes
from deit.config import Config
from deit.model import ViT
from deit.steps import init_state
from deit.tracking import read_metrics
from deit.trainer import train


def tiny_config(**top) -> Config:
    cfg = recipes.load("tiny-digits")
    model = dataclasses.replace(cfg.model, layers=2, dim=32, heads=2)
    return dataclasses.replace(cfg, model=model, progress=False, **top)


def make_state(cfg: Config):
    model = ViT(cfg.model, key=jax.random.key(0))
    return init_state(model, optim.build(cfg, model).tx, ema=True)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


@pytest.mark.parametrize("url", ["local", "memory://ckpt-roundtrip"])
def test_async_round_trip_and_fallback_order(tmp_path, url):
    out = str(tmp_path) if url == "local" else url
    cfg = tiny_config()
    state = make_state(cfg)
    writer = checkpoint.Writer(out)
    writer.save(["last", "best"], state, cfg.to_dict(), {"val/acc1": 0.5})
    state2 = eqx.tree_at(lambda s: s.step, state, state.step + 7)
    writer.save(["last", "step-00000007"], state2, cfg.to_dict())
    writer.wait()
    found = checkpoint.candidates(out)
    names = [p.rsplit("/", 1)[-1] for p in found]
    assert names[0] == "last" and set(names) == {"last", "step-00000007", "best", "prev"}
    assert [checkpoint.read_meta(p)["step"] for p in found] == [7, 7, 0, 0]
    restored = checkpoint.restore(found[0], make_state(tiny_config(init_seed=9)))
    for a, b in zip(leaves(restored), leaves(state2)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert checkpoint.read_meta(checkpoint.find(out, "best"))["val/acc1"] == 0.5


def test_remote_output_dir_trains_and_resumes(tmp_path):
    """An fsspec URL as output dir (memory:// here; gs:// in production): config, metrics,
    checkpoints all land there, and a second run resumes from it."""
    url = "memory://runs/tiny"
    cfg = tiny_config(output_dir=url, aim_repo=str(tmp_path / "aim"), log_interval=4, eval_interval=8,
                      checkpoint_interval=4)
    train(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, training_steps=8)))
    fs = fsspec.filesystem("memory")
    assert json.loads(fs.cat("/runs/tiny/config.json"))["model"]["layers"] == 2
    assert checkpoint.read_meta(f"{url}/checkpoints/last")["step"] == 8
    train(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, training_steps=12)))
    assert [e["step"] for e in read_metrics(url) if "train/loss" in e] == [4, 8, 12]
    assert checkpoint.read_meta(f"{url}/checkpoints/last")["step"] == 12
    assert json.loads(fs.cat("/runs/tiny/results.json"))["step"] == 12


def test_non_finite_state_is_never_checkpointed(tmp_path):
    cfg = tiny_config()
    state = make_state(cfg)
    state = eqx.tree_at(lambda s: s.model.head.bias, state, state.model.head.bias.at[0].set(np.nan))
    with pytest.raises(ValueError, match=r"non-finite values in \.model\.head\.bias"):
        checkpoint.save(tmp_path, "last", state, cfg.to_dict())
    assert checkpoint.candidates(tmp_path) == []


def test_params_only_export_of_model_and_ema(tmp_path):
    import convert  # src/convert.py

    cfg = tiny_config()
    state = make_state(cfg)
    ema = jax.tree.map(lambda x: x + 1 if eqx.is_inexact_array(x) else x, state.ema)
    state = eqx.tree_at(lambda s: s.ema, state, ema)
    path = checkpoint.save(tmp_path, "best", state, cfg.to_dict())
    assert convert.main([path, str(tmp_path / "model.safetensors")]) == 0
    assert convert.main([path, str(tmp_path / "ema.safetensors"), "--ema"]) == 0
    for file, want in (("model.safetensors", state.model), ("ema.safetensors", ema)):
        got = deit.load_model(tmp_path / file)
        assert got.cfg == cfg.model
        for a, b in zip(leaves(got), leaves(want)):
            np.testing.assert_array_equal(a, b)
    assert convert.main([str(tmp_path / "model.safetensors"), str(tmp_path / "x.safetensors"), "--ema"]) == 2



def test_save_policy_names_the_checkpoints_due():
    due = checkpoint.names_due
    assert due(7, evaluated=False) == []
    assert due(8, evaluated=False, interval=True) == ["last"]  # checkpoint_interval
    assert due(12, evaluated=True) == ["last"]  # an eval without a better acc1
    assert due(12, evaluated=True, improved=True) == ["last", "best"]
    assert due(12, evaluated=True, interval=True, improved=True) == ["last", "best"]  # `last` once
    assert due(12, evaluated=True, validation=False, improved=True) == ["last"]  # no validation: `last` only
    assert due(16, evaluated=False, keep=True) == ["step-00000016"]  # keep_interval: never replaced
    assert due(16, evaluated=False, keep=True, preempted=True) == ["last", "step-00000016"]
    assert due(5, evaluated=False, preempted=True) == ["last"]
    assert due(24, evaluated=True, interval=True, keep=True, improved=True, preempted=True) == \
        ["last", "best", "step-00000024"]


def test_before_commit_hook_runs_between_the_files_and_the_commit(tmp_path):
    cfg = tiny_config()
    state = make_state(cfg)
    calls = []

    def hook(name, step):
        stage = next(tmp_path.glob(f"checkpoints/.tmp-{name}-*"))  # files written, not yet committed
        calls.append((name, step, sorted(p.name for p in stage.iterdir())))

    checkpoint.Writer(tmp_path, sync=True, before_commit=hook).save(["last", "best"], state, cfg.to_dict())
    files = sorted([checkpoint.MODEL_FILE, checkpoint.STATE_FILE])
    assert calls == [("last", 0, files), ("best", 0, files)]
    assert len(checkpoint.candidates(tmp_path)) == 2

    def crash(name, step):
        raise OSError("disk gone")

    writer = checkpoint.Writer(tmp_path / "b", before_commit=crash)  # in the background: raised at `wait`
    writer.save(["last"], state, cfg.to_dict())
    with pytest.raises(checkpoint.WriteError, match="'last' of step 0 could not be written .*disk gone"):
        writer.wait()
    assert checkpoint.candidates(tmp_path / "b") == []  # nothing committed
