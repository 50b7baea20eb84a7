"""Writing outputs so that a failure or an interrupt never leaves them half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder ``tmp`` to ``out_dir``; an existing ``out_dir`` is replaced whole, never merged.

    From another file system, ``tmp`` is first copied beside ``out_dir``, so the swap itself stays a rename.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if os.stat(tmp).st_dev != os.stat(out_dir.parent).st_dev:
        near = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        shutil.copytree(tmp, near, dirs_exist_ok=True)
        shutil.rmtree(tmp)
        tmp = near
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:  # put the previous output back: it is only thrown away once replaced
            os.replace(old / out_dir.name, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` to write into; it replaces ``out_dir`` only on success."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are not
    replace_dir(tmp, out_dir)


def read_json(path: Path, fix: str, error: type[UserError] = UserError) -> Any:
    """The JSON in ``path``; a missing or unreadable file raises ``error`` naming the file and ``fix``."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: missing; {fix}") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path}: unreadable ({type(exc).__name__}: {' '.join(str(exc).split())}); {fix}") from None


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def workspace_root(start: Path | None = None) -> Path:
    """The checkout a command works in: the nearest folder above ``start`` (the working directory) holding
    ``.dvc`` or ``.git``. A queued experiment runs in a temporary copy: its data and outputs are there."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here
