"""The preflight's data check: the dataset read once, line by line, as training reads it, before any weight.

Lines are read through ``read_examples``, as ``load_dataset`` reads them, so the doctor and training cannot
disagree about a line. One line is in memory at a time, plus one token count per example (4 bytes), so a
file of any size is read in constant memory.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fitune.data.dataset import DataFiles, Lengths, data_files, read_examples
from fitune.errors import DataError, FituneError
from fitune.progress import byte_bar

MAX_LISTED = 20  # bad lines named one by one; the rest are counted
PROGRESS_FROM_BYTES = 4 * 2**20  # a progress bar for files from this size on (on a terminal)


@dataclass
class DataScan:
    files: DataFiles
    format: str | None = None
    examples: int = 0  # rows that pass the row checks
    bad_lines: list[str] = field(default_factory=list)  # the first MAX_LISTED, "file:line: problem"
    bad_count: int = 0
    fatal: str | None = None  # a problem with the whole file (missing, empty, unknown format, no template)
    lengths: Lengths | None = None  # with a tokenizer only
    # a recipe change that fixes every bad line (data.format naming another format), with its fix text
    common_fix: tuple[dict, str] | None = None


def scan_dataset(
    files: Path | DataFiles,
    fmt: str | None,
    seq_len: int,
    tokenizer=None,
    progress: Callable[[int], None] | None = None,
) -> DataScan:
    """Check every line of ``files``; with a tokenizer, measure token lengths against ``seq_len`` too.

    Problems are collected, never raised. ``progress`` is called with the bytes read so far.
    """
    files = DataFiles.of(files)
    scan = DataScan(files, lengths=Lengths(seq_len) if tokenizer is not None else None)
    try:
        for scan.format, result in read_examples(files, fmt, tokenizer, progress):
            if isinstance(result, DataError):
                scan.bad_count += 1
                if len(scan.bad_lines) < MAX_LISTED:
                    scan.bad_lines.append(str(result))
                if scan.bad_count == 1 and result.change:
                    scan.common_fix = result.change, str(result).partition("; fix: ")[2]
                elif scan.common_fix and result.change != scan.common_fix[0]:
                    scan.common_fix = None
                continue
            scan.examples += 1
            if result is not None:
                scan.lengths.keep(result)
    except DataError as exc:
        scan.fatal = str(exc)
    return scan


def _round_up(n: int, step: int = 64) -> int:
    return max(step, math.ceil(n / step) * step)


def length_advice(lengths: Lengths) -> tuple[str, str, str] | None:
    """(severity, message, fix) on how ``train.seq_len`` fits the token lengths; None without lengths."""
    if not lengths.tokens:
        return None
    n, seq_len = len(lengths.tokens), lengths.seq_len
    p95, longest = lengths.quantile(0.95), max(lengths.tokens)
    if lengths.truncated:
        lost = (
            f"; {lengths.no_target} of them lose all their targets and are dropped"
            if lengths.no_target
            else ""
        )
        severity = "warning" if lengths.no_target or lengths.truncated > 0.05 * n else "note"
        message = (
            f"{lengths.summary()}; {lengths.truncated} of {n} ({100 * lengths.truncated / n:.1f}%) are longer "
            f"than train.seq_len {seq_len} and are cut{lost}"
        )
        cover_all = _round_up(longest - 1)
        if p95 - 1 <= seq_len:
            kept = 100 * (n - lengths.truncated) / n
            fix = f"train.seq_len: {cover_all} covers every example; {seq_len} covers {kept:.1f}%"
        elif _round_up(p95 - 1) < cover_all:
            fix = f"train.seq_len: {_round_up(p95 - 1)} covers 95% of the examples and {cover_all} covers all"
        else:
            fix = f"train.seq_len: {cover_all} covers every example"
        fix += " (check the memory with `fitune plan`)"
        return severity, message, fix
    if longest - 1 <= seq_len // 2 and seq_len > 64:
        return (
            "note",
            f"{lengths.summary()}: the longest is far below train.seq_len {seq_len}, which the plan budgets "
            "memory for",
            f"train.seq_len: {_round_up(longest - 1)} still covers every example, with less memory",
        )
    return "note", f"{lengths.summary()}: train.seq_len {seq_len} covers every example", "none needed"


@dataclass(frozen=True)
class Issue:
    """One thing the data check found; the doctor turns it into a Finding."""

    rule_id: str
    severity: str  # error | warning | note
    message: str
    fix_text: str
    change: dict | None = None  # the recipe change that fixes it, where one does


def tokenizer_for(source, source_error: str | None):
    """(the tokenizer of a source resolved without weights, None), or (None, why it cannot be loaded yet)."""
    from fitune.models.tokenizers import load_tokenizer

    if source is None:
        return None, source_error
    if source.kind in ("alias", "hub") and source.weights_dir is None:
        return None, "the model's tokenizer comes with its weights, which are not downloaded yet"
    try:
        return load_tokenizer(source, source.config), None
    except FituneError as exc:
        return None, str(exc).partition("; fix: ")[0]


@contextlib.contextmanager
def byte_progress(
    files: Path | DataFiles, verb: str, show: bool = True
) -> Iterator[Callable[[int], None] | None]:
    """A progress callback over the bytes of ``files``, drawn as a bar on a terminal's stderr for large data;
    None (no bar) for small data, a missing file, or output that is not a terminal."""
    files = DataFiles.of(files)
    size = files.size
    with byte_bar(f"{verb} {files.name}", size if size >= PROGRESS_FROM_BYTES else 0, show=show) as update:
        yield None if update is None else lambda done: update(completed=done)


def check_data(
    recipe,
    *,
    tokenize: bool = True,
    show_progress: bool = True,
    source=None,
    source_error: str | None = None,
) -> tuple[list[Issue], int | None]:
    """What the data check has to say about ``recipe.data``, and the number of usable examples.

    With ``tokenize`` the tokenizer of ``source`` (the model's source resolved without weights; None with
    ``source_error`` saying why it could not be) is loaded to measure token lengths; without it
    (``fitune train``, which tokenizes right after, before loading weights) rows are checked for structure.
    Returns no issues and None when the recipe has no data.
    """
    spec = recipe.data
    if spec is None:
        return [], None
    try:
        files = data_files(recipe, show_progress=show_progress)
    except FituneError as exc:  # a hub dataset that cannot be had: offline, unknown, gated, no such split
        message, _, fix = str(exc).partition("; fix: ")
        change = getattr(exc, "change", None)
        return [Issue("data-unreadable", "error", message, fix or "check data.hub", change)], None
    tokenizer, why_untokenized = None, None
    if tokenize and all(path.is_file() for path in files.paths):
        tokenizer, why_untokenized = tokenizer_for(source, source_error)
    with byte_progress(files, "checking", show_progress) as progress:
        scan = scan_dataset(files, spec.format, recipe.train.seq_len, tokenizer, progress)
    if scan.fatal is not None:
        message, _, fix = scan.fatal.partition("; fix: ")
        return [Issue("data-unreadable", "error", message, fix or "check data.path and data.format")], None
    issues = []
    skip = spec.on_bad_line == "skip"
    if scan.bad_count:
        more = scan.bad_count - len(scan.bad_lines)
        listed = "".join(f"\n    {line.partition('; fix: ')[0]}" for line in scan.bad_lines)
        issues.append(
            Issue(
                "data-bad-lines",
                "warning" if skip else "error",
                f"{scan.bad_count} bad line(s) in {files.name}"
                + (" (skipped: data.on_bad_line is skip)" if skip else "")
                + f":{listed}"
                + (f"\n    ... and {more} more" if more else ""),
                scan.common_fix[1]
                if scan.common_fix
                else "repair or remove those lines"
                + ("" if skip else ", or set data.on_bad_line: skip to drop them"),
                scan.common_fix[0] if scan.common_fix else None,
            )
        )
    if scan.examples == 0:
        issues.append(
            Issue(
                "data-no-examples",
                "error",
                f"{files.label} has no usable example",
                "repair the lines listed above",
            )
        )
        return issues, 0
    if why_untokenized is not None:
        issues.append(
            Issue(
                "data-lengths-unknown",
                "note",
                f"{scan.examples} {scan.format} examples checked; their token lengths are not measured: "
                f"{why_untokenized}",
                "none needed; `fitune train` reports truncation once the tokenizer is loaded",
            )
        )
        return issues, scan.examples
    if scan.lengths is None:
        return issues, scan.examples
    advice = length_advice(scan.lengths)
    if advice is not None:
        severity, message, fix = advice
        issues.append(Issue("data-token-lengths", severity, f"{scan.format} data, {message}", fix))
    if scan.lengths.no_target >= scan.examples:
        issues.append(
            Issue(
                "data-no-targets",
                "error",
                f"every example of {files.name} loses all its targets within train.seq_len {recipe.train.seq_len}",
                "raise train.seq_len (see the token lengths above)",
            )
        )
    return issues, scan.examples - scan.lengths.no_target
