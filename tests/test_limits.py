"""The suite's memory cap and time limit (tests/limits.py) fail the test that passes them, and only it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent

INNER = """
import time

import pytest


@pytest.mark.limits(mem_gib=0.5)
def test_grows():
    blocks = []
    while True:
        blocks.append(bytearray(64 << 20))  # touched: resident
        time.sleep(0.05)


@pytest.mark.limits(timeout_s=1)
def test_sleeps():
    while True:
        time.sleep(0.1)


def test_child_grows():
    import subprocess, sys
    grow = "import time\\nb = []\\nwhile True:\\n    b.append(bytearray(64 << 20))\\n    time.sleep(0.05)"
    subprocess.run([sys.executable, "-c", grow])


def test_fine():
    assert sum(range(10)) == 45


def test_stopped_where_no_line_is_known():
    # a limit's exception can arrive on an instruction without a line: a traceback entry pytest cannot print
    import sys, types
    from tests.limits import TestLimitExceeded

    try:
        raise TestLimitExceeded("test_inner.py::test_stopped_where_no_line_is_known: it ran 9 s")
    except TestLimitExceeded as exc:
        raise exc.with_traceback(types.TracebackType(exc.__traceback__, sys._getframe(), 10**6, -1))
"""


def test_a_test_past_its_memory_cap_or_time_limit_fails_naming_it(tmp_path):
    (tmp_path / "conftest.py").write_text(
        "from tests.limits import pytest_configure, pytest_runtest_call, pytest_runtest_protocol, "
        "pytest_terminal_summary  # noqa\n"
    )
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FITUNE_TEST_MEM_GIB": "0.6"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "4 failed, 1 passed" in out and "INTERNALERROR" not in out
    assert "test_inner.py::test_grows: its resident memory" in out and "the cap of 0.5 GiB" in out
    assert re.search(r"test_inner.py::test_sleeps: it ran \d+ s, past the time limit of 1 s", out)
    assert "test_inner.py::test_child_grows: its resident memory" in out and "the cap of 0.6 GiB" in out
    assert "test_inner.py::test_stopped_where_no_line_is_known: it ran 9 s" in out
