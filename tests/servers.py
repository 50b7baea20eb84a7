"""Real MLflow servers for tests: start on 127.0.0.1 at a free port, wait for /health, stop the whole group.

``start_mlflow("server", "--backend-store-uri", uri, ...)`` or ``start_mlflow("ui", ...)`` returns a
``MlflowServer`` once ``GET /health`` answers (bounded wait; the log tail is in the failure message;
``wait=False`` returns at once and ``server.wait_ready()`` waits later);
``stop_mlflow`` ends it and its worker processes, ``kill_mlflow`` kills them at once (a crash). Tests use the ``mlflow_servers`` fixture (conftest),
which stops every server it started. ``MlflowServer.api`` reads the REST API with plain HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


PORTS_PER_WORKER = 1000  # below Linux's ephemeral range (32768-60999), so no client socket takes them either
_next_port: dict[str, int] = {}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, from a range of its own per pytest-xdist worker: two workers never
    start servers on one port (a server that lost the race could otherwise be mistaken for the other's)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    first = 20000 + PORTS_PER_WORKER * int(worker.removeprefix("gw") or 0)
    for port in range(_next_port.get(worker, first), first + PORTS_PER_WORKER):
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _next_port[worker] = port + 1
        return port
    raise AssertionError(f"no free port in {first}-{first + PORTS_PER_WORKER - 1} for {worker}")


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    """GET (or POST ``body`` as JSON) ``url``; returns (status, body) and never raises on HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class MlflowServer:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def api(self, endpoint: str, params: dict[str, Any] | None = None, body: dict[str, Any] | None = None) -> dict:
        """``api("runs/get", {"run_id": ...})`` -> the JSON answer of ``/api/2.0/mlflow/<endpoint>`` (200 expected)."""
        url = f"{self.url}/api/2.0/mlflow/{endpoint}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, raw = http(url, body)
        assert status == 200, f"{url} answered HTTP {status}: {raw[:2000]!r}"
        return json.loads(raw or b"{}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def wait_ready(self, timeout_s: float = 150.0) -> MlflowServer:
        """Return once ``GET /health`` answers 200; fail (with the log tail) if the server exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.log.name}: exited {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            try:
                if http(f"{self.url}/health", timeout=5)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        stop_mlflow(self)
        raise AssertionError(f"{self.log.name}: not healthy after {timeout_s:.0f}s:\n{self.log_tail()}")


def mlflow_executable() -> str:
    """The ``mlflow`` script of this Python's environment."""
    exe = Path(sys.executable).parent / "mlflow"
    return str(exe) if exe.exists() else "mlflow"


def start_mlflow(command: str, *args: str, cwd: Path, wait: bool = True, port: int | None = None) -> MlflowServer:
    """``mlflow <command> <args> --host 127.0.0.1 --port <port> --workers 1`` in ``cwd`` (``port``: a free one by
    default; pass a killed server's port to restart it where its clients look for it).

    With ``wait`` (the default) it returns once the server is healthy (``wait_ready``); without, at once,
    so the caller can do other work while it starts (5-30 s on a busy 2-core machine) and call
    ``wait_ready`` later. The server runs in its own session so that ``stop_mlflow`` ends its uvicorn
    workers too; its output goes to ``cwd/mlflow-<command>-<port>.log``.
    """
    port = port or free_port()
    log = Path(cwd) / f"mlflow-{command}-{port}-{time.time_ns()}.log"
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job runner: one process less
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [mlflow_executable(), command, *args, "--host", HOST, "--port", str(port), "--workers", "1"],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = MlflowServer(proc, port, log)
    return server.wait_ready() if wait else server


def stop_mlflow(server: MlflowServer, timeout_s: float = 20.0) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after ``timeout_s``."""
    if server.proc.poll() is None:
        _signal_group(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(server.proc.pid, signal.SIGKILL)  # workers that outlived the main process
    if server.proc.poll() is None:
        server.proc.wait(timeout=10)


def kill_mlflow(server: MlflowServer) -> None:
    """SIGKILL the server's whole process group at once, as a crash or an OOM kill would: no clean shutdown."""
    _signal_group(server.proc.pid, signal.SIGKILL)  # also ends a stopped (SIGSTOP) server
    if server.proc.poll() is None:
        server.proc.wait(timeout=30)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
