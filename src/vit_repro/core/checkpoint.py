"""Per-epoch training checkpoints, saved atomically; only one from the same configuration, data and code is resumed."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch



CHECKPOINT_VERSION = 1


@dataclass
class Checkpoint:
    """Where a run saves its training state after every epoch; only a state with the same digest is resumed."""

    path: Path
    digest: str  # configuration (with the seed), data and code
    run_id: str = ""  # the MLflow run that saves it

    def save(self, state: dict[str, Any]) -> None:
        """Atomically: a kill while saving leaves the previous checkpoint intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"version": CHECKPOINT_VERSION, "digest": self.digest, "mlflow_run_id": self.run_id, **state}, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None if there is none (or it is unreadable or from another configuration)."""
        if not self.path.is_file():
            return None
        try:  # tensors and plain containers only: nothing in the file can run code
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            warnings.warn(f"ignoring unreadable checkpoint {self.path}: {exc}", stacklevel=2)
            return None
        if state.get("version") != CHECKPOINT_VERSION or state.get("digest") != self.digest:
            warnings.warn(f"ignoring checkpoint {self.path}: saved by another version or configuration", stacklevel=2)
            return None
        return state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_name(self.path.name + ".tmp").unlink(missing_ok=True)
