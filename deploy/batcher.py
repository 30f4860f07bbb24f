"""Dynamic batching: the rows (texts or pairs) of concurrent requests answered in shared engine
calls.

Written here because deepsparse 1.8 batches across requests only for text generation (its
``continuous_batch_sizes`` scheduler drives the v2 operator pipelines; deepsparse.server enables
it for those alone). The text_classification pipeline is a legacy one: each call is answered on
its own, split into, or padded up to, the batch size compiled into the engine. So with
``--batch-size 8`` a lone text costs a batch of 8, and only sharing calls wins the rest back.

One thread (the only one that calls the pipeline: its tokenizer fails when called from two
threads at once) takes the oldest waiting request, waits up to ``window_s`` for others, and fills
one call of at most ``max_batch`` rows, all of one group (rows that can share a call), oldest
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
from typing import Any, Callable, Sequence

_LOGGER = logging.getLogger(__name__)

# (group, rows) -> one answer per row, in order. The group is the one group_of gave every row.
AnswerRows = Callable[[Any, list], Sequence]
# rows -> each row's group: only rows of one group share an engine call.
GroupOf = Callable[[list], Sequence]


def one_group(rows: list) -> list:
    return [None] * len(rows)


@dataclass(eq=False)
class _Request:
    rows: list
    future: Future = field(default_factory=Future)
    groups: Sequence = ()  # each row's group, found on the batcher thread
    answers: list = field(default_factory=list)  # each row's answer once it has one
    unsent: list = field(default_factory=list)  # indices of the rows not yet in an engine call
    arrived: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self.answers = [None] * len(self.rows)
        self.unsent = list(range(len(self.rows)))
        # Running from the start: nothing may cancel it (an HTTP client that hangs up cancels
        # its handler's wrapper), as a cancelled future would refuse its answer.
        self.future.set_running_or_notify_cancel()


class Batcher:
    """Answers ``submit``-ted row lists through ``answer_rows``, many requests a call."""

    def __init__(self, answer_rows: AnswerRows, max_batch: int, window_s: float,
                 group_of: GroupOf = one_group):
        if max_batch < 1 or window_s < 0:
            raise ValueError(f"max_batch must be at least 1 and window_s not negative: {max_batch}, {window_s}")
        self.answer_rows, self.group_of = answer_rows, group_of
        self.max_batch, self.window_s = max_batch, window_s
        self._arrivals: queue.Queue[_Request] = queue.Queue()
        self._waiting: list[_Request] = []  # taken from _arrivals, oldest first; batcher thread only
        threading.Thread(target=self._serve_forever, name="batcher", daemon=True).start()

    def submit(self, rows: list) -> Future:
        """A future of ``rows``' answers, in their order (or of the engine's exception)."""
        if not rows:
            raise ValueError("a request needs at least one row")
        request = _Request(list(rows))
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
            self._take(self._arrivals.get())
        self._take_arrivals()
        if not self._waiting:  # the arrivals' rows could not be grouped; each has its answer
            return
        self._wait_for_company()
        group, batch = self._next_batch()
        try:
            answers = self.answer_rows(group, [request.rows[i] for request, i in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"the engine gave {len(answers)} answers for {len(batch)} rows")
        except Exception as error:
            self._fail({request for request, _ in batch}, error)
            return
        for (request, index), answer in zip(batch, answers):
            request.answers[index] = answer
        self._settle({request for request, _ in batch})

    def _take(self, request: _Request) -> None:
        """Put an arrival in the waiting line, with its rows' groups."""
        try:
            request.groups = list(self.group_of(request.rows))
        except Exception as error:
            request.future.set_exception(error)
            return
        self._waiting.append(request)

    def _take_arrivals(self) -> None:
        while True:
            try:
                self._take(self._arrivals.get_nowait())
            except queue.Empty:
                return

    def _wait_for_company(self) -> None:
        """Wait for more rows until the oldest request has waited the window, unless a full
        batch is already there (with a backlog, the engine call just made was the wait)."""
        deadline = min(request.arrived for request in self._waiting) + self.window_s
        while self._waiting and len(self._rows_of_leading_group()) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                self._take(self._arrivals.get(timeout=left))
            except queue.Empty:
                return

    def _rows_of_leading_group(self) -> list[tuple[_Request, int]]:
        """Up to max_batch (request, row index) of the oldest unsent row's group, oldest first."""
        first = self._waiting[0]
        group = first.groups[first.unsent[0]]
        rows = []
        for request in self._waiting:
            rows += [(request, i) for i in request.unsent if request.groups[i] == group]
            if len(rows) >= self.max_batch:
                break
        return rows[:self.max_batch]

    def _next_batch(self) -> tuple[Any, list[tuple[_Request, int]]]:
        batch = self._rows_of_leading_group()
        for request, index in batch:
            request.unsent.remove(index)
        first_request, first_index = batch[0]
        return first_request.groups[first_index], batch

    def _settle(self, served: set[_Request]) -> None:
        """Answer the requests that are complete; those served in part queue again behind the
        requests that arrived meanwhile (a large one's next rows take their turn)."""
        self._take_arrivals()
        done = [r for r in served if not r.unsent]
        for request in done:
            request.future.set_result(request.answers)
        again = [r for r in self._waiting if r in served and r.unsent]
        self._waiting = [r for r in self._waiting if r not in served] + again

    def _fail(self, requests, error: Exception) -> None:
        """Answer each of ``requests`` with ``error``; their other rows are not sent."""
        failed = set(requests)
        for request in failed:
            if not request.future.done():
                request.future.set_exception(error)
        self._waiting = [r for r in self._waiting if r not in failed]
