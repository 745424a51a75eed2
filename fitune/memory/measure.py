"""``fitune.measure``: run the load and two real training steps and report the memory they took.

On CUDA the figures come from torch.cuda's memory statistics; on the CPU from torch.profiler's allocation
events (``measure_cpu_allocations``: no Python tracer, so the load is measured at its own speed). The steps
use the same full-length synthetic batches the plan assumes, so the two compare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fitune.memory.simulate import PHASES


@dataclass
class Measurement:
    peak_bytes: int
    phases: dict[str, int]  # load, first_step, steady_step -> peak bytes
    device: str
    reserved: dict[str, int] = field(default_factory=dict)  # CUDA: max_memory_reserved per phase
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def measure(recipe) -> Measurement:
    """Build the session for real (weights loaded when the source has them) and take two steps."""
    import time

    import torch

    from fitune.data.batching import synthetic_batch
    from fitune.session import build_session, resolve_device
    from fitune.step import train_step

    device = resolve_device(recipe.hardware.device)
    t = recipe.train
    start = time.perf_counter()
    holder: dict = {}

    def load():
        holder["session"] = build_session(recipe, device=device, with_tokenizer=False)

    def step():
        session = holder["session"]
        vocab = session.causal_lm.config.vocab_size
        group = [
            synthetic_batch(t.batch_size, t.seq_len, vocab) for _ in range(t.grad_accum)
        ]  # host, as in training
        train_step(session, group)
        del group

    actions = {"load": load, "first_step": step, "steady_step": step}
    if device.type == "cuda":
        phases, reserved = {}, {}
        torch.cuda.reset_peak_memory_stats(device)
        for name in PHASES:
            torch.cuda.reset_peak_memory_stats(device)
            actions[name]()
            torch.cuda.synchronize(device)
            phases[name] = torch.cuda.max_memory_allocated(device)
            reserved[name] = torch.cuda.max_memory_reserved(device)
        return Measurement(max(phases.values()), phases, "cuda", reserved, time.perf_counter() - start)

    from fitune.memory.measure_cpu import measure_cpu_allocations, phase

    def run_all():
        for name in PHASES:
            with phase(name):
                actions[name]()

    m = measure_cpu_allocations(run_all)
    phases = {name: m.phase_peaks_relative.get(name, 0) for name in PHASES}
    return Measurement(m.peak_bytes_relative, phases, "cpu", {}, time.perf_counter() - start)
