"""The numeric core: everything a run's numbers depend on, and nothing else.

Settings, the paper's numbers, models, the schedule, the training loop, images, splits, features, the
run record, checkpoints and distributed training. A run is one function of its resolved settings, its
data, its device and its checkpoint (``core.run.train_run``). This folder is the training identity:
the train stages depend on it (one line in dvc.yaml) and every run, checkpoint and stage key carries
``source_digest()``. The shell (CLI, stage loop, MLflow, benchmark, estimates) calls the core and is
never imported by it (tests/test_stages.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CORE = Path(__file__).parent


def digest(obj: Any) -> str:
    """Short stable digest of JSON-able data (a configuration, a parameter file)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def source_digest(files: Iterable[str] | None = None) -> str:
    """sha256 of core source files (names relative to this folder; default: every ``.py`` file of the core)."""
    names = sorted(files) if files is not None else sorted(p.relative_to(CORE).as_posix() for p in CORE.rglob("*.py"))
    sha = hashlib.sha256()
    for name in names:
        sha.update(name.encode() + b"\0" + (CORE / name).read_bytes())
    return sha.hexdigest()[:16]


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested settings -> {"train.lr": "0.001", ...} (MLflow params; comparing two configurations key by key)."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for k, v in value.items():
            out |= flatten(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return {prefix: json.dumps(value) if isinstance(value, (list, tuple)) else str(value)}
