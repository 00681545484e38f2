"""Files medsyn writes for a user: whole or not at all, and inside the folder they were meant for.

Everything (generated images, metrics, reports, checkpoints) is written to a temporary name beside its target,
flushed to disk, then renamed into place: a crash, a kill or a full disk leaves the old file (or none), never a
truncated one that a no-overwrite rule would then protect. Names that come from data (class names, prompts) are
made safe before they become part of a file name.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

TEMPORARY_PREFIX = ".tmp-"
UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_STEM_LENGTH = 64


def safe_file_stem(name: str) -> str:
    """``name`` as a file-name part that stays inside its folder: runs of characters other than letters, digits,
    ``.``, ``_`` and ``-`` become ``_``, leading dots go (no ``..``, no hidden files), at most 64 characters.

    A class called ``../../escaped`` is written as ``escaped``, ``sub/dir`` as ``sub_dir``.
    """
    stem = UNSAFE_CHARACTERS.sub("_", str(name)).lstrip("._")[:MAX_STEM_LENGTH]
    if not stem:
        raise ValueError(f"{name!r} has no character that can be part of a file name")
    return stem


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _raise_explained(error: OSError, path: Path):
    """Re-raise ``error``, in words a user acts on for a full disk or a folder they may not write to."""
    if error.errno == errno.ENOSPC:
        raise OSError(error.errno, f"{path}: no space left on device; nothing was written there") from error
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise OSError(error.errno, f"{path}: cannot write there ({os.strerror(error.errno)})") from error
    raise error


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, flush it and rename it to ``path``.

    If the block raises (a full disk included), the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{path.name}")
    try:
        yield temporary
        fsync_path(temporary)
        os.replace(temporary, path)
        fsync_path(path.parent)
    except BaseException as error:
        with suppress(OSError):
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            _raise_explained(error, path)
        raise


def check_writable(folder: str | Path) -> None:
    """Make ``folder`` and prove a file can be written there, so that a run fails before its work, not after."""
    folder = Path(folder)
    probe = folder / f"{TEMPORARY_PREFIX}{os.getpid()}-probe"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"medsyn")
        probe.unlink()
    except OSError as error:
        with suppress(OSError):
            probe.unlink(missing_ok=True)
        _raise_explained(error, folder)


def write_text_atomically(path: str | Path, text: str) -> None:
    with atomic_write(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_npz_atomically(path: str | Path, **arrays) -> None:
    """``arrays`` as one compressed NPZ, whole or not at all."""
    import numpy as np

    with atomic_write(path) as temporary, open(temporary, "wb") as file:
        np.savez_compressed(file, **arrays)
