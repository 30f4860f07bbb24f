"""Dynamic batching: the rows (texts or pairs) of concurrent requests answered in shared engine
calls.

Written here because deepsparse 1.8 batches across requests only for text generation (its
``continuous_batch_sizes`` scheduler drives the v2 operator pipelines; deepsparse.server enables
it for those alone). The text_classification pipeline is a legacy one: each call is answered on
its own, split into, or padded up to, the batch size compiled into the engine. So with
``--batch-size 8`` a lone text costs a batch of 8, and only sharing calls wins the rest back.

One thread (the only one that calls the pipeline: its tokenizer fails when called from two
threads at once) takes the oldest waiting request, waits up to ``window_s`` for others, and fills
one call of at most ``max_batch`` rows of one group (rows that can share a call), oldest
requests first. A request with rows left over queues again behind those that arrived while its
rows were answered, so a large request cannot hold the engine while a small one waits.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

_LOGGER = logging.getLogger(__name__)

# rows -> one answer per row, in order: one engine call.
AnswerRows = Callable[[list], Sequence]


@dataclass(eq=False)
class _Request:
    rows: list
    group: Hashable  # only rows of one group share a call
    future: Future = field(default_factory=Future)
    answers: list = field(default_factory=list)  # the answers of rows[:len(answers)]
    sent: int = 0  # rows[:sent] are answered or in the engine call now
    arrived: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        # Running from the start: nothing may cancel it (an HTTP client that hangs up cancels
        # its handler's wrapper), as a cancelled future would refuse its answer.
        self.future.set_running_or_notify_cancel()


class Batcher:
    """Answers ``submit``-ted row lists through ``answer_rows``, many requests a call."""

    def __init__(self, answer_rows: AnswerRows, max_batch: int, window_s: float):
        if max_batch < 1 or window_s < 0:
            raise ValueError(f"max_batch must be at least 1 and window_s not negative: {max_batch}, {window_s}")
        self.answer_rows, self.max_batch, self.window_s = answer_rows, max_batch, window_s
        self._arrivals: queue.Queue[_Request] = queue.Queue()
        self._waiting: list[_Request] = []  # taken from _arrivals, in turn order; batcher thread only
        threading.Thread(target=self._serve_forever, name="batcher", daemon=True).start()

    def submit(self, rows: list, group: Hashable = None) -> Future:
        """A future of ``rows``' answers, in their order (or of the engine's exception); only
        rows of the same ``group`` share an engine call."""
        if not rows:
            raise ValueError("a request needs at least one row")
        request = _Request(list(rows), group)
        self._arrivals.put(request)
        return request.future

    def arrivals(self) -> int:
        """Requests submitted and not yet taken up by the batcher thread."""
        return self._arrivals.qsize()

    # ------------------------------------------------------------ the batcher thread

    def _serve_forever(self) -> None:
        while True:
            try:
                self._answer_one_batch()
            except Exception as error:  # a bug here must fail its requests, never hang them
                _LOGGER.exception("the batcher failed")
                self._fail(self._waiting, error)

    def _answer_one_batch(self) -> None:
        if not self._waiting:
            self._waiting.append(self._arrivals.get())
        self._take_arrivals()
        self._wait_for_company()
        batch = self._next_batch()  # (request, rows of it)
        try:
            answers = self.answer_rows([row for _, rows in batch for row in rows])
            if len(answers) != sum(len(rows) for _, rows in batch):
                raise RuntimeError(f"the engine gave {len(answers)} answers for the rows of {len(batch)} requests")
        except Exception as error:
            self._fail([request for request, _ in batch], error)
            return
        for request, rows in batch:
            request.answers += answers[:len(rows)]
            answers = answers[len(rows):]
        self._settle([request for request, _ in batch])

    def _take_arrivals(self) -> None:
        while True:
            try:
                self._waiting.append(self._arrivals.get_nowait())
            except queue.Empty:
                return

    def _wait_for_company(self) -> None:
        """Wait for more rows until the oldest request has waited the window, unless a full
        batch is already there (with a backlog, the engine call just made was the wait)."""
        deadline = min(request.arrived for request in self._waiting) + self.window_s
        while self._rows_ready() < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                self._waiting.append(self._arrivals.get(timeout=left))
            except queue.Empty:
                return

    def _in_leading_group(self) -> list[_Request]:
        """The waiting requests of the first one's group, in turn order."""
        return [request for request in self._waiting if request.group == self._waiting[0].group]

    def _rows_ready(self) -> int:
        return sum(len(request.rows) - request.sent for request in self._in_leading_group())

    def _next_batch(self) -> list[tuple[_Request, list]]:
        """Up to max_batch rows of the leading group, requests in turn order, marked sent."""
        batch, room = [], self.max_batch
        for request in self._in_leading_group():
            rows = request.rows[request.sent:request.sent + room]
            request.sent += len(rows)
            batch.append((request, rows))
            room -= len(rows)
            if not room:
                break
        return batch

    def _settle(self, served: list[_Request]) -> None:
        """Answer the requests that are complete; those served in part queue again behind the
        requests that arrived meanwhile (a large one's next rows take their turn)."""
        self._take_arrivals()
        for request in served:
            if request.sent == len(request.rows):
                request.future.set_result(request.answers)
        again = [r for r in served if r.sent < len(r.rows)]
        self._waiting = [r for r in self._waiting if r not in served] + again

    def _fail(self, requests: list[_Request], error: Exception) -> None:
        """Answer each of ``requests`` with ``error``; their other rows are not sent."""
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)
        self._waiting = [r for r in self._waiting if r not in requests]
