"""fitune vs the usual Hugging Face path (transformers Trainer + PEFT, at that path's defaults), on this CPU.

Same model, data (random full-length token rows), sequence length, micro-batch, LoRA rank/alpha/targets,
precision (bf16 autocast over bf16 frozen weights) and number of steps. Each path runs twice for speed and
once under the memory profiler, alternating fitune and HF so that other load on the machine hits both alike.

- peak memory: torch.profiler's CPU allocation events around the whole run, model load included, for both
  paths: the same measurement. It is the event stream ``fitune.memory.measure_cpu.measure_cpu_peak`` builds
  its memory timeline from, summed in time order; the timeline itself also ties each event to a tensor, which
  needs the Python stack tracer and takes minutes per run on these models, so the script checks the two
  agree on a tiny run (``check_peak_measurement``). Both paths build everything inside the run; the
  safetensors file they read is memory-mapped (page cache, not allocator memory), as in
  ``measure_cpu_peak``'s relative peak;
- tokens/s: ``fitune.trainer.events.tokens_per_second`` over the steps after the first (warm-up excluded),
  best of the timed runs;
- for SmolLM2 LoRA, the share of this CPU's measured GEMM throughput that training reaches (model FLOPs:
  forward 2*P, backward 2*P for the activation gradients of a frozen base, attention; recompute not counted).

The HF path: ``AutoModelForCausalLM.from_pretrained``/``from_config`` in bf16, ``get_peft_model`` with the same
LoRA settings, ``Trainer`` with ``TrainingArguments(bf16=True, use_cpu=True)`` and its defaults otherwise
(optimizer, no gradient checkpointing, its loss). For QLoRA, the usual path of the PEFT/bitsandbytes guides:
``BitsAndBytesConfig`` NF4 with double quantization, then ``prepare_model_for_kbit_training`` (its defaults:
fp32 non-quantized weights, reentrant gradient checkpointing).

    FITUNE_CACHE=/tmp/fitune-persist-cache python bench/vs_hf.py --out bench/results/vs_hf.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

SMOLLM2 = {"source": "smollm2-135m-instruct", "dtype": "bf16"}
QWEN_150K = {  # Qwen2-like, small width, Qwen's 151,936-token vocabulary, random weights
    "config": {
        "model_type": "qwen2",
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
    },
    "dtype": "bf16",
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"}


@dataclass
class Config:
    name: str
    model: dict
    kind: str  # lora | qlora
    seq_len: int
    batch: int
    steps: int
    best: dict  # fitune's train.* settings for this config
    variants: dict = field(default_factory=dict)  # other fitune settings, measured for reference


# fitune's best recipes here: lean activations (default), the fused chunked loss, blocked causal attention
# (the CPU default for sdpa), and the MLP's up projection recomputed (SmolLM2 LoRA) or gate and up (QLoRA)
STEPS = 6  # timed: the steps after the first
EVERY_LAYER = {"gradient_checkpointing": True, "loss_chunk": 64}
CONFIGS = [
    Config(
        "SmolLM2-135M LoRA, seq 512",
        SMOLLM2,
        "lora",
        512,
        1,
        STEPS,
        best={"loss_chunk": 64, "recompute_mlp": "up"},
        variants={
            "fitune defaults": {},
            "fitune, fused loss, no recompute": {"loss_chunk": 64},
            "fitune, gate and up recomputed": {"loss_chunk": 64, "recompute_mlp": True},
            "fitune, every layer recomputed": EVERY_LAYER,
        },
    ),
    Config(
        "Qwen-like 150k vocab LoRA, seq 1024",
        QWEN_150K,
        "lora",
        1024,
        1,
        STEPS,
        best={"loss_chunk": "auto"},
        variants={"fitune defaults": {}},
    ),
    Config(
        "SmolLM2-135M QLoRA, seq 512",
        SMOLLM2,
        "qlora",
        512,
        1,
        STEPS,
        best={"loss_chunk": 64, "recompute_mlp": True},
        variants={"fitune, every layer recomputed": EVERY_LAYER},
    ),
]


# --------------------------------------------------------------------------- data


def token_rows(cfg: Config, vocab: int) -> list[torch.Tensor]:
    """Micro-batches of random token ids, each row one token longer than seq_len (inputs + shifted targets)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (cfg.batch, cfg.seq_len + 1), generator=gen) for _ in range(cfg.steps)]


# --------------------------------------------------------------------------- the two paths


def fitune_recipe(cfg: Config, train: dict):
    from fitune.recipe import Recipe

    return Recipe.from_dict(
        {
            "model": dict(cfg.model),
            "method": {"kind": cfg.kind, **LORA},
            "train": {
                "seq_len": cfg.seq_len,
                "batch_size": cfg.batch,
                "max_steps": cfg.steps,
                "lr": 2e-4,
                "precision": "bf16",
                **train,
            },
            "hardware": {"device": "cpu"},
        }
    )


def run_fitune(cfg: Config, train: dict, rows: list[torch.Tensor]) -> list[float]:
    """Build the session and take the steps; returns the time at the end of each step."""
    from fitune.data.batching import Batch
    from fitune.session import build_session
    from fitune.step import train_step

    session = build_session(fitune_recipe(cfg, train), with_tokenizer=False)
    ends = []
    for row in rows:
        train_step(session, [Batch(row[:, :-1], None, row[:, 1:])])
        ends.append(time.perf_counter())
    return ends


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[torch.Tensor]):
        self.items = [r for batch in rows for r in batch]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        # the model shifts labels itself: seq_len inputs, seq_len - 1 targets
        ids = self.items[i][:-1]
        return {"input_ids": ids, "labels": ids.clone()}


def hf_model(cfg: Config):
    from transformers import AutoModelForCausalLM

    from fitune.models import sources
    from fitune.recipe import Recipe

    if "config" in cfg.model:
        src = sources.resolve(Recipe.from_dict({"model": cfg.model}), need_weights=False)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(src.config, dtype=torch.bfloat16)
    src = sources.resolve(Recipe.from_dict({"model": cfg.model}))
    if cfg.kind == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(src.weights_dir), quantization_config=quant, dtype=torch.bfloat16, device_map="cpu"
        )
        return prepare_model_for_kbit_training(model)
    return AutoModelForCausalLM.from_pretrained(str(src.weights_dir), dtype=torch.bfloat16)


def run_hf(cfg: Config, rows: list[torch.Tensor]) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = get_peft_model(
        hf_model(cfg),
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=cfg.batch,
            max_steps=cfg.steps,
            learning_rate=2e-4,
            bf16=True,
            use_cpu=True,
            save_strategy="no",
            report_to=[],
            logging_strategy="no",
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=_Rows(rows), callbacks=[StepEnds()])
        trainer.train()
    return ends


# --------------------------------------------------------------------------- measurements


def tokens_per_s(cfg: Config, ends: list[float]) -> float:
    from fitune.trainer.events import tokens_per_second

    steps = len(ends) - 1  # the first step (warm-up: lazy inits, first allocations) is left out
    return tokens_per_second(steps * cfg.batch * cfg.seq_len, ends[-1] - ends[0])


def peak_bytes(fn) -> int:
    """Peak of CPU allocator bytes allocated while ``fn`` runs, from torch.profiler's allocation events (the
    stream ``measure_cpu_peak`` builds its memory timeline from; see ``check_peak_measurement``)."""
    from fitune.memory.measure_cpu import measure_cpu_allocations

    peak = measure_cpu_allocations(fn).peak_bytes_relative
    gc.collect()
    return peak


def check_peak_measurement() -> tuple[int, int]:
    """``peak_bytes`` against ``measure_cpu_peak`` (the profiler's memory timeline, which ties each event to a
    tensor and needs the Python stack tracer: some 20x slower on these models) on a tiny fitune run."""
    from fitune.data.batching import synthetic_batch
    from fitune.memory.measure_cpu import measure_cpu_peak
    from fitune.recipe import Recipe
    from fitune.session import build_session
    from fitune.step import train_step

    config = {**QWEN_150K["config"], "num_hidden_layers": 2, "vocab_size": 4096}
    recipe = Recipe.from_dict(
        {
            "model": {"config": config},
            "train": {"seq_len": 128, "batch_size": 2},
            "hardware": {"device": "cpu"},
        }
    )

    def fn():
        session = build_session(recipe, with_tokenizer=False)
        for _ in range(2):
            train_step(session, [synthetic_batch(2, 128, 4096)])

    return peak_bytes(fn), measure_cpu_peak(fn).peak_bytes_relative


def gemm_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 6) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def model_flops_per_token(cfg: Config) -> float:
    """Forward + backward FLOPs per token of LoRA training: 2*P forward and 2*P for the activation gradients
    of the frozen linear layers (P = their weights, the output head included), attention's two matmuls
    (causal: half the positions on average) forward and twice that backward; the adapters add 6*r*(in+out)."""
    from fitune.models import sources
    from fitune.recipe import Recipe

    c = sources.resolve(Recipe.from_dict({"model": cfg.model}), need_weights=False).config
    d, layers, inter = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    head_dim = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    linear = layers * (d * q + 2 * d * kv + q * d + 3 * d * inter) + d * c.vocab_size
    adapters = layers * LORA["r"] * ((d + q) + 2 * (d + kv) + (q + d) + 3 * (d + inter))
    attention = layers * 2 * 2 * (cfg.seq_len / 2) * q  # QK^T and AV per token, forward
    return 4 * linear + 6 * adapters + 3 * attention


# --------------------------------------------------------------------------- the run


def bench_config(cfg: Config, timed_rounds: int, log) -> dict:
    from fitune.models import sources

    vocab = sources.resolve(fitune_recipe(cfg, {}), need_weights=False).config.vocab_size
    rows = token_rows(cfg, vocab)
    paths = {
        "HF Trainer + PEFT": lambda: run_hf(cfg, rows),
        "fitune best": lambda: run_fitune(cfg, cfg.best, rows),
    }
    for name, train in cfg.variants.items():
        paths[name] = lambda train=train: run_fitune(cfg, train, rows)
    speeds: dict[str, list[float]] = {name: [] for name in paths}
    peaks: dict[str, int] = {}
    for rnd in range(timed_rounds):
        for name, fn in paths.items() if rnd % 2 == 0 else reversed(paths.items()):
            gc.collect()
            speeds[name].append(tokens_per_s(cfg, fn()))
            log(f"  {name}: {speeds[name][-1]:.0f} tokens/s")
    for name, fn in paths.items():
        peaks[name] = peak_bytes(fn)
        log(f"  {name}: peak {peaks[name] / 2**20:.0f} MiB")
    return {
        "config": cfg.name,
        "seq_len": cfg.seq_len,
        "batch": cfg.batch,
        "steps": cfg.steps,
        "fitune_best": cfg.best,
        "tokens_per_s": {name: max(v) for name, v in speeds.items()},
        "tokens_per_s_runs": speeds,
        "peak_bytes": peaks,
    }


def table(results: list[dict]) -> list[str]:
    lines = [
        "| config | path | peak (MiB) | tokens/s | peak vs HF | tokens/s vs HF | goal (<= 0.5x, >= 1.0x) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        hf = "HF Trainer + PEFT"
        for name, peak in r["peak_bytes"].items():
            mem = peak / r["peak_bytes"][hf]
            speed = r["tokens_per_s"][name] / r["tokens_per_s"][hf]
            goal = "" if name == hf else ("met" if mem <= 0.5 and speed >= 1.0 else "not met")
            lines.append(
                f"| {r['config']} | {name} | {peak / 2**20:.0f} | {r['tokens_per_s'][name]:.0f} | "
                f"{mem:.2f}x | {speed:.2f}x | {goal} |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/vs_hf.md")
    ap.add_argument("--rounds", type=int, default=2, help="timed runs per path (alternating)")
    ap.add_argument("--only", type=int, nargs="*", help="indices of the configs to run (default: all)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fitune.libraries import prepare_libraries

    prepare_libraries()
    import warnings

    warnings.filterwarnings("ignore")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    fast, timeline = check_peak_measurement()
    log(f"peak check on a tiny run: allocation events {fast} B, memory timeline {timeline} B")
    gflops = {"fp32": gemm_gflops(torch.float32), "bf16": gemm_gflops(torch.bfloat16)}
    log(f"GEMM: fp32 {gflops['fp32']:.0f} GFLOP/s, bf16 {gflops['bf16']:.0f} GFLOP/s")
    configs = [CONFIGS[i] for i in args.only] if args.only else CONFIGS
    results = []
    for cfg in configs:
        log(cfg.name)
        results.append(bench_config(cfg, args.rounds, log))
    elapsed = time.perf_counter() - start

    text = [
        "## fitune vs transformers Trainer + PEFT on this CPU",
        "",
        f"Command: `FITUNE_CACHE=/tmp/fitune-persist-cache python bench/vs_hf.py --out {args.out}` "
        f"({elapsed:.0f} s; {torch.get_num_threads()} threads; torch {torch.__version__}).",
        "",
        "Same model, random full-length token rows, sequence length, micro-batch, LoRA r=16 / alpha=32 on all "
        "linear layers, bf16 autocast over bf16 frozen weights, lr 2e-4. Peak: torch.profiler CPU allocation events "
        "over the whole run (load included), CPU allocator bytes, both paths. Tokens/s: steps after the first, best of "
        f"{args.rounds} alternating runs. fitune best settings per config are listed below the table.",
        "",
        *table(results),
        "",
        f"Peak measurement check (tiny run): allocation events {fast:,} B vs measure_cpu_peak's memory "
        f"timeline {timeline:,} B.",
        "",
    ]
    for r in results:
        runs = ", ".join(f"{k}: {[round(x) for x in v]}" for k, v in r["tokens_per_s_runs"].items())
        text.append(
            f"- {r['config']} (micro-batch {r['batch']}, {r['steps']} steps): fitune best = "
            f"`{json.dumps(r['fitune_best'])}`; tokens/s per run: {runs}"
        )
    smol = next((r for r in results if r["config"].startswith("SmolLM2-135M LoRA")), None)
    if smol is not None:
        per_token = model_flops_per_token(CONFIGS[0])
        text += [
            "",
            f"Matmul throughput measured here: fp32 {gflops['fp32']:.0f} GFLOP/s, bf16 "
            f"{gflops['bf16']:.0f} GFLOP/s (2048x2048 GEMM, best of 6). SmolLM2 LoRA training, "
            f"{per_token / 1e6:.0f} MFLOP per token:",
        ]
        for name, tps in smol["tokens_per_s"].items():
            achieved = tps * per_token / 1e9
            text.append(
                f"- {name}: {achieved:.1f} GFLOP/s = {100 * achieved / gflops['bf16']:.0f}% of the bf16 GEMM rate"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"gemm_gflops": gflops, "results": results}, indent=2))
    print("\n".join(text))


if __name__ == "__main__":
    main()
