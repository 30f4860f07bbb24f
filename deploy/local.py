"""The validating server, started in this process on a free loopback port for as long as a
``with`` block runs: what ``sparsebert parity --served`` and the tests talk to over HTTP."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

from sparsebert.deploy.client import SparseBertClient
from sparsebert.deploy.serve import (DEFAULT_BATCH_WINDOW_MS, DrainingServer, ServedModel, ServeSettings, create_app,
                                     prepare)
from sparsebert.errors import UserError

STARTUP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_server(deployment: Path, engine: str, workdir: Path, name: str = "parity",
                 sequence_lengths: tuple[int, ...] | None = None, threads: int | None = None,
                 batch_size: int = 1, batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS):
    """A client of ``deployment`` served on ``engine`` (default buckets: the server's, up to the
    exported length; ``batch_size`` above 1 batches concurrent requests)."""
    import uvicorn

    settings = ServeSettings(name=name, engine=engine, port=free_port(), sequence_lengths=sequence_lengths,
                             threads=threads, batch_size=batch_size, batch_window_ms=batch_window_ms)
    model = ServedModel(prepare(Path(deployment), Path(workdir), settings), settings.batch_window_ms)
    model.load()
    server = DrainingServer(uvicorn.Config(create_app(model), host=settings.host, port=settings.port,
                                           log_level="warning"), model)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise UserError(f"the server for {deployment} did not start on port {settings.port}")
            time.sleep(0.05)
        yield SparseBertClient(f"http://{settings.host}:{settings.port}", name)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        model.close()  # the app closes it on shutdown too; not when uvicorn never started
