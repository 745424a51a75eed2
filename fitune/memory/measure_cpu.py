"""Ground truth on CPU: the peak of live CPU allocator bytes while a function runs.

Two readings of torch.profiler's record of every allocation and free the CPU allocator reports:

- `measure_cpu_allocations` sums the allocator's own events in time order. It needs no Python tracer, so
  it is cheap enough to wrap a model load (the tracer records every Python call of a load, lazy imports
  included: minutes and gigabytes for a 135M model). `fitune.measure` uses it.
- `measure_cpu_peak` also ties each allocation to a tensor and a category (parameter, gradient, optimizer
  state...), which needs the Python tracer; for small functions and the tracker's tests.

Both see the scratch buffers inside kernels that a dispatch-level tracker cannot see, and both give the same
relative peak (a test holds them equal).

`measure_cpu_peak` reads torch's own memory profiler (`torch.profiler._memory_profiler`). Its timeline
starts with PREEXISTING entries: allocations made before profiling that `fn` touched (used as an op input,
or freed). Their sizes come from the largest extent seen through a view, or from the free event, so storage
that `fn` never touches and the unseen tail of a storage used only through a narrower view are missing.
Hence two numbers:

- `peak_bytes_relative`: max over time of (bytes allocated during fn and still live, minus
  pre-existing bytes freed so far); exact for what the CPU allocator reports.
- `peak_bytes`: `preexisting_bytes + peak_bytes_relative`, a lower bound on the absolute peak that
  is exact when every pre-existing allocation is used by fn through a full-size view (as a training
  step does with parameters, optimizer state and the batch).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import gc
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.profiler._memory_profiler import Action, MemoryProfileTimeline, TensorKey

UNKNOWN = "UNKNOWN"  # allocations the profiler could not tie to a tensor
# what the profiler's C++ side (kineto) writes to the process's stderr as it starts and stops, whatever
# KINETO_LOG_LEVEL says: "USDT:<date> <time> <pid>:<tid> SyncActivityProfilerHandler.cpp:52] profiler_start"
KINETO_LINE = re.compile(rb"^(USDT|STAGE):\S+ \S+ \d+:\d+ \S+\.cpp:\d+\] ")


@contextlib.contextmanager
def _kineto_lines_dropped() -> Iterator[None]:
    """Keep kineto's own lines off stderr while the profiler starts or stops; pass every other line on."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stderr without a file descriptor
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().splitlines(keepends=True) if not KINETO_LINE.match(line)]
            if kept:
                os.write(fd, b"".join(kept))


@contextlib.contextmanager
def _profiled(**options) -> Iterator[profile]:
    """``torch.profiler.profile(**options)`` without kineto's start and stop lines on stderr."""
    prof = profile(**options)
    with _kineto_lines_dropped():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _kineto_lines_dropped():
            prof.__exit__(None, None, None)


@dataclasses.dataclass
class CpuMeasurement:
    peak_bytes: int  # preexisting_bytes + peak_bytes_relative (see module docstring)
    peak_bytes_relative: int  # peak of live bytes allocated during fn, relative to the start
    preexisting_bytes: int  # live before fn and touched by it
    end_bytes_relative: int  # live at the end, relative to the start
    # Profiler category name (PARAMETER, GRADIENT, ... UNKNOWN) -> bytes at the peak, pre-existing
    # allocations included; the values sum to peak_bytes.
    breakdown_at_peak: dict[str, int]
    result: Any = None  # what the profiled call of fn returned
    # peak of live bytes (relative to the start) inside each `phase(name)` range that fn opened
    phase_peaks_relative: dict[str, int] = dataclasses.field(default_factory=dict)


PHASE_PREFIX = "fitune::phase::"


def phase(name: str):
    """Mark a phase inside a measured function; `measure_cpu_peak` reports its peak separately."""
    return record_function(PHASE_PREFIX + name)


def _add(counts: dict[str, int], key: str, n: int) -> None:
    counts[key] = counts.get(key, 0) + n


def _named_events(prof):
    for e in prof.profiler.kineto_results.events():
        try:
            name = e.name()
        except UnicodeDecodeError:  # some kernel-side event names are not UTF-8; they are not ours
            continue
        yield name, e


def _phase_ranges(prof) -> list[tuple[str, int, int]]:
    """(name, start ns, end ns) of each `phase(name)` range."""
    return [
        (name[len(PHASE_PREFIX) :], e.start_ns(), e.start_ns() + e.duration_ns())
        for name, e in _named_events(prof)
        if name.startswith(PHASE_PREFIX)
    ]


@dataclasses.dataclass
class CpuAllocations:
    peak_bytes_relative: int  # peak of live bytes allocated during fn, relative to the start
    end_bytes_relative: int  # live at the end, relative to the start
    phase_peaks_relative: dict[str, int]  # the same peak inside each `phase(name)` range that fn opened
    result: Any = None  # what the profiled call of fn returned


def measure_cpu_allocations(fn: Callable[[], Any]) -> CpuAllocations:
    """Run `fn` once under the profiler's allocation events (no Python tracer); report the CPU peaks."""
    gc.collect()  # see measure_cpu_peak
    with _profiled(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [
        (e.start_ns(), e.nbytes())
        for name, e in _named_events(prof)
        if name == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    ranges = _phase_ranges(prof)
    # at equal times allocations come before frees, so a transient is never hidden
    events.sort(key=lambda ev: (ev[0], ev[1] < 0))
    live = peak = 0
    times, lives = [], []  # after each event
    for t, nbytes in events:
        live += nbytes
        peak = max(peak, live)
        times.append(t)
        lives.append(live)
    return CpuAllocations(peak, live, _phase_peaks(ranges, times, lives), result)


def _phase_peaks(ranges: list[tuple[str, int, int]], times: list[int], lives: list[int]) -> dict[str, int]:
    """The most live bytes inside each range: what was live when it began, and after each event in it (a
    phase that allocates nothing still holds what it started with)."""
    peaks: dict[str, int] = {}
    for name, lo, hi in ranges:
        first, end = bisect.bisect_left(times, lo), bisect.bisect_right(times, hi)
        start_live = lives[first - 1] if first > 0 else 0
        peaks[name] = max([peaks.get(name, 0), start_live, *lives[first:end]])
    return peaks


def measure_cpu_peak(fn: Callable[[], Any], *, warmup: int = 0) -> CpuMeasurement:
    """Run `fn` `warmup` times unprofiled, then once under the memory profiler; report the CPU peak."""
    for _ in range(warmup):
        fn()
    # garbage left by earlier work (a model in a reference cycle) must not be freed inside the profiled
    # window: the profiler would see only part of it, as pre-existing storage, and the peak would be off
    gc.collect()
    # with_stack=True is required by `profile._memory_profile()`; its Python tracer is also what
    # lets the profiler label parameters and optimizer state.
    with _profiled(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        result = fn()
    timeline = MemoryProfileTimeline(prof._memory_profile())
    cpu = torch.device("cpu")
    ranges = _phase_ranges(prof)

    def category(key: Any, version: int) -> str:
        cat = timeline.categories.get(key, version) if isinstance(key, TensorKey) else None
        return UNKNOWN if cat is None else cat.name

    times, lives = [], []  # relative live bytes after each allocation or free
    preexisting = relative = peak_relative = 0
    by_category: dict[str, int] = {}
    peak_breakdown: dict[str, int] | None = None  # taken at the start, then at each new peak
    # Sorted by (time, action): PREEXISTING entries (time -1) come first, and at equal times
    # creations come before destructions, so a transient is never hidden.
    for _t, action, (key, version), nbytes in timeline.timeline:
        if key.device != cpu:
            continue
        if action == Action.PREEXISTING:
            preexisting += nbytes
            _add(by_category, category(key, version), nbytes)
            continue
        if peak_breakdown is None:
            peak_breakdown = dict(by_category)
        if action == Action.INCREMENT_VERSION:  # same bytes, maybe a new category
            _add(by_category, category(key, version), -nbytes)
            _add(by_category, category(key, version + 1), nbytes)
            continue
        delta = -nbytes if action == Action.DESTROY else nbytes
        _add(by_category, category(key, version), delta)
        relative += delta
        times.append(_t)
        lives.append(relative)
        if relative > peak_relative:
            peak_relative = relative
            peak_breakdown = dict(by_category)
    if peak_breakdown is None:
        peak_breakdown = dict(by_category)
    return CpuMeasurement(
        peak_bytes=preexisting + peak_relative,
        peak_bytes_relative=peak_relative,
        preexisting_bytes=preexisting,
        end_bytes_relative=relative,
        breakdown_at_peak={k: v for k, v in peak_breakdown.items() if v},
        result=result,
        phase_peaks_relative=_phase_peaks(ranges, times, lives),
    )
