"""MLflow, and only here: where runs are stored, how a run starts, logs and ends, what it is tagged with.

The core never imports this module: ``RunObserver`` watches a run through the core's ``Observer`` hooks.

Default store: ``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts``. The repository
is found through ``DVC_ROOT`` (set by DVC, and pointing at the real repository even when a queued
experiment runs in a temporary copy), so ``dvc repro``, ``dvc exp run`` and ``dvc exp run --queue``
all write to the same store. ``MLFLOW_TRACKING_URI`` overrides it (e.g. a tracking server).

Layout in the UI: one experiment per study (``vit-repro/<study>``, kind "model training"); one parent
run per variant and configuration (its name ends with the configuration digest; it carries the
variant's shared parameters, its summary metrics once its seeds are done, and spans their duration);
one nested run per seed.

A server that stops answering cannot hang training: every request is bounded (``HTTP_LIMITS``), and the
first request it leaves unanswered ends the stage with a ``TrackingError`` within ``REQUEST_BOUND_S``
seconds (nothing more is sent to it), the run's last epoch checkpoint kept for the rerun. The run stays
RUNNING on the server; like any run left RUNNING by a process that died, it is marked FAILED when any
later run of the experiment starts.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import statistics
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core import digest, flatten
from .core.config import RunConfig
from .core.errors import Interrupted, UserError
from .core.fsutil import workspace_root
from .core.record import MlflowRecord, RunRecord, ScheduleRecord

if TYPE_CHECKING:  # torch stays unimported for the commands that only track
    from .core.run import Context
    from .core.train import History

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
LOCK_SUFFIX = "-init.lock"  # mlflow.db-init.lock, beside the store (ignored by git with /mlflow.db-*)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # MLflow 3: open on the training runs
# Per request: a 10 s timeout, 2 retries 1 s and 2 s apart; a user's own settings win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
REQUEST_BOUND_S = 3 * 10 + 1 + 2  # the longest one request can take under HTTP_LIMITS
HEARTBEAT_STALE_S = 6 * 3600  # a RUNNING run of another machine whose heartbeat is older is taken for dead
EPOCH_METRICS = {"train_loss": "epoch_train_loss", "train_acc": "epoch_train_acc", "test_loss": "epoch_test_loss",
                 "test_acc": "epoch_test_acc", "test_balanced_acc": "epoch_test_balanced_acc", "epoch_time_s": "epoch_seconds"}


class TrackingError(UserError):
    """The tracking backend is unusable; the message says which and how to fix it."""


def _unanswered(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the tracking server did not answer: refused, reset, timed out.

    MLflow wraps transport errors as ``MlflowException("API request to ... failed ...")``; the requests or
    urllib3 error is in the exception's chain.
    """
    import requests

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            requests.exceptions.RetryError, ConnectionError, TimeoutError)):
            return True
        if type(exc).__name__ == "MlflowException" and str(exc).startswith("API request to "):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def repo_root(start: Path | None = None) -> Path:
    """Where the MLflow store lives: ``$DVC_ROOT`` if set (the real repository, also for a queued experiment's
    temporary copy), else ``workspace_root``."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    return workspace_root(start)


def in_repository(start: Path | None = None) -> bool:
    root = repo_root(start)
    return (root / ".dvc").is_dir() or (root / ".git").exists()


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root(root) / STORE_FILE}"


def public_uri(uri: str, root: Path) -> str:
    """``uri`` as a reader can use it: the repository's own store as ``sqlite:///mlflow.db`` (run from the root)."""
    if uri == f"sqlite:///{root / STORE_FILE}":
        return f"sqlite:///{STORE_FILE}"
    parts = urllib.parse.urlsplit(uri)
    if not parts.password:
        return uri
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6
    return urllib.parse.urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


def bound_http_requests() -> None:
    """Bounded MLflow HTTP timeouts and retries, unless the user set their own."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def check_backend(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a clear message, if a tracking server is unreachable or a store is unusable."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server at {uri} answered HTTP {resp.status} on /health")
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server at {uri} is unreachable ({exc}); start it (`mlflow server --host 127.0.0.1 "
                "--port PORT`), fix MLFLOW_TRACKING_URI, or unset it to use the local SQLite store"
            ) from None
    elif scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"cannot write the MLflow store in {folder}: the folder is missing or read-only")
    elif scheme not in ("file", "databricks", "postgresql", "mysql", "mssql", ""):
        raise TrackingError(f"MLFLOW_TRACKING_URI={uri!r} has an unsupported scheme {scheme!r}")


@contextmanager
def store_lock(uri: str, timeout_s: float = 300.0) -> Iterator[None]:
    """Hold an exclusive lock beside an SQLite store while a process opens it for the first time.

    MLflow creates a new SQLite store's tables on first use without locking, so two queue workers
    starting together on a fresh store race ("table ... already exists") and one run is lost. Other
    backends need no lock; without ``fcntl`` (Windows) there is none.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    if not uri.startswith("sqlite:///") or fcntl is None:
        yield
        return
    store = Path(uri.removeprefix("sqlite:///"))
    lock = store.with_name(store.name + LOCK_SUFFIX)
    with open(lock, "a") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingError(f"waited {timeout_s:.0f}s for {lock}, held by another process opening the "
                                        "MLflow store; if no other run is starting, end the holder and retry") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _process_tags() -> dict[str, str]:
    """Who runs this: a later process uses these to tell a live run from one whose process died."""
    import psutil

    me = psutil.Process()
    return {"vit.host": socket.gethostname(), "vit.pid": str(me.pid), "vit.pid_started": f"{me.create_time():.2f}",
            "vit.heartbeat": f"{time.time():.0f}"}


def _process_dead(tags: Mapping[str, str]) -> str | None:
    """Why the process that holds a RUNNING run is gone, or None if it may still be alive."""
    import psutil

    if tags.get("vit.host") == socket.gethostname() and "vit.pid" in tags:
        try:
            started = psutil.Process(int(tags["vit.pid"])).create_time()
        except (psutil.NoSuchProcess, ValueError):
            return f"process {tags['vit.pid']} on this machine has ended"
        if f"{started:.2f}" != tags.get("vit.pid_started"):
            return f"process {tags['vit.pid']} on this machine has ended (its id was reused)"
        return None
    beat = float(tags.get("vit.heartbeat", 0))
    if time.time() - beat > HEARTBEAT_STALE_S:
        return f"no heartbeat from {tags.get('vit.host', 'an unknown machine')} for over {HEARTBEAT_STALE_S // 3600} h"
    return None


@dataclass
class RunHandle:
    run_id: str
    parent_id: str


class Tracker:
    """One process's connection to the study's experiment: parents, seed runs, their metrics and files."""

    def __init__(self, experiment_name: str, root: Path) -> None:
        from mlflow.tracking import MlflowClient

        bound_http_requests()
        self.root = repo_root(root)  # the store's repository (DVC_ROOT for a queued experiment's copy)
        self.uri = tracking_uri(self.root)
        check_backend(self.uri)
        self.experiment_name = experiment_name
        self.unanswered = False  # set once the server left a request unanswered: nothing more is sent to it
        with self._answering("opening the experiment"), store_lock(self.uri):
            # a new store's tables, and the experiment, are created by one worker at a time
            self.client = MlflowClient(self.uri)
            self.experiment_id = self._experiment()
        with self._answering("closing runs left RUNNING by dead processes"):
            self.closed = self.close_dead_runs()

    @contextmanager
    def _answering(self, what: str) -> Iterator[None]:
        """Turn a tracking server that stopped answering into one clear ``TrackingError`` (exit 2, no traceback)."""
        try:
            yield
        except TrackingError:
            raise
        except Exception as exc:
            if not _unanswered(exc):
                raise
            self.unanswered = True
            text = " ".join(str(exc).split())
            if "timed out" in text.lower():
                detail = f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '?')}s, retried"
            elif "refused" in text.lower() or "NewConnectionError" in text:
                detail = "connection refused"
            else:
                detail = text[:300]
            raise TrackingError(
                f"the MLflow tracking server at {self.store} stopped answering while {what} ({detail}); training "
                f"stopped (each request is bounded to {REQUEST_BOUND_S}s) and the last epoch checkpoint is kept: "
                "restart the server, or fix MLFLOW_TRACKING_URI, and rerun `dvc repro` to resume"
            ) from None

    @property
    def store(self) -> str:
        return public_uri(self.uri, self.root)

    def _experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:///"):
                location = (Path(self.uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR).as_uri()
            try:
                exp_id = self.client.create_experiment(self.experiment_name, artifact_location=location)
            except Exception:  # created concurrently by a parallel worker
                exp = self.client.get_experiment_by_name(self.experiment_name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        if (exp.tags if exp is not None else {}).get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            self.client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
        return exp_id

    def close_dead_runs(self) -> list[str]:
        """Mark every RUNNING run of the experiment whose process is gone as FAILED; return their ids."""
        closed = []
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=5000):
            why = _process_dead(run.data.tags)
            if why is not None:
                self.client.set_tag(run.info.run_id, "vit.failure", f"{why}; closed by a later run")
                self.client.set_terminated(run.info.run_id, "FAILED")
                closed.append(run.info.run_id)
        return closed

    def _log(self, run_id: str, params: Mapping[str, str] = {}, metrics: Any = (), tags: Mapping[str, str] = {}) -> None:
        """One request (or as few as MLflow's limits allow); ``metrics`` as (key, value, step) triples."""
        from mlflow.entities import Metric, Param, RunTag

        params_ = [Param(k, v[:6000]) for k, v in params.items()]
        tags_ = [RunTag(k, v) for k, v in tags.items()]
        metrics_ = [m if isinstance(m, Metric) else Metric(m[0], float(m[1]), int(time.time() * 1000), m[2])
                    for m in metrics]
        batches = max(-(-len(params_) // 100), -(-len(tags_) // 100), -(-len(metrics_) // 1000), 1)  # MLflow's limits
        for i in range(batches):
            self.client.log_batch(run_id, metrics=metrics_[i * 1000 : (i + 1) * 1000],
                                  params=params_[i * 100 : (i + 1) * 100], tags=tags_[i * 100 : (i + 1) * 100])

    def parent(self, variant: str, config_digest: str, params: Mapping[str, str], tags: Mapping[str, str],
               description: str) -> str:
        """The variant's parent run for this configuration: found or created, RUNNING while its seeds train."""
        with self._answering(f"opening the parent run of {variant}"):
            return self._parent(variant, config_digest, params, tags, description)

    def _parent(self, variant: str, config_digest: str, params: Mapping[str, str], tags: Mapping[str, str],
                description: str) -> str:
        query = (f"tags.`vit.variant` = '{variant}' AND tags.`vit.config_digest` = '{config_digest}' "
                 "AND tags.`vit.role` = 'variant'")
        found = self.client.search_runs([self.experiment_id], query, max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self._log(run_id, tags=_process_tags())
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=f"{variant} · {config_digest[:8]}",
                                     tags={**tags, **_process_tags(), "vit.role": "variant",
                                           "vit.config_digest": config_digest, "mlflow.note.content": description})
        self._log(run.info.run_id, params=params)
        return run.info.run_id

    @contextmanager
    def run(self, parent_id: str, name: str, params: Mapping[str, str], tags: Mapping[str, str]) -> Iterator[RunHandle]:
        """A seed's run under ``parent_id``: FINISHED, FAILED (an error) or KILLED (Ctrl-C, SIGTERM) at the end."""
        with self._answering(f"starting the run {name}"):
            run = self.client.create_run(self.experiment_id, run_name=name, tags={
                **tags, **_process_tags(), "vit.role": "seed", "mlflow.parentRunId": parent_id})
            handle = RunHandle(run.info.run_id, parent_id)
            self._log(handle.run_id, params=params)

        def on_sigterm(signum: int, frame: Any) -> None:
            raise Interrupted(f"signal {signum}")

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, on_sigterm) if main else None
        status = "FAILED"
        try:
            yield handle
            status = "FINISHED"
        except (KeyboardInterrupt, Interrupted):
            status = "KILLED"
            raise
        except BaseException as exc:
            if not self.unanswered:  # else the run stays RUNNING: the next start of a run marks it FAILED
                self._end_quietly(handle.run_id, f"{type(exc).__name__}: {exc}"[:5000])
            status = ""
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if status:
                self._end_quietly(handle.run_id, None, status)

    @contextmanager
    def parent_open(self, parent_id: str) -> Iterator[None]:
        """While a variant's seeds train: if one fails or is interrupted, the parent ends FAILED or KILLED too."""
        try:
            yield
        except (KeyboardInterrupt, Interrupted):
            self._end_quietly(parent_id, None, "KILLED")
            raise
        except BaseException as exc:
            self._end_quietly(parent_id, f"a seed failed: {type(exc).__name__}: {exc}"[:5000])
            raise

    def _end_quietly(self, run_id: str, failure: str | None, status: str = "FAILED") -> None:
        """End a run; if the backend is gone too, leave it RUNNING for the next start to close."""
        if self.unanswered:
            return
        try:
            if failure is not None:
                self.client.set_tag(run_id, "vit.failure", failure)
            self.client.set_terminated(run_id, status)
        except Exception:  # the backend itself failed: the original error is the one to report
            pass

    def tag(self, run_id: str, tags: Mapping[str, str]) -> None:
        with self._answering("tagging a run"):
            self._log(run_id, tags=tags)

    def log_history(self, run_id: str, steps: list[dict[str, float]], epochs: list[dict[str, float]]) -> None:
        """Per-step and per-epoch metrics, in batched requests; the heartbeat moves on."""
        metrics = [(key, row[key], int(row["step"])) for row in steps for key in ("loss", "lr", "grad_norm")]
        metrics += [(name, row[key], int(row["epoch"])) for row in epochs for key, name in EPOCH_METRICS.items()
                    if row[key] == row[key]]  # NaN: the test set was not evaluated that epoch
        with self._answering(f"logging epoch {int(epochs[-1]['epoch']) if epochs else '?'}'s metrics"):
            self._log(run_id, metrics=metrics, tags={"vit.heartbeat": f"{time.time():.0f}"})

    def finish(self, run_id: str, final: Mapping[str, float], folder: Path, weights: Path | None) -> None:
        """Final metrics, the run folder's files, and a weights folder outside it if given (as ``weights/``)."""
        with self._answering("logging the run's final metrics and files"):
            self._log(run_id, metrics=[(k, v, 0) for k, v in final.items()])
            self.client.log_artifacts(run_id, str(folder))
            if weights is not None:
                self.client.log_artifacts(run_id, str(weights), "weights")

    def finish_parent(self, parent_id: str, summary: Mapping[str, float]) -> None:
        """The variant's summary metrics (over its finished seeds); the parent ends FINISHED, spanning them."""
        with self._answering("logging the variant's summary"):
            self._log(parent_id, metrics=[(k, v, 0) for k, v in summary.items() if v == v])
            self.client.set_terminated(parent_id, "FINISHED")


def run_params(cfg: RunConfig) -> dict[str, str]:
    """A run's settings as MLflow params (the seed and the backbone are tags)."""
    return flatten("", cfg.model_dump(mode="json", exclude={"seed", "backbone"}))


def run_tags(cfg: RunConfig, ctx: Context) -> dict[str, str]:
    """What a seed's run is tagged with: what it is (study, arm, variant, recipe, seed) and what produced it."""
    t, p, d = cfg.train, ctx.provenance, ctx.data
    return {
        "vit.study": cfg.study, "vit.role": "seed", "vit.arm": cfg.arm, "vit.variant": cfg.variant,
        "vit.train_set": cfg.train_set, "vit.recipe": cfg.recipe, "vit.seed": str(cfg.seed), "vit.model": cfg.model,
        "vit.warmup": str(t.warmup), "vit.decay": t.decay, "vit.clip": str(t.clip_grad_norm),
        "vit.config_digest": digest(cfg.model_dump(mode="json", exclude={"seed"})),
        "vit.train_digest": d["train_digests"][cfg.train_set], "vit.test_digest": d["test_digest"],
        "vit.backbone": cfg.backbone.label if cfg.backbone else "none (random initialisation)",
        "mlflow.source.git.commit": p["git_commit"], "vit.git_dirty": str(p["git_dirty"]),
        "vit.params_digest": p["params_digest"], "vit.code_digest": p["code_digest"], "vit.dvc_stage": p["dvc_stage"],
        "vit.device": p["device_name"], "vit.precision": t.precision, "vit.torch": p["torch"],
    }


def final_metrics(record: RunRecord) -> dict[str, float]:
    out = {f"final_test_{k}": float(getattr(record.test, k)) for k in ("accuracy", "balanced_accuracy", "loss")}
    out |= {f"final_train_{k}": float(getattr(record.train, k)) for k in ("accuracy", "balanced_accuracy", "loss")}
    out |= {"final_collapsed": float(record.test.collapsed), "wall_time_s": record.provenance.wall_time_s,
            "train_images_per_s": record.provenance.train_images_per_s}
    return {k: v for k, v in out.items() if v == v}


def variant_summary(records: list[RunRecord]) -> dict[str, float]:
    """A variant's summary over its finished seeds: mean and std of test balanced accuracy, accuracy and loss."""
    out: dict[str, float] = {"seeds_finished": len(records)}
    for name, values in (("test_bacc", [r.test.balanced_accuracy for r in records]),
                         ("test_acc", [r.test.accuracy for r in records]), ("test_loss", [r.test.loss for r in records])):
        out[f"{name}_mean"] = statistics.fmean(values)
        out[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
    return out


def open_variant(tracker: Tracker, cfg: RunConfig, ctx: Context, about: str, seeds: int) -> str:
    """The parent run of ``cfg``'s variant and configuration (found or created); its id."""
    tags = {k: v for k, v in run_tags(cfg, ctx).items() if k not in ("vit.seed", "vit.role")}
    description = (f"{cfg.variant}: arm `{cfg.arm}` ({' '.join(about.split())}), recipe `{cfg.recipe}`, "
                   f"{cfg.train_set} training images; {seeds} seeds nested below. "
                   f"Configuration digest {tags['vit.config_digest']}.")
    return tracker.parent(cfg.variant, tags["vit.config_digest"], run_params(cfg), tags, description)


class RunObserver:  # a core.run.Observer
    """A seed's MLflow run under its variant's parent: opened when the run starts, fed each epoch's metrics, given
    the run folder's files and weights when it ends; FAILED or KILLED if the run raises."""

    def __init__(self, tracker: Tracker, parent_id: str, ctx: Context) -> None:
        self.tracker, self.parent_id, self.ctx = tracker, parent_id, ctx
        self.run_id, self.logged = "", (0, 0)

    @contextmanager
    def run(self, cfg: RunConfig, schedule: ScheduleRecord, resumed: dict[str, Any] | None) -> Iterator[MlflowRecord]:
        params = run_params(cfg) | flatten("schedule", schedule.model_dump())
        with self.tracker.run(self.parent_id, cfg.run_name, params, run_tags(cfg, self.ctx)) as handle:
            self.run_id = handle.run_id
            if resumed is not None:
                self.tracker.tag(handle.run_id, {"vit.resumed_from": resumed["mlflow_run_id"],
                                                 "vit.resumed_at_epoch": str(resumed["epoch"])})
            t = self.tracker
            yield MlflowRecord(store=t.store, experiment_name=t.experiment_name, experiment_id=t.experiment_id,
                               run_id=handle.run_id, parent_run_id=self.parent_id, weights_artifact=None, resumed_from=None)

    def epoch(self, history: History) -> None:
        steps, epochs = self.logged
        self.tracker.log_history(self.run_id, history.steps[steps:], history.epochs[epochs:])
        self.logged = len(history.steps), len(history.epochs)

    def finish(self, record: RunRecord, folder: Path, weights: Path | None) -> None:
        self.tracker.finish(self.run_id, final_metrics(record), folder, weights)
