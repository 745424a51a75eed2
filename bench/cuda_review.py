"""CUDA review (BENCHMARKS.md section 7): fitune's CUDA plans beside published max_memory_allocated figures.

    .venv/bin/python bench/cuda_review.py              # the litgpt comparison
    .venv/bin/python bench/cuda_review.py --autocast   # listed fp32-autocast ops with 16-bit inputs in a step

No GPU is used: the published figures are the measurements. Each plan takes the published run's model, method,
rank, targets, sequence length and micro-batch with fitune's settings closest to it (bf16, lean activations
off, the plain loss), and is made with and without the CUDA flash backward's workspace
(``CudaModel.kernel_scratch``) to show what that model changes.
"""

from __future__ import annotations

import argparse
import sys

LITGPT = "https://github.com/Lightning-AI/litgpt/blob/main/tutorials/resource-tables.md"
# name -> (method, train, GPU, model, published bytes (litgpt prints GB = 1e9 bytes))
QV = {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}  # litgpt's LoRA: r=8 on query and value
# name -> (method kind, micro-batch, published bytes: litgpt prints GB = 1e9 bytes); all Llama 2 7B, 1,304 tokens
# (the longest Alpaca sample), on an A100-SXM4-40GB
PUBLISHED = {
    "Llama 2 7B LoRA r8 q+v, 1304 tokens, micro-batch 1 (21.30 GB)": ("lora", 1, 21.30e9),
    "Llama 2 7B LoRA r8 q+v, 1304 tokens, micro-batch 2 (29.07 GB)": ("lora", 2, 29.07e9),
    "Llama 2 7B QLoRA nf4 r8 q+v, 1304 tokens, micro-batch 1 (14.14 GB)": ("qlora", 1, 14.14e9),
}
# CUDA autocast's fp32 lists (aten/src/ATen/autocast_mode.h, AT_FORALL_FP32 and AT_FORALL_FP32_SET_OPT_DTYPE),
# as the aten op names a dispatch-level trace sees
CUDA_FP32 = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "group_norm", "native_group_norm",
    "nll_loss", "nll_loss_forward", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "logsumexp",
    "binary_cross_entropy_with_logits", "cdist", "dist", "renorm", "prod", "softmax", "_softmax", "log_softmax",
    "_log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "norm", "sum",
}  # fmt: skip


def litgpt() -> None:
    import fitune
    from fitune.memory.devices import CudaModel
    from fitune.recipe import Recipe

    modelled = CudaModel.kernel_scratch
    print(f"published: {LITGPT}")
    for name, (kind, batch, published) in PUBLISHED.items():
        r = Recipe.from_dict(
            {
                "model": {"source": "llama-2-7b-chat", "dtype": "bf16"},
                "method": {"kind": kind, **QV},
                "train": {
                    "seq_len": 1304,
                    "batch_size": batch,
                    "precision": "bf16",
                    "lean_activations": False,
                    "loss_chunk": 0,
                },
                "hardware": {"device": "a100-40gb"},
            }
        )
        CudaModel.kernel_scratch = lambda self, func, args, kwargs: 0
        try:
            without = fitune.plan(r)
        finally:
            CudaModel.kernel_scratch = modelled
        with_scratch = fitune.plan(r)
        print(
            f"{name}: published {published / 2**30:.2f} GiB; plan {with_scratch.peak_bytes / 2**30:.2f} GiB "
            f"({100 * (with_scratch.peak_bytes / published - 1):+.1f}%), without the flash workspace "
            f"{without.peak_bytes / 2**30:.2f} GiB; peak at {with_scratch.peak_op} ({with_scratch.peak_stage})",
            flush=True,
        )


def autocast() -> None:
    """Forward ops of a bf16 LoRA step (fitune's own session and step on fake tensors, for a GPU) whose name is
    on CUDA's fp32 autocast lists, and those of them with a 16-bit floating input (where CUDA would compute in
    fp32 while the CPU-side trace keeps 16 bits)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import fitune.step as step
    from fitune.memory.simulate import simulate
    from fitune.recipe import Recipe

    listed: dict[str, int] = {}
    half: dict[str, int] = {}

    class Flag(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if name in CUDA_FP32 and torch._C._current_graph_task_id() == -1:  # forward only
                listed[str(func)] = listed.get(str(func), 0) + 1
                if any(
                    isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) for a in args
                ):
                    half[str(func)] = half.get(str(func), 0) + 1
            return func(*args, **(kwargs or {}))

    original = step.micro_batch_loss

    def flagged(*args, **kwargs):
        with Flag():
            return original(*args, **kwargs)

    config = {
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000,
    }  # fmt: skip
    step.micro_batch_loss = flagged
    try:
        for lean, chunk in ((False, 0), (True, "auto")):
            listed.clear()
            half.clear()
            r = Recipe.from_dict(
                {
                    "model": {"config": config, "dtype": "bf16"},
                    "method": {"kind": "lora"},
                    "train": {
                        "seq_len": 64,
                        "batch_size": 2,
                        "precision": "bf16",
                        "lean_activations": lean,
                        "loss_chunk": chunk,
                    },
                    "hardware": {"device": "rtx-4090"},
                }
            )
            simulate(r, host_is_device=False)
            print(
                f"lean_activations {lean}, loss_chunk {chunk}: listed ops {listed}; with a 16-bit input: {half}"
            )
    finally:
        step.micro_batch_loss = original


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--autocast", action="store_true", help="list the ops CUDA autocast would upcast")
    args = parser.parse_args()
    from fitune.libraries import prepare_libraries

    prepare_libraries()
    autocast() if args.autocast else litgpt()
    return 0


if __name__ == "__main__":
    sys.exit(main())
