"""Memory: what a run holds, traced on fake tensors, measured, and said in bytes a person reads."""

from __future__ import annotations


def human_bytes(n: int | float) -> str:
    """Bytes for a person: GiB from 1 GiB up, MiB below (a small model's figures would all read 0.00 GiB)."""
    return f"{n / 2**30:,.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:,.1f} MiB"
