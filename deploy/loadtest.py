"""A bounded load test of a running server on loopback.

    python -m sparsebert.deploy.loadtest --url http://127.0.0.1:5543 --model rte --clients 4 --seconds 10

First each known input is sent once, alone, to learn its expected answer (inputs of a kind the
model does not read, single texts for a sentence-pair model or the reverse, are answered with
HTTP 422 and left out); then ``--clients`` threads send those inputs for ``--seconds`` (at most ``--max-requests`` in all) and every answer
must match: same labels, scores within ``--tolerance``. Reports throughput and p50/p99 latency;
any error or mismatch fails the run (exit 1, or LoadTestFailed from :func:`run_load`).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Optional

from sparsebert.deploy.client import ClientError, Predictions, SparseBertClient
from sparsebert.errors import UserError

# One request body's `sequences` each: single texts, a batch of texts, sentence pairs and a batch
# of pairs (a model reads one kind; the other is left out, see expected_answers).
INPUTS = [
    "A man is playing a guitar on the stage.",
    "The new policy was announced by the government on Tuesday.",
    ["The cat sat on the mat.", "Stock prices fell sharply after the report."],
    [["The cat sat on the mat.", "A cat is sitting."], ["Stocks fell sharply.", "Prices rose."]],
    [["A man is playing a guitar.", "A man is making music."]],
    [["The company reported record profits this year.", "The company lost money this year."]],
    [["Paris is the capital of France.", "France has a capital city."]],
]
MAX_PROBLEMS_KEPT = 10


class LoadTestFailed(UserError):
    def __init__(self, report: dict):
        super().__init__(f"{report['errors']} errors and {report['mismatches']} wrong answers in "
                         f"{report['requests']} requests; first: {report['problems'][:3]}")
        self.report = report


def require_loopback(url: str) -> None:
    """Refuse any host but this machine: this tool floods its target with requests."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UserError(f"{url} is not on loopback (127.0.0.1, ::1 or localhost)")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil without floats
    return ordered[int(rank) - 1]


def differences(got: Predictions, expected: Predictions, tolerance: float) -> Optional[str]:
    if got.labels != expected.labels:
        return f"labels {got.labels} != expected {expected.labels}"
    if len(got.scores) != len(expected.scores) or any(
            abs(a - b) > tolerance for a, b in zip(got.scores, expected.scores)):
        return f"scores {got.scores} != expected {expected.scores} (tolerance {tolerance})"
    return None


class _Tally:
    """What the client threads share, behind one lock: the request budget and the results."""

    def __init__(self, max_requests: int):
        self.lock = threading.Lock()
        self.left, self.sent = max_requests, 0
        self.latencies_ms: list[float] = []
        self.errors = self.mismatches = 0
        self.problems: list[str] = []

    def claim(self) -> Optional[int]:
        with self.lock:
            if self.left <= 0:
                return None
            self.left -= 1
            self.sent += 1
            return self.sent - 1

    def record(self, latency_ms: float, error: Optional[str] = None, mismatch: Optional[str] = None):
        with self.lock:
            self.latencies_ms.append(latency_ms)
            self.errors += error is not None
            self.mismatches += mismatch is not None
            if (error or mismatch) and len(self.problems) < MAX_PROBLEMS_KEPT:
                self.problems.append(error or mismatch)


def expected_answers(client: SparseBertClient, inputs: list = INPUTS) -> dict[int, Predictions]:
    """Each input's answer, sent alone, by index into ``inputs``; those the model refuses as the
    wrong kind (422) are left out, any other error stops the test."""
    expected = {}
    for index, item in enumerate(inputs):
        try:
            expected[index] = client.classify(item)
        except ClientError as error:
            if error.status != 422:
                raise
    if not expected:
        raise UserError(f"{client.infer_url} refused every kind of input (single texts and pairs)")
    return expected


def _client_loop(client: SparseBertClient, inputs: list, expected: dict[int, Predictions], deadline: float,
                 tally: _Tally, tolerance: float) -> None:
    indices = sorted(expected)
    while time.monotonic() < deadline and (slot := tally.claim()) is not None:
        index = indices[slot % len(indices)]
        start = time.perf_counter()
        try:
            got = client.classify(inputs[index])
        except ClientError as error:
            tally.record((time.perf_counter() - start) * 1000, error=str(error))
            continue
        mismatch = differences(got, expected[index], tolerance)
        tally.record((time.perf_counter() - start) * 1000,
                     mismatch=f"input {index}: {mismatch}" if mismatch else None)


def run_load(url: str, model: str, clients: int = 4, seconds: float = 10.0, max_requests: int = 10_000,
             tolerance: float = 1e-5, timeout: float = 30.0, inputs: list = INPUTS,
             expected: dict[int, Predictions] | None = None) -> dict:
    """Run the load test and return its report; raise LoadTestFailed on any error or mismatch.
    ``inputs`` are request bodies' ``sequences``; ``expected`` their answers, when already known."""
    require_loopback(url)
    if clients < 1 or seconds <= 0 or max_requests < 1:
        raise UserError("clients and max_requests must be at least 1, and seconds positive")
    client = SparseBertClient(url, model, timeout)
    expected = expected or expected_answers(client, inputs)  # one request each, nothing concurrent
    tally = _Tally(max_requests)
    start = time.monotonic()
    threads = [threading.Thread(target=_client_loop, args=(client, inputs, expected, start + seconds, tally, tolerance),
                                daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = _report(url, model, clients, seconds, len(expected), tally, time.monotonic() - start)
    if report["errors"] or report["mismatches"] or not report["requests"]:
        raise LoadTestFailed(report)
    return report


def _report(url: str, model: str, clients: int, seconds: float, inputs: int, tally: _Tally,
            elapsed: float) -> dict:
    latencies = tally.latencies_ms or [0.0]
    return {
        "url": url, "model": model, "clients": clients, "seconds": seconds, "inputs": inputs,
        "elapsed_s": round(elapsed, 3),
        "requests": len(tally.latencies_ms),
        "errors": tally.errors,
        "mismatches": tally.mismatches,
        "throughput_rps": round(len(tally.latencies_ms) / elapsed, 2),
        "latency_ms": {"p50": round(percentile(latencies, 50), 2), "p99": round(percentile(latencies, 99), 2),
                       "max": round(max(latencies), 2)},
        "problems": tally.problems,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparsebert.deploy.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:5543", help="server root, on loopback")
    p.add_argument("--model", default="sparsebert", help="model name in /v2/models/<name>/infer")
    p.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to send requests")
    p.add_argument("--max-requests", type=int, default=10_000, help="stop after this many in all")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest score difference accepted")
    p.add_argument("--json", type=Path, help="also write the report to this file")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run_load(args.url, args.model, args.clients, args.seconds, args.max_requests, args.tolerance)
        status = 0
    except LoadTestFailed as failure:
        report, status = failure.report, 1
        print(f"error: {failure}", file=sys.stderr)
    except (UserError, ClientError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
