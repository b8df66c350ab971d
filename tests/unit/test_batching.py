"""The group-commit primitive under the store and the audit log: batches, order, outcomes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from appliance.batching import BatchWriter, Outcome


class Closed(Exception):
    pass


class Recorder:
    """Runs batches of ints: a negative request is refused, 0 is a barrier; records each batch."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate

    def run(self, batch: list[int]) -> Sequence[Outcome]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(list(batch))
        return [(None, ValueError(f"refused {r}")) if r < 0 else (r * 10, None) for r in batch]


def writer(recorder: Recorder, max_batch: int = 100) -> BatchWriter[int, int]:
    return BatchWriter("test-writer", recorder.run, max_batch=max_batch,
                       closed_error=lambda: Closed("closed"), is_barrier=lambda r: r == 0)


def gated() -> tuple[threading.Event, Recorder, BatchWriter[int, int]]:
    """A writer whose batches wait until the gate opens, so that what comes next queues up."""
    gate = threading.Event()
    recorder = Recorder(gate)
    return gate, recorder, writer(recorder)


async def submit_all(w: BatchWriter[int, int], requests: Sequence[int]
                     ) -> list[asyncio.Future[int]]:
    futures = [asyncio.ensure_future(w.submit(r)) for r in requests]
    await asyncio.sleep(0.05)  # each is queued (the first may be at the gate already)
    return futures


async def test_queued_requests_share_a_batch_and_each_hears_its_own_outcome() -> None:
    gate, recorder, w = gated()
    first = await submit_all(w, [1])  # the writer holds 1 at the gate; the next ones queue
    rest = await submit_all(w, [2, -3, 4])
    gate.set()
    results = await asyncio.gather(*first, *rest, return_exceptions=True)
    assert results[0] == 10 and results[1] == 20 and results[3] == 40
    assert isinstance(results[2], ValueError) and "refused -3" in str(results[2])
    assert recorder.batches == [[1], [2, -3, 4]], "the queued requests were not one batch"
    await w.close()


async def test_a_barrier_runs_alone_after_what_was_queued_before_it() -> None:
    gate, recorder, w = gated()
    head = await submit_all(w, [9])
    queued = await submit_all(w, [1, 2, 0, 3, 4])
    gate.set()
    await asyncio.gather(*head, *queued)
    assert recorder.batches == [[9], [1, 2], [0], [3, 4]]
    await w.close()


async def test_batches_are_bounded() -> None:
    recorder = Recorder()
    w = writer(recorder, max_batch=3)
    assert await asyncio.gather(*(w.submit(r) for r in range(1, 8))) == [
        r * 10 for r in range(1, 8)]
    assert all(len(b) <= 3 for b in recorder.batches)
    await w.close()


async def test_a_failing_batch_reaches_every_caller_and_the_writer_goes_on() -> None:
    calls = 0

    def run(batch: list[int]) -> Sequence[Outcome]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk gone")
        return [(r, None) for r in batch]

    w: BatchWriter[int, int] = BatchWriter("test-writer", run, max_batch=10,
                                           closed_error=lambda: Closed("closed"))
    with pytest.raises(OSError, match="disk gone"):
        await w.submit(1)
    assert await w.submit(2) == 2
    await w.close()


async def test_callers_on_other_event_loops_get_their_own_results() -> None:
    recorder = Recorder()
    w = writer(recorder)
    results: dict[int, int] = {}

    def other_loop(r: int) -> None:
        results[r] = asyncio.run(w.submit(r))

    threads = [threading.Thread(target=other_loop, args=(r,)) for r in (5, 6, 7)]
    for t in threads:
        t.start()
    mine = await w.submit(8)
    await asyncio.to_thread(lambda: [t.join(5) for t in threads])
    assert (mine, results) == (80, {5: 50, 6: 60, 7: 70})
    await w.close()


async def test_a_cancelled_caller_does_not_cancel_its_write() -> None:
    gate, recorder, w = gated()
    (caller,) = await submit_all(w, [1])
    caller.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await w.close()  # runs what is queued
    assert recorder.batches == [[1]]


async def test_close_writes_what_is_queued_then_refuses() -> None:
    gate, recorder, w = gated()
    queued = await submit_all(w, [1, 2, 3])
    closing = asyncio.ensure_future(w.close())
    await asyncio.sleep(0.01)
    gate.set()
    await closing
    assert await asyncio.gather(*queued) == [10, 20, 30]
    with pytest.raises(Closed):
        await w.submit(4)
    assert w.closed
