"""A memory cap and a time limit for every test, so that no test can stall the machine.

This machine class has no swap: a process that grows past free memory does not fail, it stalls everything
until the kernel kills something. A watchdog thread reads the resident memory of the test process and its
children (``/proc``, four times a second). A test that passes its cap or its time limit fails with a
``TestLimitExceeded`` naming the limit, raised in the test (its children killed first); if the test does not
return to Python within ``GRACE_S`` (stuck inside one long C call), the watchdog ends pytest with the same
message on stderr. An exception raised from another thread can land on an instruction Python knows no line
for, an entry pytest cannot print (it would end the whole run with an internal error); such entries are
dropped from the failure's traceback. Limits: ``FITUNE_TEST_MEM_GIB`` and ``FITUNE_TEST_TIMEOUT_S``, or per
test ``@pytest.mark.limits(mem_gib=..., timeout_s=...)``. The summary lists the tests that took the most memory.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
import threading
import time

import pytest

MEM_GIB = float(os.environ.get("FITUNE_TEST_MEM_GIB", "4"))
TIMEOUT_S = float(os.environ.get("FITUNE_TEST_TIMEOUT_S", "120"))
GRACE_S = 20.0
POLL_S = 0.25
_PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> tuple[int, list[int]]:
    """Resident bytes of ``root`` and its descendants, and the descendants' pids."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo, descendants = 0, [root], []
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        for child in children.get(pid, ()):
            descendants.append(child)
            todo.append(child)
    return total, descendants


class _Watch:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.test: str | None = None
        self.start = 0.0
        self.mem_bytes = 0
        self.timeout_s = 0.0
        self.raised_at: float | None = None
        self.peak = 0
        self.peaks: dict[str, int] = {}
        self.main = threading.main_thread().ident

    def begin(self, nodeid: str, mem_gib: float, timeout_s: float) -> None:
        with self.lock:
            self.test, self.start, self.raised_at = nodeid, time.monotonic(), None
            self.mem_bytes, self.timeout_s, self.peak = int(mem_gib * 2**30), timeout_s, 0

    def end(self) -> None:
        with self.lock:
            if self.test is not None:
                self.peaks[self.test] = self.peak
            self.test = None

    def run(self) -> None:
        pid = os.getpid()
        while True:
            time.sleep(POLL_S)
            rss, descendants = tree_rss(pid)
            with self.lock:
                if self.test is None:
                    continue
                self.peak = max(self.peak, rss)
                elapsed = time.monotonic() - self.start
                why = None
                if rss > self.mem_bytes:
                    why = f"its resident memory {rss / 2**30:.2f} GiB passed the cap of {self.mem_bytes / 2**30:g} GiB"
                elif elapsed > self.timeout_s:
                    why = f"it ran {elapsed:.0f} s, past the time limit of {self.timeout_s:g} s"
                if why is None:
                    continue
                message = (
                    f"{self.test}: {why} (tests/limits.py; raise it with @pytest.mark.limits or "
                    "FITUNE_TEST_MEM_GIB / FITUNE_TEST_TIMEOUT_S)"
                )
                for child in descendants:
                    try:
                        os.kill(child, signal.SIGKILL)
                    except OSError:
                        pass
                if self.raised_at is None:
                    self.raised_at = time.monotonic()
                    _raise_in(self.main, message)
                elif time.monotonic() - self.raised_at > GRACE_S:
                    os.write(
                        2, f"\nfitune test limits: {message}; the test did not stop, ending pytest\n".encode()
                    )
                    os._exit(3)


class TestLimitExceeded(Exception):
    """A test passed its memory cap or time limit (tests/limits.py)."""


def _raise_in(thread_id: int, message: str) -> None:
    """Raise ``TestLimitExceeded(message)`` in another thread, at its next Python instruction."""
    exc = type(
        "TestLimitExceeded",
        (TestLimitExceeded,),
        {"__init__": lambda self: Exception.__init__(self, message)},
    )
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc))


def _printable(tb):
    """``tb`` without the entries whose line number Python cannot tell (``tb_lineno`` None)."""
    kept = []
    while tb is not None:
        if tb.tb_lineno is not None:
            kept.append(tb)
        tb = tb.tb_next
    head = None
    for entry in reversed(kept):
        entry.tb_next = head
        head = entry
    return head


_watch = _Watch()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "limits(mem_gib, timeout_s): this test's memory cap and time limit")
    threading.Thread(target=_watch.run, name="fitune-test-limits", daemon=True).start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    marker = item.get_closest_marker("limits")
    kwargs = marker.kwargs if marker is not None else {}
    _watch.begin(item.nodeid, kwargs.get("mem_gib", MEM_GIB), kwargs.get("timeout_s", TIMEOUT_S))
    try:
        yield
    finally:
        _watch.end()
        if isinstance(getattr(sys, "last_value", None), TestLimitExceeded):
            # pytest keeps the last failure for post-mortem debugging, and with it the frames that hold what
            # the test allocated: let them go, so the next test starts below the cap
            sys.last_type = sys.last_value = sys.last_traceback = None
            if hasattr(sys, "last_exc"):
                sys.last_exc = None
            gc.collect()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except TestLimitExceeded as exc:
        seen = set()
        e: BaseException | None = exc
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            e.__traceback__ = _printable(e.__traceback__)
            e = e.__cause__ or e.__context__
        raise


def pytest_terminal_summary(terminalreporter) -> None:
    top = sorted(_watch.peaks.items(), key=lambda kv: -kv[1])[:5]
    if top:
        terminalreporter.write_line(
            f"resident memory while a test ran, highest (cap {MEM_GIB:g} GiB unless marked): "
            + ", ".join(f"{name.split('::')[-1]} {peak / 2**30:.2f} GiB" for name, peak in top)
        )
