"""Named training recipes: one JSON file of deit3-jax flags per recipe in the `recipes/` folder.

The 33 deit3-jax recipes are kept verbatim (file name = recipe name); `_aliases.json` gives
short names for the main ones. `_additions.json` holds what this project sets beyond deit3-jax's
flags for some recipes (file-name patterns -> flags, each with its reason), applied by `load`
on top of the verbatim file, so `flags` stays deit3-jax's. `$GCS_DATASET_DIR`-style variables stay unexpanded here and
are resolved when a run starts.
"""

import fnmatch
import json
import os
from pathlib import Path

from deit.config import Config, from_flat

RECIPES_DIR = Path(os.environ.get("DEIT_RECIPES_DIR", Path(__file__).resolve().parents[2] / "recipes"))


def _table(file: str) -> dict:
    """One of the `_*.json` tables beside the recipes ({} when absent)."""
    path = RECIPES_DIR / file
    return json.loads(path.read_text()) if path.exists() else {}


def _aliases() -> dict[str, str]:
    return _table("_aliases.json")


def additions(name: str) -> dict:
    """This project's flags for recipe `name` beyond deit3-jax's (from `_additions.json`)."""
    target = _aliases().get(name, name)
    out = {}
    for pattern, entry in _table("_additions.json").items():
        if fnmatch.fnmatchcase(target, pattern):
            out.update(entry["flags"])
    return out


def names() -> list[str]:
    """Every recipe name (files and aliases), sorted."""
    files = [p.stem for p in RECIPES_DIR.glob("*.json") if not p.stem.startswith("_")]
    return sorted(set(files) | set(_aliases()))


def flags(name: str) -> dict:
    target = _aliases().get(name, name)
    path = RECIPES_DIR / f"{target}.json"
    if not path.exists():
        raise ValueError(f"unknown recipe {name!r}; allowed: {', '.join(names())}")
    return json.loads(path.read_text())


def load(name: str) -> Config:
    """The recipe's config; its output dir defaults to `outputs/<recipe>` (aliases resolved), where
    the matching fine-tuning recipe looks for its pre-trained weights (see `finetune.find_pretrained`)."""
    target = _aliases().get(name, name)
    return from_flat({"output_dir": f"outputs/{target}", **flags(name), **additions(name)})


def describe(name: str) -> str:
    target = _aliases().get(name, name)
    return f"alias of {target}" if target != name else f"recipe {name}"
