"""README.md stays true: its marked code blocks run, its commands use real recipes and flags, and
its recipe table matches recipes/*.json (and deit3-jax's reported top-1 where the seed is present).

A fenced block directly preceded by a `<!-- test -->` line is executed, in order, in one scratch
folder (with `src/` and `recipes/` linked in and a photo at `photo.jpg`): ```bash blocks by bash
with this interpreter first on PATH as `python`, ```python blocks by this interpreter.
"""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from deit import recipes

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SEED_README = ROOT.parent / "shared" / "seed" / "deit3-jax-README.md"
QUICKSTART = [
    "python3.11 -m venv .venv && . .venv/bin/activate && pip install -e . && python src/train.py recipes:tiny-digits",
    '. .venv/bin/activate && pip install -e ".[dev,tpu]" && pytest',
]
FEATURES = "| | deit (this repo) | deit3-jax | facebookresearch/deit | timm |"
BLOCK = re.compile(r"^(<!-- test -->\n)?```(\w+)\n(.*?)^```$", re.M | re.S)


def blocks() -> list[tuple[bool, str, str]]:
    """(marked for testing, language, text) of every fenced block."""
    return [(bool(m.group(1)), m.group(2), m.group(3)) for m in BLOCK.finditer(README)]


def commands() -> list[str]:
    """Shell command lines of the bash blocks, continuation lines joined, comments dropped."""
    out = []
    for _, lang, text in blocks():
        if lang != "bash":
            continue
        for line in text.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def env() -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": "", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@functools.cache
def help_text(*args: str) -> str:
    r = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=300, check=True)
    return r.stdout


def script_help(script: str, words: list[str]) -> str:
    """--help of a script, of its subcommand when the command names one."""
    if script == "train.py":
        return help_text("src/train.py", "recipes:tiny-digits")
    sub = {"prepare.py": ("digits", "folder"), "benchmark.py": ("augment", "loader", "train")}.get(script, ())
    first = next((w for w in words if not w.startswith("-")), None)
    return help_text(f"src/{script}", *([first] if first in sub else []))


def test_quickstart_verbatim_and_dry_run():
    for cmd in QUICKSTART:
        assert f"```bash\n{cmd}\n```" in README, cmd
    r = subprocess.run([sys.executable, "src/train.py", "recipes:tiny-digits", "--dry-run"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["output_dir"] == "outputs/tiny-digits"  # where the quickstart says


def test_recipe_names_exist():
    named = set(re.findall(r"recipes:([A-Za-z0-9_.-]*[A-Za-z0-9])", README)) - {"NAME"}
    assert named, "the README names no recipe"
    assert not named - set(recipes.names()), sorted(named - set(recipes.names()))


def test_command_flags_exist():
    """Every --flag of a `python src/X.py ...` command in a code block is in that script's --help."""
    checked = 0
    for line in commands():
        for m in re.finditer(r"python3?(?:\.\d+)? src/(\w+\.py)([^&|;]*)", line):
            script, rest = m.group(1), m.group(2)
            words = rest.split()
            helped = script_help(script, words)
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helped), f"{script} has no {flag}: {line}"
                checked += 1
    assert checked >= 10


def test_prose_flags_exist():
    """Every `--flag` quoted in the prose and tables belongs to one of the scripts (in the feature
    table: in this repository's column; the others quote other projects' flags)."""
    features = README[README.index(FEATURES):].split("\n\n")[0]
    prose = BLOCK.sub("", README.replace(features, "")) + "\n".join(row[1] for row in table(FEATURES))
    # XLA's own flags (`XLA_FLAGS=--xla_cpu_...`, snake_case) are not ours: the (?!\w) leaves them out.
    flags = {f for span in re.findall(r"`([^`\n]+)`", prose)
             for f in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?!\w)", span)}
    assert len(flags) >= 20
    helps = help_text("src/train.py", "recipes:tiny-digits") + "".join(
        script_help(s, [sub] if sub else []) for s, sub in [("evaluate.py", None), ("convert.py", None),
                                                           ("predict.py", None), ("prepare.py", "folder"),
                                                           ("benchmark.py", "loader"), ("benchmark.py", "train"),
                                                           ("benchmark.py", "device")])
    missing = [f for f in sorted(flags) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", helps)]
    assert not missing, missing


def table(header: str) -> list[list[str]]:
    lines = README[README.index(header):].splitlines()[2:]
    rows = []
    for ln in lines:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def test_recipe_table_matches_recipes():
    rows = table("| recipe | model | data | resolution | epochs | steps | batch | deit3-jax top-1 | paper top-1 |")
    names = [r[0].strip("`") for r in rows]
    files = sorted(p.stem for p in recipes.RECIPES_DIR.glob("*.json") if not p.stem.startswith("_"))
    assert sorted(names) == files and len(names) == 34  # deit3-jax's 33 + tiny-digits
    widths = {192: "Ti/16", 384: "S/16", 768: "B/16", 1024: "L/16", 1280: "H/14"}
    seed = SEED_README.read_text().splitlines() if SEED_README.exists() else None
    for name, model, data, res, epochs, steps, batch, top1, paper in rows:
        name = name.strip("`")
        flags = recipes.flags(name)
        assert int(res) == flags["image_size"], name
        assert int(steps.replace(",", "")) == flags["training_steps"], name
        assert int(batch) == flags["train_batch_size"], name
        if name == "tiny-digits":
            continue
        assert model == f"ViT-{widths[flags['dim']]}" and model.endswith(str(flags["patch_size"])), name
        assert epochs == re.findall(r"(\d+)ep", name)[-1], name
        assert data == ("in1k" if "-ft-" in name else re.search(r"in1k|in21k", name).group(0)), name
        assert (flags["labels"] == 1000) == (data == "in1k"), name
        if seed is None:
            continue
        (row,) = [ln for ln in seed if f"/{name}.sh)" in ln]
        cols = [c.strip() for c in row.strip("|").split("|")]
        if "[pt]" in row and "-ft-" not in name:  # a pre-training recipe: its numbers are the -ft one's
            assert top1.startswith("pre-training") and paper == "—", name
        else:
            assert (top1, paper) == tuple(c if c != "-" else "—" for c in cols[5:7]), name


def test_architecture_table_names_real_modules():
    rows = table("| module | holds |")
    named = [m for r in rows for m in re.findall(r"`deit\.([\w.]+)`", r[0])]
    assert len(named) >= 15
    for m in named:
        path = ROOT / "src" / "deit" / m.replace(".", "/")
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), m


def test_marked_blocks_run(tmp_path):
    marked = [(lang, text) for ok, lang, text in blocks() if ok]
    assert {lang for lang, _ in marked} == {"bash", "python"} and len(marked) >= 3
    for name in ("src", "recipes"):
        (tmp_path / name).symlink_to(ROOT / name)
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "photo.jpg")
    outputs = []
    for lang, text in marked:
        cmd = ["bash", "-euo", "pipefail", "-c", text] if lang == "bash" else [sys.executable, "-c", text]
        r = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README block failed:\n{text}\n--- stderr:\n{r.stderr[-3000:]}"
        outputs.append(r.stdout)
    # the predict example printed one JSON line with 3 classes
    (line,) = [ln for out in outputs for ln in out.splitlines() if ln.startswith('{"path"')]
    top = json.loads(line)["top_k"]
    probs = [t["prob"] for t in top]
    assert len(top) == 3 and probs == sorted(probs, reverse=True) and all(0 < p < 1 for p in probs)
    assert (tmp_path / "ti16.pth").is_file()


def test_reliability_table_is_the_tests_matrix():
    from matrix import collect, table

    marker = "<!-- reliability table: python tests/matrix.py -->\n"
    text = README
    assert marker in text
    rows = []
    for ln in text.split(marker, 1)[1].splitlines():
        if not ln.startswith("|"):
            break
        rows.append(ln)
    cases = collect()
    assert "\n".join(rows) == table(cases)
    assert {c.kind for c in cases} >= {"output dir", "shards", "sample", "weights", "images", "fault", "config"}
