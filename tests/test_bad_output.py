"""Output dirs that cannot be used: one line naming the dir and what is allowed, exit 2,
nothing written (checked before anything is, through src/train.py's main)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from matrix import Case

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import train as train_cli  # noqa: E402

TINY = ["recipes:tiny-digits", "--no-progress", "--layers", "2", "--dim", "32", "--heads", "2"]

OUTPUT_CASES = [
    Case("output dir", "cannot be created (/proc/deit-out)", "is not writable (/proc: No such file or directory)"),
    Case("output dir", "is a file", "is a file; allowed: a directory (existing or new)"),
    Case("output dir", "below a file", "is a file, not a directory"),
    Case("output dir", "on a read-only filesystem", "Read-only file system); allowed: a directory this user can create"),
    Case("output dir", "gs:// without gcsfs installed", "install gcsfs to access Google Storage; allowed: a local path"),
    Case("output dir", "an unknown URL scheme (foo://)", "Protocol not known: foo; allowed: a local path or an fsspec URL"),
]


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory on a read-only mount (root's permission bits would not stop a write);
    without root, one whose permission bits forbid writing."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({r.stderr.decode().strip()})")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def output_dir(case: Case, tmp_path: Path, request) -> tuple[str, Path | None]:
    """(the --output-dir to pass, a folder whose contents must stay as they are)."""
    what = case.what
    if what.startswith("cannot be created"):
        return "/proc/deit-out", None
    if what == "is a file":
        (tmp_path / "file").write_text("")
        return str(tmp_path / "file"), None
    if what == "below a file":
        (tmp_path / "file").write_text("")
        return str(tmp_path / "file" / "run"), None
    if what.startswith("on a read-only"):
        ro = request.getfixturevalue("read_only_dir")
        return str(ro / "run"), ro
    if what.startswith("gs://"):
        if importlib.util.find_spec("gcsfs") is not None:
            pytest.skip("gcsfs is installed")
        return "gs://deit-bucket/run", None
    return "foo://bucket/run", None


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=[c.what for c in OUTPUT_CASES])
def test_bad_output_dir_one_line_exit_2_nothing_written(case, tmp_path, capsys, request):
    out, keep = output_dir(case, tmp_path, request)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        train_cli.main([*TINY, "--output-dir", out, "--training-steps", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    sees = case.sees if keep is None or os.geteuid() == 0 else "Permission denied); allowed:"  # chmod, not a mount
    assert len(err) == 1 and err[0].startswith("error: ") and sees.lower() in err[0].lower(), err
    assert repr(out) in err[0] or out in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside it
    if keep is not None:
        assert list(keep.iterdir()) == []


SCRIPT_CASES = [
    Case("output dir", "src/convert.py writing into /proc", "cannot write /proc/x.safetensors: /proc: No such file or "
         "directory; allowed: a path in a directory this user can write"),
    Case("config", "src/evaluate.py given an unknown flag", "Unrecognized options: --bogus"),
]
MATRIX = OUTPUT_CASES + SCRIPT_CASES


@pytest.mark.parametrize("case", SCRIPT_CASES, ids=[c.what for c in SCRIPT_CASES])
def test_scripts_bad_input_one_line_exit_2(case, tmp_path, capsys):
    import dataclasses

    import jax

    import convert
    import evaluate
    from deit.config import ModelConfig
    from deit.interop import save_model
    from deit.model import ViT

    weights = tmp_path / "w.safetensors"
    save_model(ViT(dataclasses.replace(ModelConfig(), layers=1, dim=32, heads=2, image_size=16, patch_size=8, labels=10),
                   key=jax.random.key(0)), weights)
    if case.what.startswith("src/convert.py"):
        assert convert.main([str(weights), "/proc/x.safetensors"]) == 2
    else:
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--checkpoint", str(weights), "--bogus"])
        assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: " in err[0] and case.sees in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
