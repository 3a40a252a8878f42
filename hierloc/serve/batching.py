"""Micro-batching: concurrent requests share the model's batches through one bounded queue and one worker.

Each request is a `Job` (its images, a hashable `key` naming what to compute and with which options, and an
asyncio future). `MicroBatcher.submit` puts the job on a bounded `asyncio.Queue` and waits for its result; when
the queue is full it raises `QueueFull` at once (the server answers 503 with Retry-After) instead of letting
latency grow without bound. The single worker takes the oldest job, then every job already waiting (up to
`max_batch` images in all), groups them by key and calls `compute(key, images)` once per group in the batcher's own
thread, so the event loop keeps accepting requests while the model runs; results are split back to their jobs in
order.

One worker thread means the model is only ever used by one thread (no locks in the library; torch keeps one pool
of intra-op threads instead of one per calling thread), and a batch of 8 requests costs about one forward pass of
8 images instead of 8 passes of 1.

A job whose caller gave up (timeout, disconnect) before the worker reached it is dropped; an exception raised by
`compute` fails every job of that group with the same exception.

Shutting down: `close` refuses new jobs (`ShuttingDown`) while the worker goes on with the queued ones; `drain`
waits for the queue to empty and, after its grace period, fails the jobs still waiting with `ShuttingDown`, so
that every caller gets an answer before the process exits.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already: try again later."""


class ShuttingDown(Exception):
    """The batcher was closed (the server is stopping): this job will not be computed."""


@dataclass
class Job:
    """One request: its images, what to compute (`key`), and the future its caller awaits."""

    key: Hashable
    images: list
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """A bounded queue of jobs and one worker that runs them in batches.

    compute(key, images) -> one result per image, in order (called in a worker thread). max_queue: jobs waiting
    at most (more -> QueueFull). max_batch: images per compute call at most (a job is never split, so one larger
    job runs alone).
    """

    def __init__(self, compute: Callable[[Hashable, list], Sequence[Any]], max_queue: int = 64,
                 max_batch: int = 32):
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue {max_queue} and max_batch {max_batch} must be >= 1")
        self.compute = compute
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.queue: asyncio.Queue[Job] | None = None
        self.task: asyncio.Task | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.n_batches = 0       # compute calls so far (the tests read it to see that jobs were merged)
        self.closing = False     # set by close(): new jobs are refused

    async def start(self) -> None:
        """Create the queue and the worker on the running event loop."""
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hierloc-model")
        self.task = asyncio.create_task(self._worker(), name="hierloc-micro-batcher")

    async def stop(self) -> None:
        """Stop the worker; jobs still waiting fail with asyncio.CancelledError."""
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
        while self.queue is not None and not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    def close(self) -> None:
        """Refuse new jobs from now on (`submit` raises ShuttingDown); the queued ones are still computed."""
        self.closing = True

    async def drain(self, grace_s: float, poll_s: float = 0.05) -> int:
        """Close, wait up to `grace_s` seconds for the queue to empty, then fail the jobs still waiting with
        ShuttingDown (the batch being computed finishes). Returns the number of jobs failed so."""
        self.close()
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.pending() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(poll_s)
        failed = 0
        while self.queue is not None and not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(ShuttingDown(f"the server is shutting down: the request waited "
                                                      f"{grace_s:g} s after the stop signal"))
                failed += 1
        return failed

    def pending(self) -> int:
        """Jobs waiting in the queue."""
        return self.queue.qsize() if self.queue is not None else 0

    async def submit(self, key: Hashable, images: list, timeout: float | None = None) -> list:
        """Queue one job and wait for its results (one per image). Raises QueueFull when the queue is full,
        ShuttingDown once the batcher is closing, and asyncio.TimeoutError after `timeout` seconds (the job is then
        dropped if it has not started)."""
        if self.queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        job = Job(key, list(images), asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(f"{self.max_queue} requests are waiting already") from None
        try:
            return await asyncio.wait_for(job.future, timeout)
        finally:
            if not job.future.done():
                job.future.cancel()      # the worker skips cancelled jobs

    async def _worker(self) -> None:
        assert self.queue is not None
        while True:
            jobs = [await self.queue.get()]
            n_images = len(jobs[0].images)
            while not self.queue.empty() and n_images < self.max_batch:
                job = self.queue.get_nowait()
                jobs.append(job)
                n_images += len(job.images)
            live = [job for job in jobs if not job.future.done()]
            for group in _groups(live, self.max_batch):
                await self._run(group)

    async def _run(self, group: list[Job]) -> None:
        images = [image for job in group for image in job.images]
        self.n_batches += 1
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.compute, group[0].key,
                                                                       images)
        except Exception as exc:  # noqa: BLE001 - handed to every caller of the group, never lost
            log.debug("batch of %d images failed: %s", len(images), exc)
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        start = 0
        for job in group:
            part = list(results[start:start + len(job.images)])
            start += len(job.images)
            if not job.future.done():
                job.future.set_result(part)


def _groups(jobs: list[Job], max_batch: int) -> list[list[Job]]:
    """Jobs -> groups of the same key, in order of first arrival, each of at most max_batch images (a job larger
    than max_batch forms its own group)."""
    groups: list[list[Job]] = []
    open_group: dict[Hashable, list[Job]] = {}
    for job in jobs:
        group = open_group.get(job.key)
        if group is None or sum(len(j.images) for j in group) + len(job.images) > max_batch:
            group = []
            groups.append(group)
            open_group[job.key] = group
        group.append(job)
    return groups
