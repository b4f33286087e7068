"""Small I/O helpers shared by every step that writes a file."""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np

import pyarrow.fs as pafs

from darkhaloscope.errors import DHSError

# ".<name>.tmp-<pid>": the pid tells a later run whether the writer is still alive
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def dead_temporaries(path: str | os.PathLike, names=None) -> list[Path]:
    """The ``.<name>.tmp-<pid>`` siblings of ``path`` (``name`` its own name, or any of ``names``) whose writer
    process is gone: a killed run's leftovers. A temporary of a live process is never listed."""
    path = Path(path)
    names = {path.name} if names is None else set(names)
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return []
    out = []
    for p in siblings:
        m = _TMP.match(p.name)
        if m and m.group("name") in names and not _alive(int(m.group("pid"))):
            out.append(p)
    return out


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the dead writers' ``.<name>.tmp-<pid>`` files beside ``path`` (``dead_temporaries``); returns what
    was removed."""
    removed = []
    for p in dead_temporaries(path):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary sibling path; rename it onto ``path`` only if the block finishes.

    A killed or failed step therefore never leaves a file that looks finished; temporaries that a killed
    (dead) earlier run left beside ``path`` are removed first."""
    path = Path(path)
    check_writable(path)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable(path: str | os.PathLike, flag: str = "output") -> Path:
    """Fail now, with one line, if ``path`` cannot be written as a file: it is a directory, or its
    folder cannot be created or written into. Called before any work starts."""
    path = Path(path)
    if path.is_dir():
        raise DHSError(f"{flag} {path} is a directory; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as exc:
        raise DHSError(f"{flag} {path} cannot be written: {exc.strerror or type(exc).__name__}"
                       f"{' (' + exc.filename + ')' if getattr(exc, 'filename', None) else ''}") from None
    return path


def check_writable_dir(path: str | os.PathLike, flag: str = "output directory") -> Path:
    """Fail now if ``path`` cannot be created as a directory or written into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DHSError(f"{flag} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise DHSError(f"{flag} {path} cannot be written: {exc.strerror or type(exc).__name__}") from None
    return path


def same_file(a, b) -> bool:
    """True when two local paths name the same file (existing or not)."""
    if a is None or b is None or "://" in str(a) or "://" in str(b):
        return False
    pa_, pb = Path(a), Path(b)
    if pa_.exists() and pb.exists():
        return os.path.samefile(pa_, pb)
    return pa_.resolve() == pb.resolve()


def refuse_overwrite(out, inputs: dict, flag: str, dirs=("--data",)) -> None:
    """DHSError if the output ``out`` is one of the ``inputs`` ({flag: path}) or lies inside one of the
    input directories named by ``dirs`` (the local data root): writing it would clobber an input."""
    if out is None:
        return
    for in_flag, path in inputs.items():
        if path is None or "://" in str(path):
            continue
        if same_file(out, path):
            raise DHSError(f"{flag} {out} is the same file as {in_flag}: refusing to overwrite an input")
        p = Path(path)
        if in_flag in dirs and p.is_dir():
            try:
                Path(out).resolve().relative_to(p.resolve())
            except ValueError:
                continue
            raise DHSError(f"{flag} {out} lies inside {in_flag} {path}: refusing to write into an input directory")


def finite_or_null(x):
    """A nested dict/list of numbers as strict JSON values: NaN/inf -> None (JSON null), numpy scalars ->
    Python numbers. For ``json.dumps(..., allow_nan=False)`` of metrics, which are NaN where undefined
    (e.g. a tpr without positives)."""
    if isinstance(x, dict):
        return {k: finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_null(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def filesystem(data: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local directory or an s3:// (or other pyarrow) URI."""
    data = str(data)
    if "://" in data:
        try:
            return pafs.FileSystem.from_uri(data)
        except Exception as exc:
            raise DHSError(f"cannot open data location {data}: {exc}") from None
    return pafs.LocalFileSystem(), data


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes (read in 4 MiB chunks): what ties an output to the exact file it came from."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
