"""The micro-batcher on its own: merging, grouping by key, the bound, failures, dropped jobs (no model)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hierloc.serve.batching import MicroBatcher, QueueFull, ShuttingDown


class Recorder:
    """compute(key, images) -> [(key, image * 10)], recording each call; `gate` holds calls until set."""

    def __init__(self, hold: bool = False, fail_on=None):
        self.calls: list[tuple] = []
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.fail_on = fail_on

    def __call__(self, key, images):
        self.calls.append((key, list(images)))
        self.gate.wait(10)
        if self.fail_on is not None and self.fail_on in images:
            raise ValueError(f"image {self.fail_on} is bad")
        return [(key, image * 10) for image in images]


async def behind_a_running_job(batcher: MicroBatcher, recorder: Recorder, jobs: list, first_key="k"):
    """Start the batcher, let a job of one image (0) hold the worker, queue `jobs` [(key, images)] behind it;
    -> (the running job's task, the queued jobs' tasks)."""
    await batcher.start()
    first = asyncio.create_task(batcher.submit(first_key, [0]))
    while not recorder.calls:
        await asyncio.sleep(0.005)
    tasks = [asyncio.create_task(batcher.submit(key, images)) for key, images in jobs]
    while batcher.pending() < len(jobs):
        await asyncio.sleep(0.005)
    return first, tasks


def run(coroutine):
    return asyncio.run(coroutine)


def test_waiting_jobs_are_merged_per_key_and_answered_in_order():
    async def scenario():
        recorder = Recorder(hold=True)
        batcher = MicroBatcher(recorder, max_queue=16, max_batch=8)
        first, tasks = await behind_a_running_job(
            batcher, recorder, [("a", [1, 2]), ("b", [3]), ("a", [4]), ("b", [5, 6])], first_key="a")
        recorder.gate.set()
        results = [await first] + [await task for task in tasks]
        await batcher.stop()
        return recorder.calls, results

    calls, results = run(scenario())
    assert calls == [("a", [0]), ("a", [1, 2, 4]), ("b", [3, 5, 6])]
    assert results == [[("a", 0)], [("a", 10), ("a", 20)], [("b", 30)], [("a", 40)], [("b", 50), ("b", 60)]]


def test_a_batch_never_exceeds_max_batch_images_and_a_large_job_runs_alone():
    async def scenario():
        recorder = Recorder(hold=True)
        batcher = MicroBatcher(recorder, max_queue=16, max_batch=3)
        first, tasks = await behind_a_running_job(
            batcher, recorder, [("k", images) for images in ([1, 2], [3], [4, 5, 6, 7], [8])])
        recorder.gate.set()
        await asyncio.gather(first, *tasks)
        await batcher.stop()
        return [images for _, images in recorder.calls]

    batches = run(scenario())
    assert sorted(i for batch in batches for i in batch) == list(range(9))
    assert all(len(batch) <= 3 for batch in batches if batch != [4, 5, 6, 7])
    assert [4, 5, 6, 7] in batches


def test_a_full_queue_refuses_at_once():
    async def scenario():
        recorder = Recorder(hold=True)
        batcher = MicroBatcher(recorder, max_queue=2, max_batch=8)
        running, waiting = await behind_a_running_job(batcher, recorder, [("k", [1]), ("k", [2])])
        with pytest.raises(QueueFull, match="2 requests are waiting"):
            await batcher.submit("k", [3])
        recorder.gate.set()
        results = await asyncio.gather(running, *waiting)
        await batcher.stop()
        return results

    assert run(scenario()) == [[("k", 0)], [("k", 10)], [("k", 20)]]


def test_a_failing_call_fails_its_group_only():
    async def scenario():
        recorder = Recorder(hold=True, fail_on=3)
        batcher = MicroBatcher(recorder, max_queue=8, max_batch=8)
        first, (bad, also_bad, other_key) = await behind_a_running_job(
            batcher, recorder, [("a", [3]), ("a", [4]), ("b", [5])], first_key="a")
        recorder.gate.set()
        outcomes = await asyncio.gather(first, bad, also_bad, other_key, return_exceptions=True)
        after = await batcher.submit("a", [6])        # the worker survives
        await batcher.stop()
        return outcomes, after

    outcomes, after = run(scenario())
    assert outcomes[0] == [("a", 0)] and outcomes[3] == [("b", 50)]
    assert all(isinstance(o, ValueError) and "image 3 is bad" in str(o) for o in outcomes[1:3])
    assert after == [("a", 60)]


def test_a_job_whose_caller_timed_out_is_dropped_before_it_runs():
    async def scenario():
        recorder = Recorder(hold=True)
        batcher = MicroBatcher(recorder, max_queue=8, max_batch=8)
        first, _ = await behind_a_running_job(batcher, recorder, [])
        with pytest.raises(asyncio.TimeoutError):
            await batcher.submit("k", [1], timeout=0.05)
        recorder.gate.set()
        await first
        result = await batcher.submit("k", [2])
        await batcher.stop()
        return recorder.calls, result

    calls, result = run(scenario())
    assert [images for _, images in calls] == [[0], [2]] and result == [("k", 20)]


def test_bad_bounds_and_submit_before_start_are_refused():
    with pytest.raises(ValueError, match="max_queue"):
        MicroBatcher(Recorder(), max_queue=0)
    with pytest.raises(RuntimeError, match="start"):
        run(MicroBatcher(Recorder()).submit("k", [1]))


def test_drain_answers_the_queue_within_its_grace_and_refuses_new_jobs():
    async def scenario():
        recorder = Recorder(hold=True)
        batcher = MicroBatcher(recorder, max_queue=8, max_batch=1)
        running, waiting = await behind_a_running_job(batcher, recorder, [("k", [1]), ("k", [2])])
        drain = asyncio.create_task(batcher.drain(grace_s=5.0))
        await asyncio.sleep(0.05)
        with pytest.raises(ShuttingDown):                 # closed: a new job is refused at once
            await batcher.submit("k", [3])
        recorder.gate.set()                              # the model moves on: the queue empties in the grace
        failed = await drain
        results = await asyncio.gather(running, *waiting)
        await batcher.stop()
        return failed, results

    failed, results = run(scenario())
    assert failed == 0 and results == [[("k", 0)], [("k", 10)], [("k", 20)]]


def test_drain_fails_the_jobs_still_waiting_after_its_grace_and_the_running_one_completes():
    async def scenario():
        recorder = Recorder(hold=True)
        batcher = MicroBatcher(recorder, max_queue=8, max_batch=1)
        running, waiting = await behind_a_running_job(batcher, recorder, [("k", [1]), ("k", [2])])
        loop = asyncio.get_running_loop()
        start = loop.time()
        failed = await batcher.drain(grace_s=0.2)        # the model is still held: nothing leaves the queue
        waited = loop.time() - start
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        recorder.gate.set()
        result = await running
        await batcher.stop()
        return failed, waited, outcomes, result

    failed, waited, outcomes, result = run(scenario())
    assert failed == 2 and 0.2 <= waited < 1.0
    assert all(isinstance(o, ShuttingDown) and "shutting down" in str(o) for o in outcomes)
    assert result == [("k", 0)]
