"""`composer serve --workers N`: N composer processes under gunicorn's arbiter.

gunicorn does what a multi-process server must (pre-fork, shared listening socket, worker
restarts, heartbeat, graceful TERM); composer supplies the worker. The config is loaded and
compiled once in the arbiter, before forking, so a bad config exits 2 before anything
starts and workers inherit the compiled route table; each worker then watches the files
itself and reloads in place (SIGHUP to the arbiter is passed on to every worker). Each
worker also binds the admin port with SO_REUSEPORT; its /readyz reflects its own drain,
and its /metrics is the sum over all workers (prometheus_client multiprocess mode).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from aiohttp.worker import GunicornUVLoopWebWorker, GunicornWebWorker
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from prometheus_client import multiprocess, values

from .config import file_stamp
from .errors import ConfigError, Stamp
from .logs import JsonFormatter
from .reload import changed
from .routing import RouteTable, load
from .server import GRACE_SECONDS, LISTEN_BACKLOG, ComposerServer, tune_gc, tune_malloc

__all__ = ["ComposerWorker", "serve_workers"]

try:
    import uvloop  # noqa: F401

    _Base: type[GunicornWebWorker] = GunicornUVLoopWebWorker
except ImportError:  # pragma: no cover - platforms without uvloop
    _Base = GunicornWebWorker


class ComposerWorker(_Base):  # type: ignore[misc,valid-type]
    """A gunicorn worker running one ComposerServer on the arbiter's sockets."""

    server: ComposerServer | None = None

    def init_signals(self) -> None:
        """gunicorn's signals, but SIGHUP reloads in place."""
        super().init_signals()
        # The arbiter forwards SIGHUP (see _HupArbiter): reload in place, keep the process.
        self.loop.add_signal_handler(signal.SIGHUP, self._reload)

    def _reload(self) -> None:
        if self.server is not None:
            self.server.reloader.trigger()

    async def _run(self) -> None:
        """Serve on the arbiter's sockets until told to stop or orphaned, then drain."""
        app: _Arbiter = self.app
        # The plain sockets inside gunicorn's listener wrappers: uvloop detaches a socket.socket
        # when its server closes, where it would close() any other object after libuv already
        # closed the fd (a second close of that fd number; gunicorn logs the EBADF it gets).
        sockets = [getattr(listener, "sock", listener) for listener in self.sockets]
        server = self.server = ComposerServer(app.table, admin_host=app.admin_host, admin_port=app.admin_port,
                                              grace=GRACE_SECONDS, sockets=sockets)
        # A worker started later (a replacement) must not serve the config of the arbiter's
        # start if the files changed since, even with polling off.
        await server.reloader.check()
        await server.start()
        tune_gc()
        tune_malloc()
        self.booted = True
        ppid = os.getppid()
        while self.alive and os.getppid() == ppid:
            self.notify()
            await self._wait_next_notify()
        await server.stop()


class _Arbiter(BaseApplication):  # type: ignore[misc]
    """gunicorn's application: the settings of the arbiter, and the last good table to fork with."""

    def __init__(self, table: RouteTable, *, host: str, port: int, admin_port: int, workers: int,
                 admin_host: str) -> None:
        self.table = table
        self.admin_host = admin_host
        self.host, self.port, self.admin_port, self.workers = host, port, admin_port, workers
        self._failed: tuple[tuple[Path, Stamp], ...] | None = None
        super().__init__()

    def refresh(self) -> None:
        """Keep the last good config here too, so a replacement worker forks with it.

        Workers reload (and log, and count) on their own; this only follows along quietly.
        """
        watched = self._failed if self._failed is not None else self.table.sources
        if not changed(watched):
            return
        table = self.table
        try:
            # No event loop runs in the arbiter: a manifest URL that changed is fetched here.
            self.table = load(table.path, table.manifest_option,
                              fetched=table.manifest.body() if table.manifest else None)
            self._failed = None
        except ConfigError as exc:
            self._failed = exc.sources or ((table.path, file_stamp(table.path)),)
        except Exception:  # noqa: BLE001 - never let a bad file take the arbiter down
            self._failed = tuple((path, file_stamp(path)) for path, _ in watched)

    def load_config(self) -> None:
        """gunicorn's settings (its name for this hook): composer's, never a gunicorn config file."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        settings: dict[str, Any] = {
            "bind": [f"{host}:{self.port}"],
            "workers": self.workers,
            "backlog": LISTEN_BACKLOG,  # as a single process listens (gunicorn would take 2,048)
            "worker_class": "composer.workers.ComposerWorker",
            "graceful_timeout": int(GRACE_SECONDS) + 1,
            "timeout": 30,
            "accesslog": None,
            "proc_name": "composer",
            "logconfig_dict": {
                "version": 1,
                "disable_existing_loggers": False,
                "formatters": {"json": {"()": JsonFormatter}},
                "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                                        "stream": "ext://sys.stderr"}},
                "root": {"handlers": ["stderr"], "level": "WARNING"},
                "loggers": {"gunicorn.error": {"handlers": ["stderr"], "level": "INFO",
                                               "propagate": False}},
            },
            "when_ready": self._when_ready,
            "child_exit": _child_exit,
        }
        if "control_socket_disable" in self.cfg.settings:  # gunicorn ≥ 25: no admin socket in $HOME
            settings["control_socket_disable"] = True
        for key, value in settings.items():
            self.cfg.set(key, value)

    def _when_ready(self, _arbiter: Any) -> None:
        print(f"composer serving http://{self.host}:{self.port} (admin http://{self.host}:{self.admin_port}, "
              f"{self.workers} workers)", flush=True)

    def load(self) -> _Arbiter:
        return self

    def run(self) -> None:
        """The arbiter's loop; gunicorn's errors exit 1 with its message, as its own run() does."""
        try:
            _HupArbiter(self).run()
        except RuntimeError as exc:  # what gunicorn's own run() does with arbiter errors
            print(f"composer: {exc}", file=sys.stderr)
            raise SystemExit(1) from None


class _HupArbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's arbiter, except that SIGHUP reaches the workers instead of replacing them.

    Workers reload from disk themselves (composer.reload), as a single process does; the
    arbiter follows the files too (as its loop turns, about once a second, and before each
    fork), so a worker it forks later starts from the last good config, not the one of the
    start.
    """

    def handle_hup(self) -> None:
        """SIGHUP: follow the files here, and have every worker reload in place."""
        self.log.info("SIGHUP: workers reload the config")
        self.app.refresh()
        self.kill_workers(signal.SIGHUP)

    def manage_workers(self) -> None:
        """Follow the files as the arbiter's loop turns (about once a second)."""
        if self.app.table.settings.reload_interval_ms:  # 0: files are read on SIGHUP only
            self.app.refresh()
        super().manage_workers()

    def spawn_worker(self) -> int:
        """Fork a worker with what is on disk now, if it is good."""
        self.app.refresh()
        pid: int = super().spawn_worker()
        return pid


def _child_exit(_arbiter: Any, worker: Any) -> None:
    """In the arbiter, for every worker that ended, however (SIGKILL included: the worker
    itself gets no say): remove its live-mode gauge files, so what it declared (a fragment
    version, a timeout, a circuit state) leaves /metrics with it (SPEC §9). Its counters stay:
    sums must not go backwards."""
    multiprocess.mark_process_dead(worker.pid)


def serve_workers(table: RouteTable, *, host: str, port: int, admin_port: int, workers: int,
                  admin_host: str = "127.0.0.1") -> int:
    """Run the arbiter until TERM/INT; gunicorn drains workers within the grace period."""
    metrics_dir = tempfile.mkdtemp(prefix="composer-metrics-")
    arbiter = os.getpid()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # prometheus_client picks its value store at import; no metric exists yet in this
    # process, so switching it here makes every worker's metrics land in metrics_dir.
    values.ValueClass = values.get_value_class()
    logging.getLogger("composer").info("starting workers", extra={"fields": {"workers": workers}})
    try:
        _Arbiter(table, host=host, port=port, admin_port=admin_port, workers=workers, admin_host=admin_host).run()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        # Every worker leaves through here too: gunicorn forks it inside run(), and its exit
        # (SystemExit) unwinds the arbiter's frames it inherited. The folder is shared: only
        # the arbiter, after its last worker is gone, may remove it; a worker that did would
        # pull it from under the others still draining (their next new metric file fails).
        if os.getpid() == arbiter:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0

