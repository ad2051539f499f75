"""Weights files in and out: `load_model` reads any supported format, `save_model` writes ours.

Ours is `.safetensors` in timm naming with the config in its metadata, so a file describes
itself and timm reads it too. The formats themselves live in `deit.timm_weights` (timm / DeiT
state dicts, the checked path every importer ends in) and `deit.deit3_jax_weights`
(deit3-jax `.msgpack`).

Weights files are untrusted input (`read_weights`): a bad one (missing, truncated, corrupt, a
pickle that would run code, shapes that do not fit its config) is one ValueError line naming
the file, the offending key where there is one, and what is allowed. Nothing is ever unpickled
but tensors: `.pth` files go through `torch.load(weights_only=True)`, and a pickle that asks for
anything else (a function, a class) is refused as code.
"""

import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np

from deit.config import ModelConfig
from deit.deit3_jax_weights import deit3_jax_state, read_flax_msgpack
from deit.fileio import atomic_path, sha256 as file_sha256
from deit.model import ViT
from deit.timm_weights import fill_model, timm_state, to_timm

FORMAT_VERSION = "1"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".msgpack")
WEIGHT_FORMATS = "a directory holding model.safetensors, .safetensors, .pth/.pt/.bin (torch), .msgpack (deit3-jax)"


def save_model(model: ViT, path: str | os.PathLike, layout: Literal["deit3", "vit"] = "deit3") -> Path:
    """Write `.safetensors` in timm naming with the config in its metadata (self-describing).

    A directory gets `model.safetensors` inside. Written to a temp file then renamed, so a crash
    never leaves a half-written file under the final name.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix != ".safetensors":
        raise ValueError(f"save_model writes .safetensors, got {path}")
    arrays = {k: np.ascontiguousarray(v) for k, v in to_timm(model, layout).items()}
    meta = {"deit.format": FORMAT_VERSION, "deit.config": model.cfg.to_json(), "deit.layout": layout}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=meta)
    return path


# safetensors dtypes and their sizes in bytes (the format's spec).
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
SAFETENSORS_HEADER_MAX = 100_000_000  # the safetensors library refuses larger headers too
SAFETENSORS_ALLOWED = "allowed: a complete .safetensors file (8-byte header length, JSON header, tensor data)"
TORCH_ALLOWED = "allowed: only a state dict of tensors (as torch.save(model.state_dict()) writes), or .safetensors"


def check_safetensors_header(path: Path) -> dict[str, str]:
    """The metadata of a `.safetensors` file whose header is complete and consistent: every
    tensor's bytes fit its dtype and shape, tensors tile the data exactly, the file is all there.
    Only the header is read; a problem is a one-line ValueError naming the tensor where one is at fault."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes: too short for a .safetensors file; {SAFETENSORS_ALLOWED}")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > SAFETENSORS_HEADER_MAX:
            raise ValueError(f"header length {n} is larger than the {size - 8} bytes after it (truncated, or not a "
                             f".safetensors file); {SAFETENSORS_ALLOWED}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"header is not valid JSON ({str(e)[:80]}); {SAFETENSORS_ALLOWED}") from None
    if not isinstance(header, dict):
        raise ValueError(f"header is a JSON {type(header).__name__}, expected an object; {SAFETENSORS_ALLOWED}")
    meta = header.pop("__metadata__", None) or {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError(f"header __metadata__ is not a string -> string object; {SAFETENSORS_ALLOWED}")
    spans = []
    for key, info in header.items():
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(dtype, str) and dtype in SAFETENSORS_DTYPES
                and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {key!r} has a malformed header entry (dtype, shape, data_offsets); "
                             f"{SAFETENSORS_ALLOWED}")
        begin, end = offsets
        need = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if end - begin != need:
            raise ValueError(f"tensor {key!r}: {dtype} of shape {tuple(shape)} needs {need} bytes but its data_offsets "
                             f"[{begin}, {end}] hold {end - begin}; {SAFETENSORS_ALLOWED}")
        spans.append((begin, end, key))
    at = 0
    for begin, end, key in sorted(spans):
        if begin != at:
            raise ValueError(f"tensor {key!r} starts at data byte {begin}, expected {at} (tensors overlap or leave "
                             f"gaps); {SAFETENSORS_ALLOWED}")
        at = end
    data = size - 8 - n
    if at > data:
        raise ValueError(f"truncated: the header describes {at} bytes of tensor data, the file holds {data}; "
                         f"{SAFETENSORS_ALLOWED}")
    if at < data:
        raise ValueError(f"{data - at} bytes after the last tensor (corrupt .safetensors); {SAFETENSORS_ALLOWED}")
    return meta


def _read_safetensors(path: Path, heads: int | None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    from safetensors import safe_open

    meta = check_safetensors_header(path)
    check_committed(path)  # after the header check: a truncated file gets its precise message
    cfg = None
    if "deit.config" in meta:
        if meta.get("deit.format") != FORMAT_VERSION:
            raise ValueError(f"deit.format {meta.get('deit.format')!r} is not {FORMAT_VERSION!r}")
        try:
            cfg = ModelConfig.from_dict(json.loads(meta["deit.config"]))
        except (ValueError, TypeError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"its deit.config metadata is not a valid model config ({detail})") from None
    with safe_open(str(path), framework="np") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if cfg is not None:  # before listing the keys a config implies: a forged layers=10**9 must not hang
        blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        if blocks != cfg.layers:
            raise ValueError(f"its deit.config says layers={cfg.layers} but it holds {blocks} blocks")
    return timm_state(sd, cfg, heads=heads if cfg is None else None)


def _refused_global(e: Exception) -> str | None:
    """The global a restricted unpickler refused (`posix.system`, `mymodule.MyClass`), if that is why it failed."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    return m and m.group(1)


def check_torch_zip(path: Path) -> None:
    """A torch.save zip archive (torch >= 1.6) must be complete and every record pass its CRC:
    torch itself reads a truncated one with an obscure error and a flipped byte not at all."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return  # the legacy format: torch's restricted unpickler reads (and refuses) it alone
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # noqa: BLE001: BadZipFile, zlib.error, EOFError, ...
        raise ValueError(f"not a torch weights file (truncated or corrupt zip archive: {e}); {TORCH_ALLOWED}") from None
    if bad is not None:
        raise ValueError(f"corrupt torch file: record {bad!r} fails its CRC check; {TORCH_ALLOWED}")


def _read_torch(path: Path, heads: int | None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise ValueError("reading torch files needs torch (pip install torch), or convert to .safetensors") from None
    check_torch_zip(path)
    try:
        # The restricted unpickler: tensors, containers and plain values only; never code.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = _refused_global(e)
        if name:
            raise ValueError(f"refused: loading it would run code (its pickle calls for {name}, which the "
                             f"tensors-only unpickler does not allow); {TORCH_ALLOWED}") from None
        detail = re.sub(r"\s+", " ", str(e).split("WeightsUnpickler error:")[-1]).strip()
        raise ValueError(f"not a torch weights file (truncated or corrupt: {detail[:80]}); {TORCH_ALLOWED}") from None
    except Exception as e:  # noqa: BLE001: torch's RuntimeError for a bad zip, EOFError, ...
        detail = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"not a torch weights file (truncated or corrupt: {detail[:120]}); {TORCH_ALLOWED}") from None
    return timm_state(sd, heads=heads)


def _read_msgpack(path: Path, image_size: int | None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    return deit3_jax_state(read_flax_msgpack(path.read_bytes()), image_size=image_size)


def check_committed(path: Path) -> None:
    """A training checkpoint's meta.json records the size and sha256 of its model.safetensors
    (`deit.checkpoint`): a file that differs (truncated, a flipped bit in the tensor data, which
    no header check can see) is refused. Files without such a record are not checked here."""
    meta = path.parent / "meta.json"
    if path.name != "model.safetensors" or not meta.is_file():
        return
    try:
        info = json.loads(meta.read_text())["files"][path.name]
        size, sha256 = int(info["size"]), str(info["sha256"])
    except (ValueError, KeyError, TypeError, OSError):
        return  # not a commit record of ours: nothing to verify against
    if path.stat().st_size != size or file_sha256(path) != sha256:
        raise ValueError(f"corrupt: its size or sha256 differs from the one {meta} records; allowed: the file as its "
                         f"checkpoint wrote it")


def weights_path(path: str | os.PathLike) -> Path:
    """The file `load_model` reads for `path` (a directory: its model.safetensors), or a one-line
    ValueError when there is none or its extension is not a weights format."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ValueError(f"cannot load {path}: unknown extension; allowed: {WEIGHT_FORMATS}")
    if not path.is_file():
        raise ValueError(f"cannot load {path}: no such file; allowed: {WEIGHT_FORMATS}")
    return path


def read_weights(path: str | os.PathLike, *, heads: int | None = None,
                 image_size: int | None = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """The model config and the checked arrays (timm names, deit3 layout) of a weights file, as
    `load_model` reads them but without building the model: no JAX arrays, so it is a cheap
    up-front check of a file a run will load later (`deit.finetune.check_pretrained`).

    Weights files are untrusted input: any bad one (missing, truncated, corrupt, a pickle that
    would run code, shapes that do not fit their config) is a one-line ValueError naming the file.
    """
    path = weights_path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return _read_safetensors(path, heads)
        if suffix == ".msgpack":
            return _read_msgpack(path, image_size)
        return _read_torch(path, heads)
    except ValueError as e:
        msg = " ".join(str(e).split())  # one line, whatever a parser put in it
        raise ValueError(msg if str(path) in msg else f"cannot load {path}: {msg}") from e
    except Exception as e:  # noqa: BLE001: corrupt files: one line naming the file, not a parser traceback
        detail = " ".join(str(e).split())[:160]
        raise ValueError(f"cannot load {path}: {type(e).__name__}: {detail}") from e


def load_model(path: str | os.PathLike, *, heads: int | None = None, image_size: int | None = None) -> ViT:
    """Load weights from any supported file: a checkpoint directory (its model.safetensors),
    `.safetensors` (ours with config metadata, or timm's: config inferred), `.pth/.pt/.bin`
    (timm/DeiT state dict, via torch with weights_only), `.msgpack` (deit3-jax).

    `heads` is needed only for timm files of non-standard width; `image_size` only for
    sincos2d deit3-jax files. A bad file is a one-line ValueError naming it (see `read_weights`).
    """
    return fill_model(*read_weights(path, heads=heads, image_size=image_size))


__all__ = ["FORMAT_VERSION", "WEIGHT_FORMATS", "check_safetensors_header", "load_model", "read_weights", "save_model",
           "weights_path"]
