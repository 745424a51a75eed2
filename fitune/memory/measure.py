"""``fitune.measure``: run the load, two real training steps and the run's other phases (eval, samples,
checkpoint, save, each through the code the training loop calls) and report the memory they took.

On CUDA the figures come from torch.cuda's memory statistics; on the CPU from torch.profiler's allocation
events (``measure_cpu_allocations``: no Python tracer, so the load is measured at its own speed). The steps
and the eval pass use the same full-length synthetic batches the plan assumes, and the samples the recipe's
longest prompt (the one the plan sizes the phase by), so the two compare. Phases the recipe's run does not
have are left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fitune.memory.simulate import PHASES


@dataclass
class Measurement:
    peak_bytes: int
    phases: dict[str, int]  # load, first_step, steady_step, eval, samples, checkpoint, save -> peak bytes
    device: str
    reserved: dict[str, int] = field(default_factory=dict)  # CUDA: max_memory_reserved per phase
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def measure(recipe) -> Measurement:
    """Build the session for real (weights loaded when the source has them), take two steps, then run the
    recipe's other phases (eval, samples, checkpoint, save) on them, into a temporary folder."""
    import tempfile
    import time
    from pathlib import Path

    from fitune import phases as run_phases
    from fitune.data.batching import synthetic_batch
    from fitune.session import build_session, resolve_device
    from fitune.step import train_step
    from fitune.trainer.checkpoint import save_checkpoint

    device = resolve_device(recipe.hardware.device)
    t = recipe.train
    start = time.perf_counter()
    holder: dict = {}
    folder = Path(tempfile.mkdtemp(prefix="fitune-measure-"))

    def load():
        holder["session"] = build_session(recipe, device=device, with_tokenizer=bool(recipe.samples.prompts))

    def step():
        session = holder["session"]
        vocab = session.causal_lm.config.vocab_size
        group = [
            synthetic_batch(t.batch_size, t.seq_len, vocab) for _ in range(t.grad_accum)
        ]  # host, as in training
        train_step(session, group)
        del group

    def evaluate():
        session = holder["session"]
        vocab = session.causal_lm.config.vocab_size
        run_phases.evaluate(session, [synthetic_batch(t.batch_size, t.seq_len, vocab)])

    actions = {"load": load, "first_step": step, "steady_step": step}
    if recipe.data is not None and recipe.data.eval_fraction > 0:
        actions["eval"] = evaluate
    if recipe.samples.prompts:

        def samples():
            # the longest prompt sets the phase's peak, as the plan sizes it; each answer is a long run of small
            # ops, and the profiler keeps an event for every one (about 0.7 GiB and 5 s per SmolLM2 answer)
            session = holder["session"]
            lengths, _ = run_phases.prompt_lengths(recipe.samples.prompts, session.tokenizer)
            longest = recipe.samples.prompts[lengths.index(max(lengths))]
            run_phases.generate(session, [longest], recipe.samples.max_new_tokens)

        actions["samples"] = samples
    if recipe.output.save_every:
        actions["checkpoint"] = lambda: save_checkpoint(holder["session"], folder, 1)
    actions["save"] = lambda: run_phases.save_result(holder["session"], folder)
    try:
        return _measure(actions, device, start)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def _measure(actions: dict, device, start: float) -> Measurement:
    import time

    import torch

    if device.type == "cuda":
        phases, reserved = {}, {}
        torch.cuda.reset_peak_memory_stats(device)
        for name in actions:
            torch.cuda.reset_peak_memory_stats(device)
            actions[name]()
            torch.cuda.synchronize(device)
            phases[name] = torch.cuda.max_memory_allocated(device)
            reserved[name] = torch.cuda.max_memory_reserved(device)
        return Measurement(max(phases.values()), phases, "cuda", reserved, time.perf_counter() - start)

    from fitune.memory.measure_cpu import measure_cpu_allocations, phase

    def run_all():
        for name in actions:
            with phase(name):
                actions[name]()

    m = measure_cpu_allocations(run_all)
    phases = {name: m.phase_peaks_relative.get(name, 0) for name in PHASES if name in actions}
    return Measurement(m.peak_bytes_relative, phases, "cpu", {}, time.perf_counter() - start)
