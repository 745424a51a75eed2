"""``fitune.plan``: a run's peak memory, phase by phase, predicted by simulation, for any model size.

Deep models are planned from two short fake runs: with ``2p`` and ``3p`` decoder layers (``p`` = the period
of the layer pattern, 1 for most models, 2 for models alternating local and global attention). Every figure
is affine in the number of identical layer groups, so the full depth follows exactly from the two runs;
``tests/test_plan.py`` checks this against a full trace.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

from fitune.memory.simulate import PHASES, Simulation, simulate
from fitune.memory.tracker import phase_of

FULL_TRACE_MAX_LAYERS = 6  # at or below this depth, trace every layer


@dataclass
class Plan:
    """Predicted memory of a run. Bytes are what the target's allocator reports (see ``device``)."""

    peak_bytes: int
    phases: dict[str, int]  # load, first_step, steady_step, eval, samples, checkpoint, save -> peak bytes
    breakdown: dict[str, int]  # category -> bytes at the peak
    peak_op: str
    peak_module: str
    peak_phase: str
    peak_stage: str
    timeline: list[dict]  # the steady step of the traced model: live bytes by category, op by op
    device: str  # cpu | cuda
    gpu: str | None
    num_layers: int
    traced_layers: list[int]
    overheads: dict[str, int] = field(default_factory=dict)  # bytes outside the tensors (CUDA)
    cuda: dict[str, int] = field(default_factory=dict)  # allocated / reserved / device totals (CUDA)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # host memory the run keeps off the device, not part of peak_bytes: offloaded_activations -> peak bytes
    host: dict[str, int] = field(default_factory=dict)
    # phases this run does not have, and why (no eval split, no prompts, no save_every)
    absent: dict[str, str] = field(default_factory=dict)
    attention: str = ""  # the kernel training uses on the target and why, and the one traced if it differs
    # phase -> category -> bytes at that phase's own peak (the OOM guard compares a failed phase with it)
    phase_breakdowns: dict[str, dict[str, int]] = field(default_factory=dict)
    # processes the model is sharded over (FSDP2): every figure above is one rank's (rank 0's, which also
    # gathers the result at the save; the others hold the same shards)
    ranks: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def layer_period(config) -> int:
    """Length of the repeating pattern of decoder layers (1 when all layers are alike)."""
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and types:
        for p in range(1, len(types) + 1):
            if all(types[i] == types[i % p] for i in range(len(types))):
                return p
    return 1


def _affine(a: float, b: float, k: float) -> int:
    return int(round(a + k * (b - a)))


def _renumber(module: str, traced: int, num_layers: int) -> str:
    """Name the layer at the peak as it is in the full model (the last traced layer is the last one)."""
    shift = num_layers - traced
    return (
        re.sub(r"layers\.(\d+)", lambda m: f"layers.{int(m.group(1)) + shift}", module) if shift else module
    )


def traced_runs(
    recipe, *, source, device_model, full_trace: bool = False, warm_up: bool = True
) -> tuple[list[Simulation], float]:
    """Fake runs of ``recipe`` at 2p and 3p decoder layers (or all of them) on ``device_model``, and the
    number of layer groups beyond the shorter run: full depth = a + k * (b - a) for every figure.
    ``warm_up=False`` skips the small first run that keeps lazy one-time initialisations (caches inside
    torch and the libraries) out of the traces, when the caller already ran one of this structure."""
    from fitune.session import checkpoint_period

    num_layers = source.config.num_hidden_layers
    # layers checkpointed by a pattern (every_N) repeat with it; a list of layers is traced in full
    period = math.lcm(layer_period(source.config), checkpoint_period(recipe, num_layers))
    on_host = device_model.kind == "cpu"
    ranks = recipe.hardware.num_devices

    def run(n: int, steps: bool = True) -> Simulation:
        return simulate(
            recipe,
            source=source,
            num_layers=n,
            round_bytes=device_model.round_bytes,
            allocator=device_model.new_allocator(),
            host_is_device=on_host,
            steps=steps,
            kernel_scratch=device_model.kernel_scratch,
            ranks=ranks,
        )

    if warm_up:
        # the load alone is enough: plans of 18 configurations (3 architectures x full / LoRA / QLoRA x CPU /
        # CUDA target, with eval, samples and checkpoints) came out equal to the byte with a full warm-up
        small = recipe.updated({"train.batch_size": 1, "train.seq_len": 8, "train.grad_accum": 1})
        simulate(small, source=source, num_layers=period, host_is_device=on_host, steps=False, ranks=ranks)
    if full_trace or num_layers <= FULL_TRACE_MAX_LAYERS or num_layers % period or 2 * period > num_layers:
        return [run(num_layers)], 0.0
    # two and three layer groups: the first group's load differs from the others (embeddings are
    # initialised before it), from the second on every group adds the same bytes
    sims = list(in_two_processes(lambda: run(2 * period), lambda: run(3 * period)))
    return sims, num_layers / period - 2


FORK_MAX_RESIDENT = 1 << 30  # a process this large (a training run, a notebook holding a model) traces alone


def _fork_helps() -> bool:
    """Whether a traced run may go to a forked child. ``FITUNE_PLAN_PROCESSES=1``: never; ``2``: whenever the
    platform allows it; unset: when there is a second core and this process is small (a plan from the command
    line is about 0.5 GiB; a large one would have every page it touches copied). The platform must be Linux
    (fork is unsafe with some macOS frameworks and absent on Windows) with CUDA not initialised here (a
    forked child cannot use it, and a trace never needs it)."""
    import torch

    if sys.platform != "linux" or torch.cuda.is_initialized():
        return False
    setting = os.environ.get("FITUNE_PLAN_PROCESSES", "")
    if setting in ("1", "2"):
        return setting == "2"
    try:
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return False
    return (os.cpu_count() or 1) > 1 and resident <= FORK_MAX_RESIDENT


def in_two_processes(first, second) -> tuple[Simulation, Simulation]:
    """``first()`` and ``second()``, two independent traced runs, the first in a forked child where that
    can help (``_fork_helps``): tracing is single-threaded Python, so two cores take both at once. The child
    sends its ``Simulation`` back as JSON over a pipe; if it fails in any way, ``first()`` runs here (and
    raises here, if that is what it does)."""
    if not _fork_helps():
        return first(), second()
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork in a process with threads (torch's pools); the child runs Python and
        # fake tensors only, with one torch thread, as torch's own DataLoader workers do after fork
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: run, send, leave without running any exit handler of the parent's
        status = 1
        try:
            os.close(read_fd)
            # the run here prints the same library warnings: the child would print them a second time
            quiet = os.open(os.devnull, os.O_WRONLY)
            os.dup2(quiet, 1)
            os.dup2(quiet, 2)
            import torch

            torch.set_num_threads(1)
            data = json.dumps(asdict(first())).encode()
            with os.fdopen(write_fd, "wb") as out:
                out.write(data)
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    start = time.perf_counter()
    try:
        b = second()
    finally:
        # the two runs take about as long: a child far behind is stuck, and is replaced by a run here
        data = _read_until(read_fd, deadline=time.perf_counter() + 60 + 10 * (time.perf_counter() - start))
        if data is None:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        return first(), b
    return Simulation(**json.loads(data)), b


def _read_until(fd: int, deadline: float) -> bytes | None:
    """All a pipe carries until its writer closes it, or None past ``deadline``."""
    import select

    chunks = []
    try:
        while True:
            left = deadline - time.perf_counter()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def plan(recipe, *, full_trace: bool = False) -> Plan:
    """Predict the memory of ``recipe`` on its target (``hardware.device``) without loading a weight; with
    ``hardware.num_devices`` > 1, the memory of one of the processes the model is sharded over."""
    from fitune.memory.devices import device_model
    from fitune.models import sources
    from fitune.techniques.attention import plan_line

    _import_method_libraries(recipe)
    start = time.perf_counter()
    target = _target(recipe)
    model = device_model(target["device"], target["gpu"])
    source = sources.resolve(recipe, need_weights=False)
    num_layers = source.config.num_hidden_layers
    sims, k = traced_runs(recipe, source=source, device_model=model, full_trace=full_trace)
    a, b = sims[0], sims[-1]

    # every part of a phase (the pass, its optimizer step, its end) grows in a straight line with depth; the
    # phase's peak is the largest part at full depth, which need not be the largest in the short traces
    parts = {}
    for name in b.parts:
        pa, pb = a.parts.get(name, b.parts[name]), b.parts[name]
        cats = set(pa["breakdown"]) | set(pb["breakdown"])
        total = _affine(pa["bytes"], pb["bytes"], k)
        allocated = None
        if pa["allocated"] is not None and pb["allocated"] is not None:
            allocated = max(_affine(pa["allocated"], pb["allocated"], k), total)
        breakdown = {c: _affine(pa["breakdown"].get(c, 0), pb["breakdown"].get(c, 0), k) for c in cats}
        parts[name] = (total, breakdown, allocated)

    def size(name: str) -> int:
        total, _, allocated = parts[name]
        return allocated if model.kind == "cuda" and allocated is not None else total

    present = [ph for ph in PHASES if any(phase_of(n) == ph for n in parts)]
    chosen = {ph: max((n for n in parts if phase_of(n) == ph), key=size) for ph in present}
    phases = {ph: parts[chosen[ph]][0] for ph in present}
    breakdowns = {ph: dict(parts[chosen[ph]][1]) for ph in present}
    overheads: dict[str, int] = {}
    cuda: dict[str, int] = {}
    if model.kind == "cuda":
        from fitune.memory.devices import cuda_totals

        # whole cached blocks beyond the 512-byte rounded tensors (never below the tensors themselves)
        allocated = {ph: max(parts[chosen[ph]][2] or 0, phases[ph]) for ph in present}
        for ph in present:
            breakdowns[ph]["allocator_blocks"] = allocated[ph] - phases[ph]
        extra = {o.name: o.bytes for o in model.overheads() if o.counted_in == "allocated"}
        for ph in present:
            breakdowns[ph].update(extra)
        phases = {ph: allocated[ph] + sum(extra.values()) for ph in present}
        peak_ph = max(present, key=lambda ph: phases[ph])
        # segments held beyond the allocated blocks do not grow layer by layer the way blocks do; keep the
        # deeper trace's cached-but-free bytes at its peak phase as the estimate for the full depth
        slack = max(0, b.phase_reserved.get(peak_ph, 0) - b.phase_allocated.get(peak_ph, 0))
        cuda = cuda_totals(allocated[peak_ph], allocated[peak_ph] + slack, model)
        overheads = {o.name: o.bytes for o in model.overheads()}
    peak_phase = max(present, key=lambda ph: phases[ph])
    host_names = {c for s in sims for peaks in s.phase_host_peaks.values() for c in peaks}
    host = {
        c: max(
            _affine(a.phase_host_peaks.get(ph, {}).get(c, 0), b.phase_host_peaks.get(ph, {}).get(c, 0), k)
            for ph in present
        )
        for c in sorted(host_names)
    }
    return Plan(
        peak_bytes=phases[peak_phase],
        phases=phases,
        breakdown={c: v for c, v in sorted(breakdowns[peak_phase].items()) if v},
        peak_op=b.parts[chosen[peak_phase]]["op"],
        peak_module=_where(b.parts[chosen[peak_phase]]["module"], b.num_layers, num_layers),
        peak_phase=peak_phase,
        peak_stage=b.parts[chosen[peak_phase]]["stage"],
        timeline=b.timeline,
        device=model.kind,
        gpu=target["gpu"].name if target["gpu"] is not None else None,
        num_layers=num_layers,
        traced_layers=[s.num_layers for s in sims],
        overheads=overheads,
        cuda=cuda,
        seconds=time.perf_counter() - start,
        host=host,
        notes=list(b.notes),
        absent=dict(b.absent),
        attention=plan_line(recipe, source.config, target["env"]),
        phase_breakdowns={ph: {c: v for c, v in sorted(bd.items()) if v} for ph, bd in breakdowns.items()},
        ranks=recipe.hardware.num_devices,
    )


def _import_method_libraries(recipe) -> None:
    """Import what the session will use before the clock starts: planning time excludes Python imports."""
    import transformers  # noqa: F401

    from fitune.libraries import prepare_libraries

    prepare_libraries()

    if recipe.method.kind != "full":
        import peft  # noqa: F401
    if recipe.method.kind == "qlora" or "8bit" in recipe.train.optimizer:
        import bitsandbytes  # noqa: F401


def _where(module: str, traced: int, num_layers: int) -> str:
    from fitune.memory.tracker import NO_MODULE

    if module == NO_MODULE:
        return "loss (fitune.step, outside the model's modules)"
    return _renumber(module, traced, num_layers)


def _target(recipe) -> dict:
    """The device a recipe is planned for: cpu, this machine's CUDA GPU, or a catalog GPU."""
    from fitune.hardware.detect import detect_environment

    env = detect_environment(recipe.hardware.device)
    return {"device": env.device_type, "gpu": env.gpu, "env": env}
