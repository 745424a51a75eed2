"""Planner accuracy on this CPU: predicted whole-run peak vs the peak torch.profiler measures.

Matrix: three architectures (Llama-style with tied embeddings, Qwen2-style with q/k/v bias, Phi-3-style with
fused projections) x full / LoRA / QLoRA x gradient checkpointing off/on x two sequence lengths x two batch
sizes, plus a held-out set of architectures, sizes and shapes the matrix never uses. Writes a Markdown
table (and a JSON file) with predicted, measured and error per case.

    python bench/accuracy.py --out bench/results/accuracy.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
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
        True,
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
        False,
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
        False,
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
        False,
        300,
        1,
    ),
]


def recipe_for(config: dict, kind: str, ckpt: bool, seq: int, batch: int):
    from fitune.recipe import Recipe

    return Recipe.from_dict(
        {
            "model": {"config": config, "dtype": "bf16"},
            "method": {"kind": kind, "r": 8},
            "train": {
                "seq_len": seq,
                "batch_size": batch,
                "precision": "bf16",
                "gradient_checkpointing": ckpt,
            },
            "hardware": {"device": "cpu"},
        }
    )


def run_case(name: str, config: dict, kind: str, ckpt: bool, seq: int, batch: int) -> dict:
    import fitune

    r = recipe_for(config, kind, ckpt, seq, batch)
    t0 = time.perf_counter()
    p = fitune.plan(r)
    t1 = time.perf_counter()
    m = fitune.measure(r)
    return {
        "arch": name,
        "method": kind,
        "checkpointing": ckpt,
        "seq_len": seq,
        "batch": batch,
        "predicted": p.peak_bytes,
        "measured": m.peak_bytes,
        "error": p.peak_bytes / m.peak_bytes - 1,
        "predicted_phases": p.phases,
        "measured_phases": m.phases,
        "plan_seconds": t1 - t0,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| arch | method | ckpt | seq | batch | predicted (MiB) | measured (MiB) | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['method']} | {'on' if r['checkpointing'] else 'off'} | {r['seq_len']} | {r['batch']} | "
            f"{r['predicted'] / 2**20:.2f} | {r['measured'] / 2**20:.2f} | {100 * r['error']:+.2f}% |"
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
    grid = list(
        itertools.product(archs.items(), ("full", "lora", "qlora"), (False, True), (128, 256), (1, 4))
    )
    if args.quick:
        grid = grid[:3]
    rows = []
    start = time.perf_counter()
    for i, ((name, cfg), kind, ckpt, seq, batch) in enumerate(grid, 1):
        rows.append(run_case(name, cfg, kind, ckpt, seq, batch))
        r = rows[-1]
        print(
            f"[{i}/{len(grid)}] {name} {kind} ckpt={ckpt} seq={seq} batch={batch}: {100 * r['error']:+.2f}%",
            file=sys.stderr,
            flush=True,
        )
    held = [] if args.quick else [run_case(*case) for case in HELD_OUT]
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = [
        "## Planner accuracy on CPU (whole-run peak, predicted vs measured by torch.profiler)",
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
