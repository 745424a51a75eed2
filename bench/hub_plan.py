"""`fitune plan owner/name --gpu G` on a model outside the catalog, as a user runs it: the whole command with
its imports, against the stand-in Hub of the tests (tests/hubserver.py) on 127.0.0.1, serving a config.json
shaped like Qwen2-7B's. The first run starts from an empty Hugging Face cache (the config is fetched); the
second finds it cached and makes no request.

    .venv/bin/python bench/hub_plan.py [--gpu rtx-4090]
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

QWEN2_7B_SHAPE = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", default="rtx-4090")
    args = parser.parse_args()
    hub = FakeHub()
    hub.add("someone/qwen-7b-like", {"config.json": json.dumps(QWEN2_7B_SHAPE).encode()})
    server = start(hub)
    cache = tempfile.mkdtemp()
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": cache, "NO_PROXY": "127.0.0.1"}
    env.pop("HF_HUB_OFFLINE", None)
    command = [
        sys.executable,
        "-m",
        "fitune.cli",
        "plan",
        "someone/qwen-7b-like",
        "--gpu",
        args.gpu,
        "--top",
        "3",
    ]
    for label in ("empty cache", "cached"):
        hub.requests.clear()
        start_time = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start_time
        first = next((line for line in done.stdout.splitlines() if "configurations:" in line), "")
        print(
            f"{label}: exit {done.returncode}, {wall:.1f} s wall, {len(hub.requests)} request(s); {first.strip()}"
        )
        if done.returncode:
            print(done.stdout + done.stderr)
    server.shutdown()


if __name__ == "__main__":
    main()
