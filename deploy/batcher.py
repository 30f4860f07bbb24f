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
A request past its deadline is failed (DeadlineExceeded) before the next call is filled, so
the rest of its rows cost nothing.

The thread ends on ``close()``, or when the engine raises KeyboardInterrupt or SystemExit; either
way every request still waiting is failed with ModelNotReady, never left to hang, and
``running()`` turns false so the server stops reading as ready.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence

from sparsebert.deploy.errors import DeadlineExceeded, ModelNotReady

_LOGGER = logging.getLogger(__name__)

# rows -> one answer per row, in order: one engine call.
AnswerRows = Callable[[list], Sequence]
_CLOSE = None  # put on the arrivals queue by close(): wakes the thread wherever it waits
CLOSE_TIMEOUT_S = 30.0  # how long close() waits for an engine call in progress


class _Closed(Exception):
    """The batcher thread read close()'s sentinel."""


@dataclass(eq=False)
class _Request:
    rows: list
    group: Hashable  # only rows of one group share a call
    future: Future = field(default_factory=Future)
    answers: list = field(default_factory=list)  # the answers of rows[:len(answers)]
    sent: int = 0  # rows[:sent] are answered or in the engine call now
    deadline: Optional[float] = None  # time.monotonic() past which its rows are not sent
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
        self._arrivals: queue.Queue[Optional[_Request]] = queue.Queue()
        self._waiting: list[_Request] = []  # taken from _arrivals, in turn order; batcher thread only
        # Set (under _lock) once close() is called or the thread dies: submit refuses from then on,
        # so the thread's last drain of _arrivals sees every request that got in.
        self._lock = threading.Lock()
        self._stopped: Optional[str] = None  # why, for ModelNotReady
        self.thread = threading.Thread(target=self._serve_until_closed, name="batcher", daemon=True)
        self.thread.start()

    def submit(self, rows: list, group: Hashable = None, deadline: Optional[float] = None) -> Future:
        """A future of ``rows``' answers, in their order (or of the engine's exception); only
        rows of the same ``group`` share an engine call. ModelNotReady once stopped; past
        ``deadline`` (``time.monotonic()``), DeadlineExceeded, and its rows not yet sent never are."""
        if not rows:
            raise ValueError("a request needs at least one row")
        request = _Request(list(rows), group, deadline=deadline)
        with self._lock:
            if self._stopped:
                raise ModelNotReady(self._stopped)
            self._arrivals.put(request)
        return request.future

    def running(self) -> bool:
        """Whether submitted requests will be answered: not closed, and the thread alive."""
        return self._stopped is None and self.thread.is_alive()

    def why_stopped(self) -> str:
        return self._stopped or "the batcher thread is not running"

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the thread after the engine call in progress (if any); every request still
        waiting is failed with ModelNotReady. Safe to call twice, or after the thread died."""
        self._stop("the server is shutting down", wake_thread=True)
        self.thread.join(timeout_s)

    def arrivals(self) -> int:
        """Requests submitted and not yet taken up by the batcher thread."""
        return self._arrivals.qsize()

    # ------------------------------------------------------------ the batcher thread

    def _serve_until_closed(self) -> None:
        try:
            self._serve()
        except BaseException as error:  # KeyboardInterrupt or SystemExit: nothing may hang on a dead thread
            _LOGGER.critical("the batcher thread stopped; no request will be answered", exc_info=True)
            self._stop(f"the batcher thread stopped ({type(error).__name__}); restart the server")
            self._fail_all_waiting()
            raise
        self._fail_all_waiting()

    def _serve(self) -> None:
        """Answer batches until close(); return then. KeyboardInterrupt and SystemExit pass."""
        while True:
            try:
                self._answer_one_batch()
            except _Closed:
                return
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as error:  # a bug here must fail its requests, never hang them
                _LOGGER.exception("the batcher failed")
                self._fail(self._waiting, _as_exception(error))

    def _stop(self, reason: str, wake_thread: bool = False) -> None:
        """Refuse new requests from now on, with ``reason`` (the first reason stays)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = reason
            if wake_thread:
                self._arrivals.put(_CLOSE)

    def _fail_all_waiting(self) -> None:
        """On the way out: fail what was taken up, and what is still queued (nothing more can
        be, as submit refuses once stopped)."""
        while True:
            try:
                request = self._arrivals.get_nowait()
            except queue.Empty:
                break
            if request is not _CLOSE:
                self._waiting.append(request)
        self._fail(self._waiting, ModelNotReady(self._stopped))

    def _answer_one_batch(self) -> None:
        if not self._waiting:
            self._waiting.append(self._next_arrival())
        self._take_arrivals()
        self._wait_for_company()
        self._fail_expired()
        if not self._waiting:
            return
        batch = self._next_batch()  # (request, rows of it)
        try:
            answered = self._answer(batch)
        except BaseException as error:  # not an Exception: _answer handles those
            self._fail([request for request, _ in batch], _as_exception(error))
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            return
        self._settle(answered)

    def _answer(self, batch: list[tuple[_Request, list]]) -> list[_Request]:
        """Answer the batch in one engine call; if that raises and the call held more than one
        request, answer each request's rows alone, so one faulty input fails only its own
        request. Return the requests whose rows were answered (the others are failed)."""
        try:
            self._answer_in_one_call(batch)
            return [request for request, _ in batch]
        except Exception as error:
            if len(batch) == 1:
                self._fail([batch[0][0]], error)
                return []
            _LOGGER.warning("an engine call of %d requests failed (%r); answering each alone", len(batch), error)
        answered = []
        for request, rows in batch:
            try:
                self._answer_in_one_call([(request, rows)])
                answered.append(request)
            except Exception as error:
                self._fail([request], error)
        return answered

    def _answer_in_one_call(self, batch: list[tuple[_Request, list]]) -> None:
        """One engine call for the batch's rows; each request gets its rows' answers."""
        answers = self.answer_rows([row for _, rows in batch for row in rows])
        if len(answers) != sum(len(rows) for _, rows in batch):
            raise RuntimeError(f"the engine gave {len(answers)} answers for the rows of {len(batch)} requests")
        for request, rows in batch:
            request.answers += answers[:len(rows)]
            answers = answers[len(rows):]

    def _next_arrival(self, timeout: Optional[float] = None) -> _Request:
        """The next submitted request (queue.Empty after ``timeout``); _Closed on close()."""
        request = self._arrivals.get(timeout=timeout)
        if request is _CLOSE:
            raise _Closed
        return request

    def _take_arrivals(self) -> None:
        while True:
            try:
                self._waiting.append(self._next_arrival(timeout=0))
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
                self._waiting.append(self._next_arrival(timeout=left))
            except queue.Empty:
                return

    def _fail_expired(self) -> None:
        """Fail the requests past their deadline: their client has been answered 504 already
        (or is about to be), so their rows would only hold up the others."""
        now = time.monotonic()
        expired = [r for r in self._waiting if r.deadline is not None and r.deadline <= now]
        self._fail(expired, DeadlineExceeded("the request was not answered within the server's deadline"))

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
        for request in served:  # answered before anything else, close() included
            if request.sent == len(request.rows):
                request.future.set_result(request.answers)
        self._take_arrivals()
        again = [r for r in served if r.sent < len(r.rows)]
        self._waiting = [r for r in self._waiting if r not in served] + again

    def _fail(self, requests: list[_Request], error: Exception) -> None:
        """Answer each of ``requests`` with ``error``; their other rows are not sent."""
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)
        self._waiting = [r for r in self._waiting if r not in requests]


def _as_exception(error: BaseException) -> Exception:
    """``error``, or for one that is not an Exception a RuntimeError naming it: a future holding
    SystemExit would raise it in the server's event loop."""
    if isinstance(error, Exception):
        return error
    wrapped = RuntimeError(f"{type(error).__name__} raised while answering: {error}")
    wrapped.__cause__ = error
    return wrapped
