"""Generate the small date-normalisation chat dataset used by the fitune demo.

The user gives a short sentence containing a date written in some human way;
the assistant answers with only that date in ISO 8601 form (``YYYY-MM-DD``).

Stdlib only and fully deterministic (``random.Random(seed)``)::

    python examples/make_dates_data.py

writes ``examples/data/dates-train.jsonl`` (400 examples) and
``examples/data/dates-heldout.jsonl`` (20 examples), then reads both files back
and checks every line with an independent parser.
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

PREFIX = "Convert the date to ISO format: "

TRAIN_SEED = 20240315
HELDOUT_SEED = 19991231
N_TRAIN = 400
N_HELDOUT = 20
YEAR_MIN, YEAR_MAX = 1950, 2035
MAX_USER_WORDS = 30

DATA_DIR = Path(__file__).resolve().parent / "data"

# Templates contain no digits and no capitalised month names, so the only date
# in each sentence is the one substituted for {d}.
TEMPLATES = [
    "The team meeting is scheduled for {d}.",
    "My sister's birthday falls on {d}.",
    "The report deadline is {d}.",
    "Invoice payment is due on {d}.",
    "Our flight to Lisbon leaves on {d}.",
    "The contract was signed on {d}.",
    "She started her new job on {d}.",
    "The library book must be returned by {d}.",
    "We got married on {d}.",
    "The concert takes place on {d}.",
    "His passport expires on {d}.",
    "The package was delivered on {d}.",
    "Registration closes on {d}.",
    "The dentist appointment is on {d}.",
    "Grandpa was born on {d}.",
    "The store reopens on {d}.",
    "Please submit the application before {d}.",
    "The apartment lease ends on {d}.",
    "The conference opens in Berlin on {d}.",
    "Our train to Edinburgh departs on {d}.",
    "The warranty is valid until {d}.",
    "They moved into the new house on {d}.",
    "The rent is due on {d}.",
    "The museum exhibition ends on {d}.",
    "I have a job interview on {d}.",
    "On {d}, the bridge was opened to traffic.",
    "The project kickoff happened on {d}.",
    "The tax return must be filed by {d}.",
    "Final exams begin on {d}.",
    "The subscription renews on {d}.",
    "Can you book the hotel for {d}?",
    "The invoice is dated {d}.",
]

MONTHS = list(calendar.month_name)[1:]
MONTH_ABBR = list(calendar.month_abbr)[1:]
WEEKDAYS = list(calendar.day_name)


def ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _month(d: dt.date) -> str:
    return MONTHS[d.month - 1]


def _abbr(d: dt.date) -> str:
    return MONTH_ABBR[d.month - 1]


def _weekday(d: dt.date) -> str:
    return WEEKDAYS[d.weekday()]


# Surface forms. Purely numeric forms are year-first, or day/month/year with
# day > 12 only (see NUMERIC_DMY), so no form is ambiguous.
FORMS: list[Callable[[dt.date], str]] = [
    lambda d: f"{_month(d)} {d.day}, {d.year}",
    lambda d: f"{_month(d)} {ordinal(d.day)}, {d.year}",
    lambda d: f"{_abbr(d)} {d.day} {d.year}",
    lambda d: f"{_abbr(d)} {d.day}, {d.year}",
    lambda d: f"{d.day} {_month(d)} {d.year}",
    lambda d: f"{ordinal(d.day)} of {_month(d)}, {d.year}",
    lambda d: f"the {ordinal(d.day)} of {_month(d)} {d.year}",
    lambda d: f"{d.day} {_abbr(d)} {d.year}",
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
    lambda d: f"{d.year}.{d.month:02d}.{d.day:02d}",
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year}",
    lambda d: f"{_weekday(d)}, {_month(d)} {d.day}, {d.year}",
    lambda d: f"{_weekday(d)} {d.day} {_month(d)} {d.year}",
]
NUMERIC_DMY = 10  # index in FORMS of dd/mm/yyyy: only used with day > 12


def random_date(rng: random.Random, min_day: int = 1) -> dt.date:
    year = rng.randint(YEAR_MIN, YEAR_MAX)
    month = rng.randint(1, 12)
    last = calendar.monthrange(year, month)[1]
    return dt.date(year, month, rng.randint(min_day, last))


def make_example(rng: random.Random) -> tuple[str, str]:
    form_idx = rng.randrange(len(FORMS))
    date = random_date(rng, min_day=13 if form_idx == NUMERIC_DMY else 1)
    date_text = FORMS[form_idx](date)
    template = rng.choice(TEMPLATES)
    sentence = template.format(d=date_text)
    sentence = sentence[0].upper() + sentence[1:]
    return PREFIX + sentence, date.isoformat()


def generate(seed: int, n: int, exclude_users: set[str], exclude_dates: set[str]) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < n:
        user, answer = make_example(rng)
        if user in seen or user in exclude_users or answer in exclude_dates:
            continue
        seen.add(user)
        out.append((user, answer))
    return out


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for user, answer in rows:
            record = {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": answer},
                ]
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------
# Independent check: parse the date back out of each sentence with regexes
# (not with the generator's code) and compare it to the assistant answer.

_MONTH_RE = "|".join(MONTHS + MONTH_ABBR)
_MONTH_NUM = {name: i + 1 for i, name in enumerate(MONTHS)} | {
    name: i + 1 for i, name in enumerate(MONTH_ABBR)
}
_DAY_RE = r"(\d{1,2})(?:st|nd|rd|th)?"
_WEEKDAY_RE = r"(?:\b(" + "|".join(WEEKDAYS) + r"),? )?"
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("mdy", re.compile(_WEEKDAY_RE + r"\b(" + _MONTH_RE + r") " + _DAY_RE + r",? (\d{4})\b")),
    ("dmy", re.compile(_WEEKDAY_RE + r"\b" + _DAY_RE + r"(?: of)? (" + _MONTH_RE + r"),? (\d{4})\b")),
    ("ymd", re.compile(r"\b(\d{4})([/.])(\d{2})\2(\d{2})\b")),
    ("dmy_num", re.compile(r"\b(\d{2})/(\d{2})/(\d{4})\b")),
]
_ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_sentence_date(sentence: str) -> dt.date:
    found: list[dt.date] = []
    for kind, pattern in _PATTERNS:
        for m in pattern.finditer(sentence):
            weekday = None
            if kind == "mdy":
                weekday, mon, day, year = m.groups()
                date = dt.date(int(year), _MONTH_NUM[mon], int(day))
            elif kind == "dmy":
                weekday, day, mon, year = m.groups()
                date = dt.date(int(year), _MONTH_NUM[mon], int(day))
            elif kind == "ymd":
                year, _, mon, day = m.groups()
                date = dt.date(int(year), int(mon), int(day))
            else:
                day, mon, year = m.groups()
                if int(day) <= 12:
                    raise ValueError(f"ambiguous numeric date in {sentence!r}")
                date = dt.date(int(year), int(mon), int(day))
            if weekday is not None and WEEKDAYS[date.weekday()] != weekday:
                raise ValueError(f"wrong weekday in {sentence!r}")
            found.append(date)
    if len(found) != 1:
        raise ValueError(f"expected exactly one date, found {len(found)} in {sentence!r}")
    return found[0]


def check_file(path: Path, expected_n: int) -> list[str]:
    users: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            record = json.loads(line)
            msgs = record["messages"]
            assert list(record) == ["messages"], f"{path}:{lineno}: extra keys"
            assert [m["role"] for m in msgs] == ["user", "assistant"], f"{path}:{lineno}: roles"
            user, answer = msgs[0]["content"], msgs[1]["content"]
            assert user.startswith(PREFIX), f"{path}:{lineno}: missing prefix"
            assert len(user.split()) < MAX_USER_WORDS, f"{path}:{lineno}: too long"
            assert _ISO_RE.match(answer), f"{path}:{lineno}: answer {answer!r} not YYYY-MM-DD"
            date = dt.date.fromisoformat(answer)
            assert YEAR_MIN <= date.year <= YEAR_MAX, f"{path}:{lineno}: year out of range"
            parsed = parse_sentence_date(user[len(PREFIX) :])
            assert parsed == date, f"{path}:{lineno}: sentence says {parsed}, answer {answer}"
            users.append(user)
    assert len(users) == expected_n, f"{path}: {len(users)} lines, expected {expected_n}"
    assert len(set(users)) == len(users), f"{path}: duplicate user messages"
    return users


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args()

    train = generate(TRAIN_SEED, N_TRAIN, set(), set())
    # Held-out: different seed, no sentence and no date that appears in train.
    heldout = generate(HELDOUT_SEED, N_HELDOUT, {u for u, _ in train}, {a for _, a in train})

    train_path = args.out_dir / "dates-train.jsonl"
    heldout_path = args.out_dir / "dates-heldout.jsonl"
    write_jsonl(train_path, train)
    write_jsonl(heldout_path, heldout)

    train_users = check_file(train_path, N_TRAIN)
    heldout_users = check_file(heldout_path, N_HELDOUT)
    assert not set(train_users) & set(heldout_users), "held-out sentence found in train"
    for path in (train_path, heldout_path):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
