"""Run one function over many tasks on threads or processes, results in task order, with one progress bar.

A task function has the signature `fn(task, *args, report=None)` and calls `report_progress(n, report)`
as it advances by `n` units. On threads `report` updates the bar under a lock; in a worker process it is
None and the count travels back over a queue that the parent drains into the bar.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import multiprocessing as mp
import multiprocessing.forkserver
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
Report = Callable[[int], None]
_REPORT: Report | None = None  # the progress callback of a worker process


def progress_bar(total: int, desc: str, progress: bool | None) -> tqdm:
    """A tqdm bar counting images: shown when `progress` is True, never when False, on a terminal when None."""
    return tqdm(total=total, unit="img", desc=desc, disable=None if progress is None else not progress)


def report_progress(units: int, report: Report | None = None) -> None:
    """Advance the bar by `units`: through `report` when given (threads, one worker), else the worker's queue."""
    if report is not None:
        report(units)
    elif _REPORT is not None:
        _REPORT(units)


def _init_worker(progress: mp.Queue) -> None:
    """A worker reports progress over the queue and leaves Ctrl-C to the parent, which stops the pool."""
    global _REPORT
    _REPORT = progress.put
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_tasks(
    fn: Callable[..., T],
    tasks: Sequence[Any],
    workers: int,
    bar: tqdm,
    *args: object,
    processes: bool = False,
    inline_below: float | None = None,
) -> list[T]:
    """`fn(task, *args, report)` for every task on `workers` threads (or processes); results in task order.

    Threads suit work that releases the GIL (Arrow's encoder, sha256, file writes) and start at once;
    processes suit pure-Python work such as decoding. Processes come from a forkserver (a plain fork
    does not survive pyarrow's threads) that preloads `fn`'s module, so each worker skips its imports.
    """
    if workers <= 1 or len(tasks) <= 1:
        return [fn(task, *args, bar.update) for task in tasks]
    workers = min(workers, len(tasks))
    if not processes:
        lock = threading.Lock()

        def report(units: int) -> None:
            with lock:
                bar.update(units)

        with cf.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(fn, task, *args, report) for task in tasks]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    return list(imap_tasks(fn, tasks, workers, bar, *args, window=len(tasks), inline_below=inline_below))


def imap_tasks(
    fn: Callable[..., T],
    tasks: Sequence[Any],
    workers: int,
    bar: tqdm,
    *args: object,
    window: int | None = None,
    inline_below: float | None = None,
) -> Iterator[T]:
    """`fn(task, *args)` on `workers` processes, results yielded in task order as soon as each is ready.

    At most `window` tasks (default 4 per worker) are in flight, so a long stream of tasks whose results
    are large (prepared images) holds only a window of them in memory. Processes come from a forkserver
    (a plain fork does not survive pyarrow's threads) that preloads `fn`'s module. With `inline_below`
    (seconds), the first task runs in this process, and when it took less than that the rest do too:
    work cheaper than its round trip to a worker (aligned JPEGs kept as they are) is faster here.
    """
    if inline_below is not None and workers > 1 and len(tasks) > 1:
        started = time.perf_counter()
        yield fn(tasks[0], *args, bar.update)
        if time.perf_counter() - started < inline_below:
            workers = 1
        tasks = tasks[1:]
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield fn(task, *args, bar.update)
        return
    workers = min(workers, len(tasks))
    window = max(1, window or 4 * workers)
    ctx = _forkserver(fn)
    progress = ctx.Queue()
    with cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(progress,)
    ) as pool:
        pending: collections.deque[cf.Future] = collections.deque()
        queued = iter(tasks)
        try:
            for task in itertools.islice(queued, window):
                pending.append(_submit(pool, fn, task, *args))
            while pending:
                while not pending[0].done():
                    cf.wait([pending[0]], timeout=0.2)
                    _drain(progress, bar)
                _drain(progress, bar)
                result = pending.popleft().result()
                for task in itertools.islice(queued, 1):
                    pending.append(_submit(pool, fn, task, *args))
                yield result
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # running tasks finish; queued ones never start
            raise
        finally:
            _drain(progress, bar)


def _submit(pool: cf.ProcessPoolExecutor, fn: Callable[..., Any], *args: object) -> cf.Future:
    """`pool.submit` with Ctrl-C held back until it returns (then raised as usual).

    A submit may start a worker; a KeyboardInterrupt in the middle of that leaves a process the pool
    never learns of, which its shutdown then waits on for ever or leaves orphaned.
    """
    if threading.current_thread() is not threading.main_thread():
        return pool.submit(fn, *args)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(fn, *args)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _forkserver(fn: Callable[..., Any]) -> mp.context.BaseContext:
    """The forkserver context, its server started with Ctrl-C ignored (the parent alone handles it).

    The server inherits SIGINT's disposition; without this, a Ctrl-C while it preloads `fn`'s module
    prints its traceback beside the parent's one-line message.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, fn.__module__])
    if threading.current_thread() is not threading.main_thread():
        return ctx
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        mp.forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)
    return ctx


def _drain(progress: mp.Queue, bar: tqdm) -> None:
    try:
        while True:
            bar.update(progress.get_nowait())
    except queue.Empty:
        pass
