"""`fitune doctor` on a recipe whose data is on the Hub (`data.hub`), as a user runs it: the whole command with
its imports, against the stand-in Hub of the tests (tests/hubserver.py) on 127.0.0.1. The dataset is laid out
like a Hub chat dataset (a card whose `configs` name the split, Parquet shards): 60,000 short conversations,
the same rows as BENCHMARKS.md §8's local JSONL row. Four runs of the same doctor, SmolLM2-135M's tokenizer:
the rows as a local JSONL file, as a local Parquet file, from the Hub with an empty cache (downloaded), and
from the Hub again (cached: no request). Wall time and peak resident memory from /usr/bin/time.

    .venv/bin/python bench/hub_data.py [--examples 60000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.hubserver import FakeHub, start  # noqa: E402

DATASET = "someone/chat-60k"
CARD = b"""---
configs:
- config_name: default
  data_files:
  - split: train_sft
    path: data/train_sft-*
---
"""


def rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"say {i % 10} please " * 3},
                {"role": "assistant", "content": "ok " * 5},
            ]
        }
        for i in range(n)
    ]


def parquet_bytes(data: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(data), buffer)
    return buffer.getvalue().to_pybytes()


def recipe(folder: Path, name: str, data: dict) -> Path:
    path = folder / f"{name}.yaml"
    body = {
        "model": {"source": "smollm2-135m-instruct"},
        "method": {"kind": "lora"},
        "data": data,
        "train": {"seq_len": 512, "batch_size": 4, "max_steps": 100},
        "output": {"dir": str(folder / f"run-{name}")},
    }
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=60000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    data = rows(args.examples)
    half = len(data) // 2 + 1  # shards of different bytes (the rows repeat every 10)
    jsonl = folder / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in data))
    local_parquet = folder / "chat.parquet"
    local_parquet.write_bytes(parquet_bytes(data))
    hub = FakeHub()
    shards = {
        "README.md": CARD,
        "data/train_sft-00000-of-00002.parquet": parquet_bytes(data[:half]),
        "data/train_sft-00001-of-00002.parquet": parquet_bytes(data[half:]),
    }
    hub.add(DATASET, shards, dataset=True)
    server = start(hub)
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(folder / "hf-cache"),
        "NO_PROXY": "127.0.0.1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    runs = [
        (f"local JSONL ({jsonl.stat().st_size / 1e6:.1f} MB)", recipe(folder, "jsonl", {"path": str(jsonl)})),
        (
            f"local Parquet ({local_parquet.stat().st_size / 1e6:.2f} MB)",
            recipe(folder, "parquet", {"path": str(local_parquet)}),
        ),
        ("data.hub, empty cache", recipe(folder, "hub", {"hub": DATASET, "split": "train_sft"})),
        ("data.hub, cached", folder / "hub.yaml"),
    ]
    for label, path in runs:
        hub.requests.clear()
        command = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "fitune.cli", "doctor", str(path)]
        start_time = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start_time
        peak_kib = int(done.stderr.strip().splitlines()[-1].split()[1])
        lengths = next((line for line in done.stdout.splitlines() if "tokens per example" in line), "")
        print(
            f"{label}: exit {done.returncode}, {wall:.1f} s wall, peak {peak_kib / 2**20:.2f} GiB, "
            f"{len(hub.requests)} request(s); {lengths.strip()[:90]}"
        )
        for method, request in hub.requests:
            print(f"    {method} {request.split('?')[0]}")
        if done.returncode:
            print(done.stdout + done.stderr)
    server.shutdown()


if __name__ == "__main__":
    main()
