"""Predicted training throughput of a configuration on a GPU: tokens per second from FLOPs and bytes.

This is a model with stated assumptions, not a measurement; the search uses it to rank configurations that
fit. Per micro-batch of ``n = batch_size * seq_len`` tokens:

- matmul FLOPs: forward ``2 * P`` per token for the ``P`` weights every token multiplies (decoder linears and
  the output head; an embedding lookup has none), plus LoRA's ``2 * P_lora``. Backward: ``2 * P`` more for the
  input gradients of every weight, frozen or not, and ``2 * P_trained`` for the weight gradients of what
  trains (all of ``P`` for a full fine-tune, ``P_lora`` for adapters). Gradient checkpointing recomputes the
  decoder layers' forward once more. The chunked loss costs nothing extra: with the plain linear head the
  search plans (adapters never target it), its gradients are computed in the forward pass
  (``fitune.techniques.lean.linear_cross_entropy``).
- attention FLOPs: ``QK^T`` and ``AV`` cost ``4 * T * head_dim`` per token, head and layer, halved by the
  causal mask; the fused kernels' backward costs 2.5x their forward (5 matmuls against 2, Dao 2023,
  FlashAttention-2, section 3.1); recomputation adds one forward.
- time: FLOPs at ``MFU`` of the GPU's dense tensor-core peak for the compute dtype, and never less than the
  time to stream the weights once per pass at ``BANDWIDTH_EFFICIENCY`` of the memory bandwidth.
- QLoRA: every pass over a 4-bit weight first dequantizes it, reading 0.5 and writing 2 bytes per weight,
  bandwidth-bound (bitsandbytes' dequantize kernel), added to the pass.
- optimizer step, once per ``grad_accum`` micro-batches: bytes moved per trained parameter
  (``OPTIMIZER_BYTES``) at the same bandwidth.
- sharded over ``ranks`` GPUs (FSDP2): each GPU runs its own micro-batches as above and updates its
  ``1/ranks`` of the trained weights. Every micro-batch all-gathers every weight twice, in its stored dtype
  (forward, and backward, recomputation included: fitune frees a layer's gathered weights after each), and
  reduce-scatters the fp32 gradients of what trains; in a ring each GPU sends and receives
  ``(ranks - 1) / ranks`` of those bytes over its link at ``LINK_EFFICIENCY`` of the rate in one direction.
  FSDP2 issues the next group's gather while the current group computes, so a micro-batch takes the longer of
  its compute and its communication. Tokens per second count every GPU's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

MFU = 0.4  # assumed share of dense peak FLOPs that training matmuls reach (typical 0.3-0.5 on one GPU)
BANDWIDTH_EFFICIENCY = 0.7  # assumed share of peak memory bandwidth that streaming kernels reach
ATTENTION_BACKWARD_FACTOR = 2.5  # FlashAttention-2 paper, section 3.1: backward/forward FLOPs
NF4_DEQUANT_BYTES = 2.5  # read 4-bit (0.5 B) and write the 16-bit weight (2 B), per weight and pass
# Per trained parameter and optimizer step: fp32 param, grad, two moments read (16 B), param and moments
# written (12 B), the gradient read once more for clipping (4 B); 8-bit moments are 1 B each.
LINK_EFFICIENCY = 0.6  # assumed share of a link's one-way rate that NCCL's ring collectives reach
OPTIMIZER_BYTES = {"adamw": 32, "adamw8bit": 20, "paged_adamw8bit": 20, "sgd": 24}

ASSUMPTIONS = (
    f"MFU {MFU:g} of the dense bf16/fp16 tensor-core peak; {BANDWIDTH_EFFICIENCY:g} of peak memory "
    f"bandwidth; attention backward {ATTENTION_BACKWARD_FACTOR:g}x forward; NF4 dequantization "
    f"{NF4_DEQUANT_BYTES:g} B per weight per pass; optimizer bytes per trained parameter "
    + ", ".join(f"{k} {v}" for k, v in OPTIMIZER_BYTES.items())
)
SHARDED_ASSUMPTIONS = (
    f"several GPUs: every weight all-gathered twice per micro-batch in its stored dtype and the fp32 "
    f"gradients reduce-scattered, at {LINK_EFFICIENCY:g} of the link's one-way rate, overlapped with compute "
    "(a micro-batch takes the longer of the two); GPUs without peer-to-peer (GeForce) may reach less"
)


@dataclass(frozen=True)
class ModelShape:
    """What the throughput model needs of an architecture."""

    num_layers: int
    layer_linears: tuple[tuple[str, int, int], ...]  # (module name, in, out) of one decoder layer
    head: tuple[int, int]  # output head (hidden, vocab)
    attention_width: int  # num_attention_heads * head_dim
    total_weights: int  # every parameter of the model (embeddings, norms, head once when tied)

    @property
    def layer_weights(self) -> int:
        return self.num_layers * sum(i * o for _, i, o in self.layer_linears)

    @property
    def head_weights(self) -> int:
        return self.head[0] * self.head[1]

    def adapted(self, targets: str | list[str]) -> list[tuple[str, int, int]]:
        """The decoder linears LoRA adapts (``all-linear``: every one)."""
        return [x for x in self.layer_linears if targets == "all-linear" or x[0].split(".")[-1] in targets]

    def lora_weights(self, r: int, targets: str | list[str]) -> int:
        """Adapter weights: ``r * (in + out)`` per adapted linear."""
        return self.num_layers * sum(r * (i + o) for _, i, o in self.adapted(targets))


def model_shape(config) -> ModelShape:
    """Read the decoder's linear layers from the architecture built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fitune.memory.simulate import with_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(with_layers(config, 1))
    layer, head = [], None
    one_layer = sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in f".{n}")
    total = sum(p.numel() for p in model.parameters()) + (config.num_hidden_layers - 1) * one_layer
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name.endswith("lm_head") or module is model.get_output_embeddings():
                head = (module.in_features, module.out_features)
            else:
                layer.append((name, module.in_features, module.out_features))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        layer_linears=tuple(layer),
        head=head or (config.hidden_size, config.vocab_size),
        attention_width=heads * head_dim,
        total_weights=total,
    )


@dataclass(frozen=True)
class Speed:
    tokens_per_s: float | None  # None when the target's throughput is unknown
    flops_per_token: float  # training FLOPs (forward, backward, recomputation) per token
    step_seconds: float | None
    communication_s: float | None = None  # per micro-batch, when sharded over several GPUs


def estimate(
    shape: ModelShape,
    *,
    kind: str,
    r: int,
    targets: str | list[str],
    seq_len: int,
    batch_size: int,
    grad_accum: int,
    checkpointing: bool,
    optimizer: str,
    tflops: float | None,
    bandwidth_gbps: float | None,
    ranks: int = 1,
    link_gbps: float | None = None,
    stored_bytes: int = 0,
) -> Speed:
    """Tokens per second of one configuration on ``ranks`` GPUs of ``tflops`` (dense, compute dtype) and
    bandwidth, linked at ``link_gbps`` each way; ``stored_bytes``: every weight in its stored dtype."""
    layers, head = shape.layer_weights, shape.head_weights
    lora = shape.lora_weights(r, targets) if kind != "full" else 0
    trained = layers + head if kind == "full" else lora
    attention = 2 * seq_len * shape.attention_width * shape.num_layers  # causal QK^T + AV, per token
    forward = 2 * (layers + head + lora) + attention
    backward = 2 * (layers + head + lora) + 2 * trained + ATTENTION_BACKWARD_FACTOR * attention
    recompute = 2 * (layers + lora) + attention if checkpointing else 0
    flops = forward + backward + recompute
    if not tflops or not bandwidth_gbps:
        return Speed(None, flops, None)
    bandwidth = bandwidth_gbps * 1e9 * BANDWIDTH_EFFICIENCY
    tokens = batch_size * seq_len
    passes = 3 if checkpointing else 2  # forward, backward (+ recomputation) each read every weight
    weight_bytes = 2 * (layers + head)  # 16-bit compute copies
    micro = max(flops * tokens / (tflops * 1e12 * MFU), passes * weight_bytes / bandwidth)
    if kind == "qlora":
        micro += passes * layers * NF4_DEQUANT_BYTES / bandwidth
    communication = None
    if ranks > 1:
        if not link_gbps:
            return Speed(None, flops, None)
        moved = (ranks - 1) / ranks * (2 * stored_bytes + 4 * trained)
        communication = moved / (link_gbps * 1e9 * LINK_EFFICIENCY)
        micro = max(micro, communication)
    step = grad_accum * micro + trained / ranks * OPTIMIZER_BYTES.get(optimizer, 32) / bandwidth
    return Speed(ranks * grad_accum * tokens / step, flops, step, communication)
