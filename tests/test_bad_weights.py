"""Weights files are untrusted input: every bad one gets one line on stderr naming the file (and
the offending key or index) and what is allowed, exit status 2, and nothing written.

Each file case goes through every entry point that reads weights: `deit.load_model` (a one-line
ValueError), `src/train.py --pretrained-ckpt` (no output dir created: the file is read and fitted
to the model in `runtime.resolve_paths`, before anything is written), `src/convert.py` (no output
file, not even a temporary one) and `src/evaluate.py`. Architecture and label-mapping cases need
a target model, so they go through train.py only; a corrupt meta.json beside the weights matters
to evaluate.py only (it reads the training config). Nothing is ever unpickled: the pickle cases
carry payloads that would create a file if run (`test_good_weights_pass_the_same_checks` shows
they do when unpickled for real).
"""

import dataclasses
import json
import os
import pickle
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import deit
from deit.config import ModelConfig
from deit.timm_weights import to_timm
from deit3_jax_tree import deit3_jax_params, flax_msgpack_bytes
from matrix import Case

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import convert as convert_cli  # noqa: E402
import evaluate as evaluate_cli  # noqa: E402
import train as train_cli  # noqa: E402

# The run every train case targets: recipes:tiny-digits (patch 8, 32 px, sincos2d, gap, 10 labels) made small.
TINY = ["recipes:tiny-digits", "--no-progress", "--layers", "2", "--dim", "32", "--heads", "2"]
TARGET = ModelConfig(layers=2, dim=32, heads=2, labels=10, patch_size=8, image_size=32, posemb="sincos2d",
                     pooling="gap")
EVERYWHERE = "to --pretrained-ckpt / convert.py / evaluate.py / load_model"
FT = "--pretrained-ckpt"
EVAL = "to evaluate.py (which reads its config)"
PAYLOAD = "PWNED"  # the file a pickle payload would create, were it ever run

MATRIX = [
    # .safetensors
    Case("weights", f"truncated .safetensors (a training checkpoint's model.safetensors cut in half) {EVERYWHERE}",
         "truncated: the header describes"),
    Case("weights", f"training checkpoint whose model.safetensors has a flipped bit in its tensor data {EVERYWHERE}",
         "corrupt: its size or sha256 differs from the one"),
    Case("weights", f".safetensors whose header length is larger than the file {EVERYWHERE}",
         "bytes after it (truncated, or not a .safetensors file)"),
    Case("weights", f".safetensors with garbage header JSON {EVERYWHERE}", "header is not valid JSON"),
    Case("weights", f".safetensors with a flipped bit in a tensor's shape in its header {EVERYWHERE}",
         "tensor 'blocks.0.attn.proj.bias': F32 of shape (22,) needs 88 bytes but its data_offsets"),
    Case("weights", f".safetensors whose tensor bytes do not match their shapes {EVERYWHERE}",
         "tensor 'head.weight': F32 of shape (10, 33) needs 1320 bytes"),
    # deit3-jax .msgpack
    Case("weights", f"truncated deit3-jax .msgpack {EVERYWHERE}", "truncated msgpack (incomplete input)"),
    Case("weights", f"corrupt .msgpack (not msgpack at all) {EVERYWHERE}",
         "corrupt msgpack (bytes left over after the first object)"),
    Case("weights", f".msgpack array whose bytes do not fit its shape {EVERYWHERE}",
         "model.layer_1.ff.w1.kernel: float32 of shape (32, 128) needs 16384 bytes, the file holds 16380"),
    # torch: never unpickled
    Case("weights", f"truncated .pth {EVERYWHERE}",
         "not a torch weights file (truncated or corrupt zip archive: File is not a zip file)"),
    Case("weights", f".pth with a flipped bit in its tensor data {EVERYWHERE}",
         "fails its CRC check"),
    Case("weights", f".pth whose unpickling would call os.system (nothing runs) {EVERYWHERE}",
         "refused: loading it would run code (its pickle calls for posix.system"),
    Case("weights", f".pth holding an instance of a custom class {EVERYWHERE}",
         "refused: loading it would run code (its pickle calls for test_bad_weights.Custom"),
    Case("weights", f".bin holding a function {EVERYWHERE}",
         "refused: loading it would run code (its pickle calls for exec"),
    Case("weights", f"raw pickle .pt with a GLOBAL os.system (nothing runs) {EVERYWHERE}",
         "refused: loading it would run code (its pickle calls for os.system"),
    # paths
    Case("weights", f"weights file that does not exist {EVERYWHERE}", "no such file"),
    Case("weights", f"directory without model.safetensors {EVERYWHERE}", "model.safetensors: no such file"),
    Case("weights", f"weights file of an unknown extension (.npz) {EVERYWHERE}",
         "unknown extension; allowed: a directory holding model.safetensors, .safetensors, .pth/.pt/.bin"),
    # another architecture: train.py only (the target model is the run's)
    Case("weights", f"dim 64 / 4-block weights to a dim 32 / 2-block {FT} run",
         "patch_embed.proj.weight has shape (64, 3, 8, 8), the model needs (32, 3, 8, 8) "
         "(pretrained dim=64, layers=4; model dim=32, layers=2)"),
    Case("weights", f"patch 4 weights to a patch 8 {FT} run",
         "patch_embed.proj.weight has shape (32, 3, 4, 4), the model needs (32, 3, 8, 8)"),
    Case("weights", f"dim 64 deit3-jax .msgpack to a dim 32 {FT} run",
         "patch_embed.proj.weight has shape (64, 3, 8, 8), the model needs (32, 3, 8, 8)"),
    Case("weights", f"LayerScale weights to a {FT} run without LayerScale",
         "unexpected keys ['blocks.0.ls1.gamma', 'blocks.0.ls2.gamma', 'blocks.1.ls1.gamma', 'blocks.1.ls2.gamma'] "
         "(pretrained layerscale=True; model layerscale=False)"),
    Case("weights", f"timm .pth state dict with a key missing, to {FT}",
         "timm state dict: missing keys ['blocks.1.norm2.bias']"),
    Case("weights", f"4-head weights to a 2-head {FT} run", "pretrained heads=4 but the model has heads=2"),
    # label mappings
    Case("weights", f"--label-mapping src index out of range of the pretrained head ({FT})",
         "src[1] = 10 is not an int in [0, 10) (the pretrained head has 10 labels)"),
    Case("weights", f"--label-mapping dst index out of range of the target head ({FT})",
         "dst[0] = 10 is not an int in [0, 10) (the target head has 10 labels)"),
    Case("weights", f"--label-mapping with headless (labels=0) pretrained weights ({FT})",
         "needs a head on both models"),
    # the training config beside the weights
    Case("weights", f"training checkpoint with a corrupt meta.json, {EVAL}", "/meta.json is not valid JSON"),
]


def random_model(cfg: ModelConfig, seed: int = 0) -> deit.ViT:
    """Every array random, filled on the host (no init compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype)
                        if isinstance(x, jax.ShapeDtypeStruct) else x,
                        eqx.filter_eval_shape(deit.ViT, cfg, key=jax.random.key(0)))


def safetensors(tmp: Path, name: str, **cfg) -> Path:
    return deit.save_model(random_model(dataclasses.replace(TARGET, **cfg)), tmp / name)


def header_of(path: Path) -> tuple[int, bytes, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return n, data[8:8 + n], data[8 + n:]


def with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


class Custom:
    """A class of this test module: unpickling an instance would import and run this module."""


class Payload:
    """Unpickling this runs `os.system("touch PWNED")`: the classic malicious checkpoint."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


# ----------------------------------------------------------------------------- the bad files

RUN: dict[str, Path] = {}  # "last": the `trained` fixture's checkpoint, for the builds that copy it


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """checkpoints/last of a real one-step run of the TINY model (model.safetensors + meta.json)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train_cli.main([*TINY, "--output-dir", str(out), "--training-steps", "1", "--train-batch-size", "16",
                    "--valid-batch-size", "40"])
    RUN["last"] = out / "checkpoints" / "last"
    return RUN["last"]


def real_checkpoint(tmp: Path) -> Path:
    shutil.copytree(RUN["last"], tmp / "last")
    return tmp / "last"


def truncated_safetensors(tmp: Path) -> Path:
    ckpt = real_checkpoint(tmp)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:len(data) // 2])
    return ckpt


def flipped_data_bit(tmp: Path) -> Path:
    ckpt = real_checkpoint(tmp)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-100] ^= 0x01  # a weight's low mantissa bit: the header and every shape stay valid
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    return ckpt


def long_header(tmp: Path) -> Path:
    data = safetensors(tmp, "w.safetensors").read_bytes()
    (tmp / "w.safetensors").write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    return tmp / "w.safetensors"


def garbage_header(tmp: Path) -> Path:
    path = safetensors(tmp, "w.safetensors")
    n, raw, body = header_of(path)
    path.write_bytes(struct.pack("<Q", n) + b"{garbage: \xff" + raw[11:] + body)
    return path


def flipped_header_bit(tmp: Path) -> Path:
    path = safetensors(tmp, "w.safetensors")
    data = bytearray(path.read_bytes())
    entry = b'"blocks.0.attn.proj.bias":{"dtype":"F32","shape":['
    at = data.index(entry + b"32]") + len(entry)
    data[at] ^= 0x01  # '3' -> '2': shape (22,), its 128 bytes unchanged
    path.write_bytes(bytes(data))
    return path


def sizes_not_shapes(tmp: Path) -> Path:
    path = safetensors(tmp, "w.safetensors")
    n, raw, body = header_of(path)
    header = json.loads(raw)
    header["head.weight"]["shape"] = [10, 33]  # 1320 bytes declared, 1280 stored
    path.write_bytes(with_header(header, body))
    return path


def msgpack_bytes(**kw) -> bytes:
    return flax_msgpack_bytes(deit3_jax_params(np.random.default_rng(0), layers=2, dim=32, heads=2, patch=8,
                                               image=32, labels=10, layerscale=False, learnable=False, cls=False, **kw))


def truncated_msgpack(tmp: Path) -> Path:
    data = msgpack_bytes()
    (tmp / "deit3-last.msgpack").write_bytes(data[:len(data) // 2])
    return tmp / "deit3-last.msgpack"


def garbage_msgpack(tmp: Path) -> Path:
    (tmp / "w.msgpack").write_bytes(b"this is not msgpack " + os.urandom(64))
    return tmp / "w.msgpack"


def short_array_msgpack(tmp: Path) -> Path:
    import msgpack

    params = deit3_jax_params(np.random.default_rng(0), layers=2, dim=32, heads=2, patch=8, image=32, labels=10,
                              layerscale=False, learnable=False, cls=False)
    kernel = params["model"]["layer_1"]["ff"]["w1"]["kernel"]
    # A record claiming (32, 128) float32 with 4 bytes missing: as a flipped length byte would.
    params["model"]["layer_1"]["ff"]["w1"]["kernel"] = msgpack.ExtType(
        1, msgpack.packb((kernel.shape, "float32", kernel.tobytes()[:-4]), use_bin_type=True))
    (tmp / "w.msgpack").write_bytes(flax_msgpack_bytes(params))
    return tmp / "w.msgpack"


def timm_state(cfg: ModelConfig = TARGET) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in to_timm(random_model(cfg)).items()}


def truncated_pth(tmp: Path) -> Path:
    torch.save(timm_state(), tmp / "full.pth")
    data = (tmp / "full.pth").read_bytes()
    (tmp / "w.pth").write_bytes(data[:len(data) // 2])
    return tmp / "w.pth"


def flipped_pth(tmp: Path) -> Path:
    torch.save(timm_state(), tmp / "w.pth")
    data = bytearray((tmp / "w.pth").read_bytes())
    data[len(data) // 2] ^= 0x01  # inside some tensor's bytes: torch itself would load it silently
    (tmp / "w.pth").write_bytes(bytes(data))
    return tmp / "w.pth"


def os_system_pth(tmp: Path) -> Path:
    torch.save({**timm_state(), "extra": Payload(tmp / PAYLOAD)}, tmp / "w.pth")
    return tmp / "w.pth"


def custom_class_pth(tmp: Path) -> Path:
    torch.save({**timm_state(), "extra": Custom()}, tmp / "w.pth")
    return tmp / "w.pth"


def function_bin(tmp: Path) -> Path:
    torch.save({**timm_state(), "hook": exec}, tmp / "pytorch_model.bin")
    return tmp / "pytorch_model.bin"


def raw_pickle_pt(tmp: Path) -> Path:
    # Protocol 0 by hand: GLOBAL os.system, its argument, REDUCE; not a torch zip at all.
    (tmp / "w.pt").write_bytes(b"cos\nsystem\n(S'touch " + str(tmp / PAYLOAD).encode() + b"'\ntR.")
    return tmp / "w.pt"


def no_such_file(tmp: Path) -> Path:
    return tmp / "nothere.safetensors"


def empty_dir(tmp: Path) -> Path:
    (tmp / "checkpoints" / "last").mkdir(parents=True)
    return tmp / "checkpoints" / "last"


def unknown_suffix(tmp: Path) -> Path:
    np.savez(tmp / "w.npz", x=np.zeros(3))
    return tmp / "w.npz"


def bigger_model(tmp: Path) -> Path:
    return safetensors(tmp, "big.safetensors", dim=64, layers=4)


def other_patch(tmp: Path) -> Path:
    return safetensors(tmp, "p4.safetensors", patch_size=4, image_size=16)


def bigger_msgpack(tmp: Path) -> Path:
    data = flax_msgpack_bytes(deit3_jax_params(np.random.default_rng(0), layers=2, dim=64, heads=2, patch=8, image=32,
                                               labels=10, layerscale=False, learnable=False, cls=False))
    (tmp / "big.msgpack").write_bytes(data)
    return tmp / "big.msgpack"


def layerscale(tmp: Path) -> Path:
    return safetensors(tmp, "ls.safetensors", layerscale=True)


def missing_key_pth(tmp: Path) -> Path:
    sd = timm_state()
    del sd["blocks.1.norm2.bias"]
    torch.save(sd, tmp / "w.pth")
    return tmp / "w.pth"


def four_heads(tmp: Path) -> Path:
    return safetensors(tmp, "h4.safetensors", heads=4)


def mapping(tmp: Path, src: list[int], dst: list[int]) -> Path:
    (tmp / "map.json").write_text(json.dumps({"src": src, "dst": dst}))
    return tmp / "map.json"


def corrupt_meta(tmp: Path) -> Path:
    ckpt = real_checkpoint(tmp)
    (ckpt / "meta.json").write_text((ckpt / "meta.json").read_text()[:100])
    return ckpt


def mapped(src: list[int], dst: list[int], **cfg) -> Callable[[Path], tuple[Path, list[str], Path]]:
    """Fitting weights (of `cfg`) with a --label-mapping file: the mapping is what the message names."""
    def build(tmp: Path) -> tuple[Path, list[str], Path]:
        m = mapping(tmp, src, dst)
        return safetensors(tmp, "w.safetensors", **cfg), ["--label-mapping", str(m)], m
    return build


# what -> build(tmp dir) -> the weights file, or (it, extra train.py flags, the file the message names)
BUILD: dict[str, Callable[[Path], Path | tuple[Path, list[str], Path]]] = dict(zip([c.what for c in MATRIX], [
    truncated_safetensors, flipped_data_bit, long_header, garbage_header, flipped_header_bit, sizes_not_shapes,
    truncated_msgpack, garbage_msgpack, short_array_msgpack,
    truncated_pth, flipped_pth, os_system_pth, custom_class_pth, function_bin, raw_pickle_pt,
    no_such_file, empty_dir, unknown_suffix,
    bigger_model, other_patch, bigger_msgpack, layerscale, missing_key_pth, four_heads,
    mapped([0, 10], [0, 1]), mapped([15], [10], labels=20), mapped([0], [0], labels=0),
    corrupt_meta,
], strict=True))


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def listing(tmp: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))


@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.id)
def test_bad_weights_one_line_exit_2_nothing_written(case, trained, tmp_path, capsys):
    files = tmp_path / "files"
    files.mkdir()
    built = BUILD[case.what](files)
    weights, extra, named = built if isinstance(built, tuple) else (built, [], built)
    before, name = listing(files), str(weights)

    if EVAL not in case.what:
        out = tmp_path / "run"
        with pytest.raises(SystemExit) as e:
            train_cli.main([*TINY, "--output-dir", str(out), "--pretrained-ckpt", name, *extra])
        assert e.value.code == 2
        line = one_line(capsys)
        assert line.startswith("error: ") and case.sees in line and str(named) in line, line
        assert not out.exists()  # not even the output dir

    if EVERYWHERE in case.what:
        with pytest.raises(ValueError) as e:
            deit.load_model(weights)
        assert case.sees in str(e.value) and name in str(e.value) and "\n" not in str(e.value), str(e.value)

        for dst in (tmp_path / "out.safetensors", tmp_path / "out.pth"):
            assert convert_cli.main([name, str(dst)]) == 2
            line = one_line(capsys)
            assert line.startswith("convert: error: ") and case.sees in line and name in line, line
            assert not dst.exists()
        assert sorted(os.listdir(tmp_path)) == ["files"]  # no output, no temporary file

    if EVERYWHERE in case.what or EVAL in case.what:
        with pytest.raises(SystemExit) as e:
            evaluate_cli.main(["--checkpoint", name, "--no-progress"])
        assert e.value.code == 2
        line = one_line(capsys)
        assert line.startswith("error: ") and case.sees in line and name in line, line

    assert listing(files) == before  # nothing ran: no payload file, the bad file untouched
    assert not (files / PAYLOAD).exists()


def test_matrix_is_covered():
    assert len(BUILD) == len(MATRIX)  # one build per case, each `what` unique
    assert all(c.kind == "weights" and c.exit == "2" and c.lost == "nothing" for c in MATRIX)


def test_good_weights_pass_the_same_checks(trained, tmp_path):
    """The checks refuse only bad files: the same files, intact, load; and fitting weights of
    another image size and label count (positions resized, head re-initialised) are accepted."""
    from deit.finetune import check_pretrained

    assert deit.load_model(trained).cfg == dataclasses.replace(TARGET, droppath=0.1)  # the recipe's droppath
    check_pretrained(str(trained), TARGET)

    for path in (safetensors(tmp_path, "w.safetensors"), tmp_path / "w.pth"):
        if path.suffix == ".pth":
            torch.save(timm_state(), path)
        model = deit.load_model(path, heads=2)
        assert model.cfg.dim == 32 and model.cfg.layers == 2
        check_pretrained(str(path), TARGET)
    (tmp_path / "w.msgpack").write_bytes(msgpack_bytes())
    assert deit.load_model(tmp_path / "w.msgpack", image_size=32).cfg.gelu == "tanh"
    check_pretrained(str(tmp_path / "w.msgpack"), TARGET)
    other = safetensors(tmp_path, "o.safetensors", image_size=16, labels=20, posemb="sincos2d")
    check_pretrained(str(other), TARGET, str(mapping(tmp_path, [19, 3], [0, 9])))
    learnable = dataclasses.replace(TARGET, posemb="learnable", pooling="cls")
    small = deit.save_model(random_model(dataclasses.replace(learnable, image_size=16)), tmp_path / "l.safetensors")
    check_pretrained(str(small), learnable)  # a 2x2 position grid for a 4x4 model: resized later
    # The payload is real: an unrestricted unpickler runs it (the refused cases prove nothing ran).
    payload = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(payload)))
    assert payload.exists()
