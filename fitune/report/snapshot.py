"""The plan's timeline as a PyTorch memory snapshot, for https://pytorch.org/memory_viz (drag the file in).

``plan.json`` keeps the steady step of the traced model as live bytes per category, op by op. The snapshot
replays it as allocations and frees in the format ``torch.cuda.memory._dump_snapshot`` writes (the
``device_traces`` a memory-viz "Active Memory Timeline" draws), each block carrying its ``category`` (as
torch's own profiler export does) and, as its stack, the op and the module that made it. A block stands for
the bytes one op added to one category, not for one tensor: the totals per category at every op are the
plan's, the block boundaries are not.
"""

from __future__ import annotations

import pickle
from pathlib import Path

SNAPSHOT = "plan.memory-snapshot.pickle"
_ALIGN = 512  # block addresses on the allocator's alignment, as a real snapshot has them


def _rounded(size: int) -> int:
    """A block's size as the allocator rounds it."""
    return -(-size // _ALIGN) * _ALIGN


def snapshot(plan: dict) -> dict:
    """A memory-viz snapshot (``segments``, ``device_traces``) of the plan's steady-step timeline."""
    timeline = plan.get("timeline") or []
    stacks: dict[str, list[dict]] = {}  # category -> its live blocks, the latest last
    trace: list[dict] = []
    next_addr = 0
    live = {}

    def alloc(category: str, size: int, op: str, module: str, time_us: int) -> None:
        nonlocal next_addr
        block = {
            "action": "alloc",
            "addr": next_addr,
            "size": size,
            "stream": 0,
            "time_us": time_us,
            "category": category,
            "frames": [
                {"filename": module, "line": 0, "name": op},
                {"filename": "fitune plan", "line": 0, "name": f"category: {category}"},
            ],
        }
        next_addr += _rounded(size)
        stacks.setdefault(category, []).append(block)
        trace.append(block)

    def free(block: dict, time_us: int) -> None:
        for action in ("free_requested", "free_completed"):
            trace.append({**block, "action": action, "time_us": time_us})

    for t, row in enumerate(timeline):
        for category, now in row["by_category"].items():
            before = live.get(category, 0)
            if now > before:
                alloc(category, now - before, row["op"], row["module"], t)
            elif now < before:
                drop = before - now
                stack = stacks[category]
                while drop > 0:
                    block = stack.pop()
                    free(block, t)
                    if block["size"] > drop:  # the rest of it lives on
                        alloc(
                            category,
                            block["size"] - drop,
                            block["frames"][0]["name"],
                            block["frames"][0]["filename"],
                            t,
                        )
                        drop = 0
                    else:
                        drop -= block["size"]
            live[category] = now
    blocks = [b for stack in stacks.values() for b in stack]
    segment = {
        "device": 0,
        "address": 0,
        "total_size": next_addr,
        "stream": 0,
        "segment_type": "large",
        "allocated_size": sum(_rounded(b["size"]) for b in blocks),
        "active_size": sum(_rounded(b["size"]) for b in blocks),
        "requested_size": sum(b["size"] for b in blocks),
        "blocks": _blocks(blocks, next_addr),
    }
    return {"segments": [segment], "device_traces": [trace]}


def _blocks(live: list[dict], end: int) -> list[dict]:
    """The segment's blocks at the end of the trace: live ones and the gaps between them."""
    out, at = [], 0
    for b in sorted(live, key=lambda b: b["addr"]):
        if b["addr"] > at:
            out.append({"address": at, "size": b["addr"] - at, "requested_size": 0, "state": "inactive"})
        size = _rounded(b["size"])  # the block as the allocator rounds it, the bytes asked for
        out.append(
            {
                "address": b["addr"],
                "size": size,
                "requested_size": b["size"],
                "state": "active_allocated",
                "frames": b["frames"],
            }
        )
        at = b["addr"] + size
    if at < end:
        out.append({"address": at, "size": end - at, "requested_size": 0, "state": "inactive"})
    return out


def write_snapshot(plan: dict, path: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump(snapshot(plan), f)
    return path
