"""Errors caused by the user's input or environment: the CLI prints their message, not a traceback."""

from __future__ import annotations

from .backbone import BackboneError
from .config import ConfigError
from .data import DataError
from .predict import PredictError
from .tracking import TrackingError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, BackboneError, TrackingError, PredictError)
