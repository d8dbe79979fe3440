"""femb.parallel: ordered process maps, and cheap work kept in this process (`inline_below`)."""

from __future__ import annotations

import os
import time

from tqdm import tqdm

from femb.parallel import imap_tasks


def pid_after(seconds: float, report=None) -> int:  # noqa: ANN001 (the progress callback, when in-process)
    time.sleep(seconds)
    return os.getpid()


def test_cheap_first_task_keeps_the_rest_in_process_and_slow_work_goes_to_the_workers() -> None:
    with tqdm(disable=True) as bar:
        cheap = list(imap_tasks(pid_after, [0.0] * 4, 2, bar, inline_below=0.5))
        costly = list(imap_tasks(pid_after, [0.0] * 4, 2, bar, inline_below=0.0))
    assert cheap == [os.getpid()] * 4
    assert costly[0] == os.getpid() and os.getpid() not in costly[1:]  # the first ran here, the rest there
