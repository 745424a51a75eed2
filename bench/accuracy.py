"""Planner accuracy on this CPU: ``fitune.plan``'s peak vs the peak of the whole ``fitune.train`` call.

Each case is a real run: load, three training steps, the eval loss before, at step 2 and after, sample
answers before and after, a checkpoint at step 2 and the final save, all inside one torch.profiler window
(``measure_cpu_allocations``: every CPU allocation and free), against the plan of the same recipe. The data
rows are longer than ``seq_len``, so every micro-batch is full length, as the plan assumes.

Matrix: three architectures (Llama-style with tied embeddings, Qwen2-style with q/k/v bias, Phi-3-style with
fused projections) x full / LoRA / QLoRA x three settings x two sequence lengths x two micro-batch sizes:

- ``fp32-plain``: fp32 weights and compute, the plain cross-entropy, no checkpointing;
- ``bf16-fused``: the recommended settings: bf16, the fused chunked loss (``loss_chunk: auto``), lean
  activations with ``recompute_mlp``;
- ``bf16-fused-ckpt``: the same with gradient checkpointing.

Plus a held-out set of architectures, sizes and shapes the matrix never uses. Writes a Markdown table (and
a JSON file) with predicted, measured and error per case, and the phase that set each peak.

    python bench/accuracy.py --out bench/results/accuracy.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ARCHS = {
    "llama-tied": {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 8192,
        "tie_word_embeddings": True,
    },
    "qwen2-bias": {
        "model_type": "qwen2",
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 12288,
        "tie_word_embeddings": False,
    },
    "phi3-fused": {
        "model_type": "phi3",
        "hidden_size": 256,
        "intermediate_size": 640,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 8064,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
    },
}

# never used to tune anything: other families, widths, depths, shapes
HELD_OUT = [
    (
        "mistral-6L",
        {
            "model_type": "mistral",
            "hidden_size": 320,
            "intermediate_size": 896,
            "num_hidden_layers": 6,
            "num_attention_heads": 5,
            "num_key_value_heads": 1,
            "vocab_size": 10000,
            "tie_word_embeddings": False,
        },
        "lora",
        "bf16-fused-ckpt",
        200,
        3,
    ),
    (
        "qwen3-qknorm",
        {
            "model_type": "qwen3",
            "hidden_size": 192,
            "intermediate_size": 512,
            "num_hidden_layers": 5,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "vocab_size": 15000,
            "tie_word_embeddings": True,
        },
        "qlora",
        "bf16-fused",
        160,
        2,
    ),
    (
        "llama-wide",
        {
            "model_type": "llama",
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 3,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "vocab_size": 6000,
            "tie_word_embeddings": False,
        },
        "full",
        "fp32-plain",
        96,
        3,
    ),
    (
        "qwen2-deep",
        {
            "model_type": "qwen2",
            "hidden_size": 128,
            "intermediate_size": 352,
            "num_hidden_layers": 10,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 20000,
            "tie_word_embeddings": True,
        },
        "lora",
        "bf16-fused",
        300,
        1,
    ),
]


SETTINGS = {
    "fp32-plain": {
        "dtype": "fp32",
        "precision": "fp32",
        "loss_chunk": 0,
        "ckpt": False,
        "recompute_mlp": False,
    },
    "bf16-fused": {
        "dtype": "bf16",
        "precision": "bf16",
        "loss_chunk": "auto",
        "ckpt": False,
        "recompute_mlp": True,
    },
    "bf16-fused-ckpt": {
        "dtype": "bf16",
        "precision": "bf16",
        "loss_chunk": "auto",
        "ckpt": True,
        "recompute_mlp": True,
    },
}
PROMPTS = ["What is the capital of France?", "Write one word."]


def _data(folder: Path, seq: int) -> Path:
    """Text rows longer than ``seq`` tokens with the byte tokenizer (so every batch is full length)."""
    path = folder / "data.jsonl"
    with open(path, "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": " ".join(f"r{i}w{j}" for j in range(seq // 3))}) + "\n")
    return path


def recipe_for(config: dict, kind: str, setting: str, seq: int, batch: int, folder: Path):
    from fitune.recipe import Recipe

    s = SETTINGS[setting]
    return Recipe.from_dict(
        {
            "model": {"config": config, "dtype": s["dtype"]},
            "method": {"kind": kind, "r": 8},
            "data": {"path": str(_data(folder, seq)), "eval_fraction": 0.2},
            "train": {
                "seq_len": seq,
                "batch_size": batch,
                "precision": s["precision"],
                "loss_chunk": s["loss_chunk"],
                "gradient_checkpointing": s["ckpt"],
                "recompute_mlp": s["recompute_mlp"],
                "max_steps": 3,
                "eval_every": 2,
            },
            "samples": {"prompts": PROMPTS, "max_new_tokens": 8},
            "output": {"dir": str(folder / "run"), "save_every": 2},
            "hardware": {"device": "cpu"},
        }
    )


def run_case(name: str, config: dict, kind: str, setting: str, seq: int, batch: int) -> dict:
    import fitune
    from fitune.memory.measure_cpu import measure_cpu_allocations

    with tempfile.TemporaryDirectory(prefix="fitune-accuracy-") as tmp:
        r = recipe_for(config, kind, setting, seq, batch, Path(tmp))
        t0 = time.perf_counter()
        p = fitune.plan(r)
        t1 = time.perf_counter()
        m = measure_cpu_allocations(lambda: fitune.train(r, progress=False, echo=lambda *a: None))
    return {
        "arch": name,
        "method": kind,
        "setting": setting,
        "seq_len": seq,
        "batch": batch,
        "predicted": p.peak_bytes,
        "measured": m.peak_bytes_relative,
        "error": p.peak_bytes / m.peak_bytes_relative - 1,
        "predicted_phase": p.peak_phase,
        "predicted_phases": p.phases,
        "plan_seconds": t1 - t0,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| arch | method | settings | seq | batch | predicted (MiB) | measured (MiB) | error | peak phase (plan) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['method']} | {r['setting']} | {r['seq_len']} | {r['batch']} | "
            f"{r['predicted'] / 2**20:.2f} | {r['measured'] / 2**20:.2f} | {100 * r['error']:+.2f}% | "
            f"{r['predicted_phase']} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    errs = [abs(r["error"]) for r in rows]
    return (
        f"{len(rows)} cases: median |error| {100 * statistics.median(errs):.2f}%, "
        f"max |error| {100 * max(errs):.2f}%"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/accuracy.md")
    ap.add_argument("--quick", action="store_true", help="one architecture, one shape (a smoke run)")
    args = ap.parse_args()
    from fitune.libraries import prepare_libraries

    prepare_libraries()
    archs = dict(list(ARCHS.items())[:1]) if args.quick else ARCHS
    grid = list(itertools.product(archs.items(), ("full", "lora", "qlora"), SETTINGS, (128, 256), (1, 4)))
    if args.quick:
        grid = grid[:3]
    rows = []
    start = time.perf_counter()
    for i, ((name, cfg), kind, setting, seq, batch) in enumerate(grid, 1):
        rows.append(run_case(name, cfg, kind, setting, seq, batch))
        r = rows[-1]
        print(
            f"[{i}/{len(grid)}] {name} {kind} {setting} seq={seq} batch={batch}: {100 * r['error']:+.2f}% "
            f"(peak in {r['predicted_phase']})",
            file=sys.stderr,
            flush=True,
        )
    held = [] if args.quick else [run_case(*case) for case in HELD_OUT]
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = [
        "## Planner accuracy on CPU (the whole fitune.train call: predicted vs measured by torch.profiler)",
        "",
        f"Command: `python bench/accuracy.py --out {args.out}` ({elapsed:.0f} s on this machine).",
        "",
        f"Matrix: {summary(rows)}.",
        "",
        table(rows),
        "",
    ]
    if held:
        text += [
            f"Held-out architectures and shapes (never used while building the planner): {summary(held)}.",
            "",
            table(held),
            "",
        ]
    out.write_text("\n".join(text))
    out.with_suffix(".json").write_text(json.dumps({"matrix": rows, "held_out": held}, indent=2))
    print("\n".join(text))


if __name__ == "__main__":
    main()
