"""A long load test of one served model: ``sparsebert loadtest RUN --soak MINUTES``.

The run's student is served in a process of its own (the validating server, on loopback, as
``sparsebert serve`` runs it) so its memory can be read apart from the clients'. Each dev text
is sent alone first to learn its answer; then 16 clients send them for the given minutes and
every answer must match (``loadtest.run_load``), while the server's resident memory (RSS) is
sampled. It passes with 0 errors, 0 wrong answers and RSS growth under 10% from the end of the
warm-up (the first minute, or the first tenth of a shorter soak) to the end. Writes
``<run>/bench/soak.json``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sparsebert.deploy.client import SparseBertClient
from sparsebert.deploy.loadtest import LoadTestFailed, expected_answers, run_load
from sparsebert.deploy.local import free_port
from sparsebert.errors import UserError
from sparsebert.runfolder import RunFolder

CLIENTS = 16
RSS_EVERY_S = 10.0
WARM_UP_S = 60.0
MAX_RSS_GROWTH = 0.10
STARTUP_TIMEOUT_S = 300
NAME = "soak"


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as error:
        raise UserError(f"cannot read the server's memory ({error}): the soak needs Linux /proc") from None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
    if kib is None:  # a process that exited (not yet waited for) has no memory left to read
        raise UserError(f"process {pid} has exited: no resident memory to read")
    return kib / 1024


class RssSampler:
    """Samples a process's RSS every ``every_s`` on a thread of its own, from start() to stop()."""

    def __init__(self, pid: int, every_s: float = RSS_EVERY_S):
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self.failed: str | None = None  # why sampling stopped early (the process exited)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        self._start = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._take()  # the last, at the end

    def _take(self) -> bool:
        if self.failed is None:
            try:
                self.samples.append((time.monotonic() - self._start, rss_mib(self.pid)))
            except UserError as error:
                self.failed = str(error)
        return self.failed is None

    def _sample(self) -> None:
        while self._take() and not self._stop.wait(self.every_s):
            pass


@contextlib.contextmanager
def server_process(deployment: Path, engine: str, workdir: Path, threads: int | None, log: Path, name: str = NAME):
    """(process, client) of ``deployment`` served by ``python -m sparsebert.deploy.serve``, ready;
    stopped with SIGTERM (a graceful shutdown) on leaving."""
    port = free_port()
    command = [sys.executable, "-m", "sparsebert.deploy.serve", str(deployment), "--name", name, "--engine", engine,
               "--port", str(port), "--workdir", str(workdir), *(["--threads", str(threads)] if threads else [])]
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    client = SparseBertClient(f"http://127.0.0.1:{port}", name)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not client.ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise UserError(f"the server did not start (exit {process.poll()}):\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield process, client
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rss_summary(samples: list[tuple[float, float]], warm_up_s: float) -> dict:
    """First, end-of-warm-up, largest and last RSS, and the growth from warm-up to last."""
    warm = next((mib for t, mib in samples if t >= warm_up_s), samples[-1][1])
    return {"first_mib": round(samples[0][1], 1), "after_warm_up_mib": round(warm, 1),
            "max_mib": round(max(mib for _, mib in samples), 1), "last_mib": round(samples[-1][1], 1),
            "growth_after_warm_up": round(samples[-1][1] / warm - 1, 4), "warm_up_s": warm_up_s}


def soak(run: RunFolder, minutes: float, clients: int = CLIENTS, examples: int = 200, engine: str = "deepsparse",
         threads: int | None = None, checkpoint: str = "student") -> dict:
    from sparsebert import hardware
    from sparsebert.deploy.served_load import requests

    if minutes <= 0 or clients < 1:
        raise UserError("the soak needs positive minutes and at least one client")
    inputs = requests(run, examples)
    seconds = minutes * 60
    with tempfile.TemporaryDirectory(prefix="sparsebert-soak-") as workdir, \
            server_process(run.deployment(checkpoint), engine, Path(workdir), threads, Path(workdir) / "server.log") \
            as (process, client):
        expected = expected_answers(client, inputs)
        sampler = RssSampler(process.pid)
        sampler.start()
        try:
            load = run_load(client.url, NAME, clients=clients, seconds=seconds, max_requests=10**9, inputs=inputs,
                            expected=expected)
        except LoadTestFailed as failure:
            load = failure.report
        finally:
            sampler.stop()
        exit_code = process.poll()
        if exit_code is not None:
            log = (Path(workdir) / "server.log").read_text(errors="replace")[-2000:]
            raise UserError(f"the server exited (code {exit_code}) during the soak, after {load['requests']} "
                            f"requests and {load['errors']} errors:\n{log}")
    rss = rss_summary(sampler.samples, min(WARM_UP_S, seconds / 10))
    return {"task": run.task.name, "checkpoint": checkpoint, "engine": engine, "engine_threads": threads or "all",
            "minutes": minutes, "clients": clients, "examples": len(inputs),
            "requests": load["requests"], "errors": load["errors"], "mismatches": load["mismatches"],
            "throughput_rps": load["throughput_rps"], "latency_ms": load["latency_ms"], "problems": load["problems"],
            "rss": rss, "rss_samples": [(round(t, 1), round(mib, 1)) for t, mib in sampler.samples],
            "machine": hardware.describe(), "date": time.strftime("%Y-%m-%d"),
            "passed": bool(load["requests"]) and not load["errors"] and not load["mismatches"]
            and rss["growth_after_warm_up"] < MAX_RSS_GROWTH}


def summary(report: dict) -> str:
    rss = report["rss"]
    return (f"soak: {report['task']} {report['checkpoint']} on {report['engine']}, {report['clients']} clients, "
            f"{report['minutes']:g} min: {report['requests']} requests, {report['errors']} errors, "
            f"{report['mismatches']} wrong answers, {report['throughput_rps']} requests/s, p99 "
            f"{report['latency_ms']['p99']} ms; server RSS {rss['first_mib']} MiB first, {rss['after_warm_up_mib']} "
            f"after {rss['warm_up_s']:g} s, {rss['last_mib']} last ({rss['growth_after_warm_up']:+.1%}), max "
            f"{rss['max_mib']}: {'PASSED' if report['passed'] else 'FAILED'}")
