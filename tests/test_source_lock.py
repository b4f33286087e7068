"""The test suite's own guard (workflow_helpers.source_lock): a test that edits a simulator source must wait
while a workflow of another xdist worker is planned or run, and a workflow must wait during the edit."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import time

from workflow_helpers import REPO, SOURCE_LOCK, source_lock

HOLD = """
import sys, time
sys.path.insert(0, {tests!r})
from workflow_helpers import source_lock
with source_lock(exclusive={exclusive}):
    print("held", flush=True)
    time.sleep(3)
"""


def _holder(exclusive: bool) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(tests=str(REPO / "tests"), exclusive=exclusive)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _try(mode: int) -> bool:
    with open(SOURCE_LOCK, "a") as handle:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def test_a_running_workflow_blocks_an_edit_and_an_edit_blocks_workflows():
    proc = _holder(exclusive=False)  # another worker's workflow run
    try:
        assert _try(fcntl.LOCK_SH) and not _try(fcntl.LOCK_EX)
        start = time.monotonic()
        with source_lock(exclusive=True):  # waits for the run to end
            assert time.monotonic() - start > 2  # the holder sleeps 3 s with the lock
            with source_lock():  # re-entrant: the editing test plans workflows itself
                pass
    finally:
        proc.wait()
    proc = _holder(exclusive=True)  # another worker's edit
    try:
        assert not _try(fcntl.LOCK_SH)
        start = time.monotonic()
        with source_lock():  # a workflow run waits for the edit to end
            assert time.monotonic() - start > 2
    finally:
        proc.wait()
