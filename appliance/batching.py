"""Group commit: callers queue requests, one thread runs whatever is queued as one batch.

The store (one SQLite transaction, one fsync) and the audit log (one locked write, one
fdatasync) both need it: under load the cost of the commit is shared by every request that
arrived while the previous one ran, and each caller still hears its own outcome. The thread
blocks in the commit, so the event loops never do; each batch costs one hand-off to the thread
and one wake-up per event loop that is waiting on it.

This module imports nothing from the appliance: the storage and audit layers build on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

R = TypeVar("R")
T = TypeVar("T")

Outcome = tuple[Any, BaseException | None]
"""What one request came to: (result, None), or (None, the error its caller is to see)."""


class _Queued(Generic[R]):
    __slots__ = ("request", "loop", "future")

    def __init__(self, request: R, loop: asyncio.AbstractEventLoop,
                 future: asyncio.Future[Any]) -> None:
        self.request = request
        self.loop = loop
        self.future = future


def _settle_all(settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in settled:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class BatchWriter(Generic[R, T]):
    """One writer thread for `run_batch`: `await submit(request)` returns that request's result.

    `run_batch(requests)` gets up to `max_batch` requests in the order they were queued and
    returns one Outcome per request; it runs on the writer thread, inside `thread_context()`
    (e.g. the writer's database connection). A request for which `is_barrier` is true is run
    in a batch of its own, after everything queued before it. If `run_batch` raises, every
    caller of that batch gets the exception: nobody waits for ever.

    A dropped caller does not cancel its request: it is written regardless (the await is
    shielded), because what it records (a token id, an audit record) must not half-happen.
    """

    def __init__(self, name: str, run_batch: Callable[[list[R]], Sequence[Outcome]], *,
                 max_batch: int, closed_error: Callable[[], BaseException],
                 is_barrier: Callable[[R], bool] | None = None,
                 thread_context: Callable[[], AbstractContextManager[object]] | None = None,
                 ) -> None:
        self._name = name
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._closed_error = closed_error
        self._is_barrier = is_barrier
        self._thread_context = thread_context or contextlib.nullcontext
        self._queue: queue.SimpleQueue[_Queued[R] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # closing and starting, against submit
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        """Start the writer thread now (else the first `submit` does)."""
        with self._lock:
            self._start_locked()

    async def submit(self, request: R) -> T:
        """Queue `request`; return its result once its batch is done, or raise its error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise self._closed_error()
            self._start_locked()
            self._queue.put(_Queued(request, loop, future))
        return await asyncio.shield(future)

    async def close(self) -> None:
        """Run what is queued, then stop the writer thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            await asyncio.to_thread(thread.join)

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    # -- the writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        with self._thread_context():
            self._serve()

    def _serve(self) -> None:
        get, get_nowait, is_barrier = self._queue.get, self._queue.get_nowait, self._is_barrier
        held: _Queued[R] | None = None  # a barrier that ended the previous batch
        while True:
            first = held if held is not None else get()
            held = None
            if first is None:
                return
            batch = [first]
            stop = False
            if is_barrier is None or not is_barrier(first.request):
                while len(batch) < self._max_batch:
                    try:
                        nxt = get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    if is_barrier is not None and is_barrier(nxt.request):
                        held = nxt  # after this batch, to keep the queue's order
                        break
                    batch.append(nxt)
            self._settle(batch)
            if stop:
                return

    def _settle(self, batch: list[_Queued[R]]) -> None:
        try:
            outcomes: Sequence[Outcome] = self._run_batch([q.request for q in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{self._name}: {len(outcomes)} outcomes for "
                                   f"{len(batch)} requests")
        except Exception as e:  # noqa: BLE001 - every waiter must hear of it, or it hangs
            outcomes = [(None, e)] * len(batch)
        # One wake-up per event loop, not per request.
        by_loop: dict[asyncio.AbstractEventLoop,
                      list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for queued, (result, error) in zip(batch, outcomes, strict=True):
            by_loop.setdefault(queued.loop, []).append((queued.future, result, error))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody waits
                loop.call_soon_threadsafe(_settle_all, settled)
