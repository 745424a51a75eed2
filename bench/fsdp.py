"""Sharded training (FSDP2) on this CPU: each process's planned peak against its measured peak, tokens/s at
one and two processes for the same global batch, and the per-process plans of Llama-3.1-70B QLoRA.

Part 1 runs SmolLM2-135M's architecture (random weights) with LoRA r16 on all linear layers, bf16, seq 256:
one process with micro-batch 4 x accumulation 2, and two processes (gloo) with micro-batch 4 x accumulation 1,
which take the same global batch of 8 x 256 tokens per step. Each process runs ``fitune.measure`` (the load,
two steps and the save, every CPU allocation profiled) and then times five more training steps on synthetic
batches (data loading left out); its figures are set against ``fitune.plan`` of the same recipe with
``hardware.num_devices`` 1 or 2. Part 2 plans Llama-3.1-70B QLoRA (``examples/llama-3.1-70b-qlora-plan.yaml``)
at 1, 2, 4 and 8 processes and shows what each process holds.

    python bench/fsdp.py --out bench/results/fsdp.md                # both parts
    python bench/fsdp.py --part 2 --out bench/results/fsdp-70b.md   # the 70B plans alone (seconds)
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

HERE = Path(__file__).resolve().parent
TIMED_STEPS = 5


def recipe(ranks: int, kind: str = "lora") -> dict:
    method = {"kind": "full"} if kind == "full" else {"kind": kind, "r": 16, "alpha": 32}
    return {
        "model": {"source": "smollm2-135m-instruct", "dtype": "bf16"},
        "method": method,
        "train": {"seq_len": 256, "batch_size": 4, "grad_accum": 2 // ranks, "precision": "bf16"},
        "hardware": {"device": "cpu", "num_devices": ranks},
    }


def worker(recipes_file: str, out_dir: str) -> None:
    """One process of a launch (or the only one): measure, then time steps, for each recipe."""
    import torch

    import fitune
    from fitune.data.batching import synthetic_batch
    from fitune.distributed import world
    from fitune.recipe import Recipe
    from fitune.session import build_session
    from fitune.step import train_step

    here = world.start(torch.device("cpu"))
    results = {}
    for name, body in json.loads(Path(recipes_file).read_text()).items():
        r = Recipe.from_dict(body)
        m = fitune.measure(r)
        session = build_session(r, device="cpu", with_tokenizer=False)
        vocab, t = session.causal_lm.config.vocab_size, r.train
        times = []
        for _ in range(TIMED_STEPS + 1):
            group = [synthetic_batch(t.batch_size, t.seq_len, vocab) for _ in range(t.grad_accum)]
            world.barrier()
            start = time.perf_counter()
            train_step(session, group)
            times.append(time.perf_counter() - start)
        tokens = t.batch_size * t.seq_len * t.grad_accum * here.size  # the global batch
        step = sorted(times[1:])[len(times[1:]) // 2]  # the median after the first
        results[name] = {
            "phases": m.phases,
            "peak": m.peak_bytes,
            "step_s": step,
            "tokens_per_s": tokens / step,
        }
        del session
    Path(out_dir, f"rank-{here.rank}.json").write_text(json.dumps(results))
    world.finish()


def measured(ranks: int, recipes: dict, tmp: Path) -> list[dict]:
    (tmp / "recipes.json").write_text(json.dumps(recipes))
    args = [str(HERE / "fsdp.py"), "--worker", str(tmp / "recipes.json"), str(tmp)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(ranks),
            *args,
        ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return [json.loads((tmp / f"rank-{r}.json").read_text()) for r in range(ranks)]


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    import fitune
    from fitune.recipe import Recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--kinds", default="lora")
    ap.add_argument("--part", choices=("1", "2", "all"), default="all")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    lines: list[str] = []
    rows = []
    if args.part != "2":
        lines += [
            "| method | processes | rank | phase | planned MiB | measured MiB | error | tokens/s (global) |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for ranks in (1, 2) if args.part != "2" else ():
        recipes = {k: recipe(ranks, k) for k in kinds}
        with tempfile.TemporaryDirectory() as tmp:
            per_rank = measured(ranks, recipes, Path(tmp))
        for kind in kinds:
            planned = fitune.plan(Recipe.from_dict(recipes[kind]))
            for rank, m in enumerate(per_rank):
                got = m[kind]
                for phase in ("first_step", "steady_step"):
                    p, g = planned.phases[phase], got["phases"][phase]
                    rows.append(
                        {
                            "kind": kind,
                            "ranks": ranks,
                            "rank": rank,
                            "phase": phase,
                            "planned": p,
                            "measured": g,
                        }
                    )
                    lines.append(
                        f"| {kind} | {ranks} | {rank} | {phase} | {mib(p)} | {mib(g)} | {100 * (p - g) / g:+.2f}% "
                        f"| {got['tokens_per_s']:,.0f} |"
                    )
    if args.part == "1":
        finish(lines, rows, args.out)
        return
    lines += [
        *([""] if lines else []),
        "| Llama-3.1-70B QLoRA | processes | peak GiB | in | load GiB | steady step GiB "
        "| frozen weights per process GiB | quant state per process MiB | plan s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = Recipe.from_yaml(HERE.parent / "examples" / "llama-3.1-70b-qlora-plan.yaml")
    for ranks in (1, 2, 4, 8):
        start = time.perf_counter()
        p = fitune.plan(base.updated({"hardware.num_devices": ranks}))
        took = time.perf_counter() - start
        steady = p.phase_breakdowns["steady_step"]
        lines.append(
            f"| | {ranks} | {p.peak_bytes / 2**30:.2f} | {p.peak_phase} | {p.phases['load'] / 2**30:.2f} | "
            f"{p.phases['steady_step'] / 2**30:.2f} | {steady.get('frozen_weights', 0) / 2**30:.2f} | "
            f"{mib(steady.get('quant_state', 0))} | {took:.1f} |"
        )
    finish(lines, rows, args.out)


def finish(lines: list[str], rows: list[dict], out: Path | None) -> None:
    text = "\n".join(lines)
    print(text)
    if out:
        out.write_text(text + "\n")
        if rows:
            out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
