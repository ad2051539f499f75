"""File I/O every module shares: fsspec paths and the one atomic write.

A file written here never appears half-written under its final name. Locally it is written to a
temporary sibling (same filesystem) and renamed into place; at a remote fsspec URL (gs://, ...)
it is written to a local temporary file and uploaded in one `put_file`, so the final object is
created only once its content is complete (object stores commit an upload whole).
"""

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


def fs_path(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) of a local path or any fsspec URL."""
    return fsspec.core.url_to_fs(str(url))


def join(url: str | os.PathLike, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def is_local(url: str | os.PathLike) -> bool:
    return isinstance(fs_path(url)[0], LocalFileSystem)


@contextlib.contextmanager
def atomic_path(url: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """A local temporary path to write `url`'s content to; committed under `url` on success,
    removed on any error (the previous file, if any, stays)."""
    fs, path = fs_path(url)
    local = isinstance(fs, LocalFileSystem)
    parent = os.path.dirname(path) or "."
    if local:
        os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent if local else None, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if local:
            os.chmod(tmp, mode)  # mkstemp's 0600 would hide the file from other users
            os.replace(tmp, path)
        else:
            fs.makedirs(parent, exist_ok=True)
            fs.put_file(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    with atomic_path(url) as tmp:
        tmp.write_bytes(data)


def write_text(url: str | os.PathLike, text: str) -> None:
    write_bytes(url, text.encode())


def unwritable(directory: str | os.PathLike) -> str | None:
    """Why files cannot be created in an existing local `directory` (e.g. "Read-only file
    system"), or None: found by creating and removing an empty probe directory, which catches
    what permission bits alone do not (read-only mounts, /proc, root's access)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".deit-probe-", dir=directory))
    except OSError as e:
        return e.strerror or str(e)
    return None


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()
