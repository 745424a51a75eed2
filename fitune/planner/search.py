"""``fitune plan --search``: the fastest configuration of a recipe that fits a GPU or a memory budget.

From a base recipe (the user's, or fitune's defaults for a catalog model) the search enumerates method
(full / lora / qlora), LoRA rank, precision, gradient checkpointing, attention kernel, loss chunking,
optimizer, and micro-batch x gradient accumulation holding the effective batch; the sequence length stays.

1. Rule out what the target cannot run: the doctor's errors (``fitune.preflight.run_rules``) against the
   target's environment, with their messages. Precisions that cannot win are pruned with the reason: fp32
   (more bytes and no tensor cores) and fp16 where bf16 runs (same bytes and speed, with overflow risk).
2. Predict each configuration's speed (``speed.py``) and rank by a score: tokens/s, less 1% per searched
   setting changed from the base recipe (the speed model does not resolve finer differences, so a nearer
   configuration wins a near tie).
3. Predict memory best score first (``anchors.py``: each structure is traced at a few anchors, lazily, and
   every other configuration derived), until ``SETTLED`` distinct configurations that fit beat every
   configuration left; those are reported as not evaluated. A configuration whose weights alone (and, for a
   full fine-tune, the gradients and optimizer moments every optimizer step holds) exceed the budget is not
   traced at all.
4. A configuration fits when its peak is at most the budget less the margin. When nothing fits, name the
   smallest change that would: a shorter sequence, QLoRA, or a catalog GPU with enough memory.
5. When nothing fits one GPU of the catalog (and the recipe names no ``hardware.num_devices``), search again
   sharded over 2, 4 and 8 of them (FSDP2; ``DEVICE_COUNTS``) and stop at the first count where something
   fits. Each process is planned as ``fitune plan --nproc N`` plans it (traced under a fake process group);
   each takes ``1/N`` of the optimizer step's batch; the speed model adds the collectives (``speed.py``).
   8-bit optimizers are ruled out there by the doctor (FSDP cannot shard their state).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from fitune.errors import FituneError
from fitune.planner import anchors as anc
from fitune.planner import speed as spd
from fitune.planner.candidates import (
    CHANGE_PENALTY,
    DEVICE_COUNTS,
    METHODS,
    Candidate,
    SearchResult,
    Target,
    build_candidates,
    per_process_batch,
    step_batch,
    weights_floor,
)

DEFAULT_MARGIN = 0.10
DEFAULT_TOP = 10
SETTLED = 3  # stop tracing once this many distinct configurations that fit beat every structure left
_GIB = 2**30


def search(
    base,
    target: Target,
    *,
    margin: float = DEFAULT_MARGIN,
    top: int = DEFAULT_TOP,
    methods: tuple[str, ...] = METHODS,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Rank the configurations of ``base`` that fit ``target`` (see the module docstring)."""
    start = time.perf_counter()
    if not 0 <= margin < 1:
        raise FituneError(f"--margin {margin:g} is outside [0, 1); fix: give a share such as 0.1")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FituneError(f"--method {', '.join(unknown)} is unknown; fix: choose from {', '.join(METHODS)}")
    say = progress or (lambda _msg: None)
    ranks = base.hardware.num_devices
    result = _search_on(base, target, ranks, margin, top, methods, say)
    if result.ranked or ranks > 1 or target.kind != "cuda" or target.gpu is None:
        result.seconds = time.perf_counter() - start
        return result
    for n in DEVICE_COUNTS:
        say(f"nothing fits one {target.gpu.name}: searching {n} of them, sharded with FSDP2")
        sharded = _search_on(base, target, n, margin, top, methods, say, suggest=False)
        sharded.structures_traced += result.structures_traced
        sharded.fake_runs += result.fake_runs
        if sharded.ranked:
            sharded.one_device = result
            sharded.seconds = time.perf_counter() - start
            return sharded
        result.structures_traced, result.fake_runs = sharded.structures_traced, sharded.fake_runs
    if DEVICE_COUNTS:
        result.suggestions.append(
            f"nothing fits {DEVICE_COUNTS[-1]} x {target.gpu.name} sharded with FSDP2 either (searched "
            + ", ".join(str(n) for n in DEVICE_COUNTS)
            + " GPUs)"
        )
    result.seconds = time.perf_counter() - start
    return result


def _search_on(
    base, target: Target, ranks: int, margin: float, top: int, methods, say, *, suggest: bool = True
) -> SearchResult:
    """The search on ``ranks`` processes (one per GPU)."""
    from fitune.memory.devices import device_model
    from fitune.models import sources

    source = sources.resolve(base, need_weights=False)
    shape = spd.model_shape(source.config)
    dm = device_model(target.kind, target.gpu)
    extra = {o.name: o.bytes for o in dm.overheads() if o.counted_in == "allocated"}
    usable = int(target.memory_bytes * (1 - margin))
    effective = per_process_batch(base, ranks)

    candidates = build_candidates(base, target, shape, source.config.to_dict(), methods, ranks)
    _rule_out_by_weights(candidates, shape, sum(extra.values()), usable)
    by_key: dict[tuple, list[Candidate]] = {}
    for c in candidates:
        if c.status == "pending":
            by_key.setdefault(c.structure, []).append(c)
    warmed: set[tuple[str, str]] = set()
    structures = {
        key: _Structure(base, group, effective, source, dm, extra, usable, shape, warmed)
        for key, group in by_key.items()
    }
    fitting = _explore(structures, candidates, usable, min(top, SETTLED), say)

    ranked = _fold_twins(sorted(fitting, key=lambda c: -c.score))
    notes = [
        "flash_attention_2 is planned with the sdpa trace (both fused kernels save q, k, v, the output and "
        "the log-sum-exp); it cannot be traced here without CUDA and flash-attn",
        "paged_adamw8bit is planned as adamw8bit with its state resident on the device (it pages out to the "
        "host only under memory pressure)",
    ]
    if target.gpu is None or not target.gpu.bandwidth_gbps:
        notes.append(f"{target.label}: no throughput figures; configurations are ranked by FLOPs per token")
    assumptions = [spd.ASSUMPTIONS, f"ranking: tokens/s less {CHANGE_PENALTY:.0%} per setting changed"]
    if ranks > 1:
        whole = step_batch(base)
        notes.append(
            f"sharded over {ranks} GPUs with FSDP2: each row is one process (peak per GPU) taking "
            f"{effective} example(s) of each optimizer step"
            + (
                f" ({ranks * effective} in all, not {whole}: {whole} does not divide)"
                if whole % ranks
                else ""
            )
            + "; tokens/s count every GPU's tokens; train it with `fitune train recipe.yaml --nproc "
            f"{ranks}`"
        )
        if target.gpu is not None and target.gpu.link_gbps:
            notes.append(f"{target.gpu.name} link: {target.gpu.link}, {target.gpu.link_gbps:g} GB/s each way")
        assumptions.insert(1, spd.SHARDED_ASSUMPTIONS)
    result = SearchResult(
        base=base,
        target=target,
        margin=margin,
        usable_bytes=usable,
        seq_len=base.train.seq_len,
        effective_batch=effective,
        ranked=ranked,
        candidates=candidates,
        suggestions=[],
        assumptions=assumptions,
        notes=notes,
        structures_traced=sum(1 for st in structures.values() if st.anchors),
        fake_runs=sum(st.runs for st in structures.values()),
        seconds=0.0,
        ranks=ranks,
    )
    if not ranked and suggest:
        from fitune.planner.suggest import suggestions

        result.suggestions = suggestions(result, shape=shape, source=source, progress=say)
    return result


def _rule_out_by_weights(candidates: list[Candidate], shape, extra: int, usable: int) -> None:
    """Mark too big, without a trace, what the weights alone (and a full fine-tune's step) cannot fit."""
    for c in candidates:
        if c.status == "pending" and (floor := weights_floor(c.settings, shape) + extra) > usable:
            what = "weights and optimizer step" if c.settings["method.kind"] == "full" else "weights"
            c.status, c.peak_bytes = "too_big", floor
            c.reason = (
                f"its {what} alone need {floor / _GIB:,.2f} GiB > {usable / _GIB:,.2f} GiB usable (counted)"
            )


def _explore(
    structures: dict, candidates: list[Candidate], usable: int, settled: int, say
) -> list[Candidate]:
    """Derive memory best score first, one unit (a structure's configurations that need the same anchors) at a
    time, until ``settled`` distinct configurations that fit beat every unit left. Returns those that fit."""
    units: dict[tuple, list[Candidate]] = {}
    for key, structure in structures.items():
        for c in structure.candidates:
            units.setdefault((key, structure.stage(c)), []).append(c)
    fitting: list[Candidate] = []
    while units:
        units = _without_bounded(units, structures, usable)
        if not units:
            break
        unit = max(units, key=lambda u: (max(c.score for c in units[u]), -u[1]))
        group = units.pop(unit)
        if _enough(fitting, max(c.score for c in group), settled):
            for g in (group, *units.values()):
                for c in g:
                    c.status, c.reason = "not_evaluated", "slower than the best configurations that fit"
            break
        structure = structures[unit[0]]
        if not structure.anchors:
            key = unit[0]
            say(f"tracing {key[0]}, {key[1]}, checkpointing {'on' if key[2] else 'off'}, loss_chunk {key[3]}")
            floor = structure.floor()
            if floor > usable:
                for c in structure.candidates:
                    c.status, c.peak_bytes = "too_big", floor
                    c.reason = (
                        f"needs at least {floor / _GIB:,.2f} GiB > {usable / _GIB:,.2f} GiB usable "
                        "(traced at micro-batch 1)"
                    )
                units = {u: g for u, g in units.items() if u[0] != unit[0]}
                continue
        structure.evaluate(group)
        fitting = [c for c in candidates if c.status == "fits"]
    return fitting


# Bytes per logit that a chunked loss can save at most: the head's bf16 output, its fp32 copy, the
# log-softmax kept for backward, and their gradients (2 + 4 + 4 + 4 + 4 + 2, rounded up).
LOGIT_BYTES_BOUND = 24


def _lower_bound(c: Candidate, structures: dict) -> tuple[int, str] | None:
    """A lower bound on ``c``'s peak from configurations derived already (for pruning, never reported as a
    prediction): its twin at the recipe's rank with adamw (``_Structure.bound``), or, for a chunked loss, the
    same configuration without chunking less every logit of the micro-batch."""
    own = structures[c.structure]
    if own.stage(c) > 1 and (bound := own.bound(c)) is not None:
        return bound, f"bound from rank {own.r0} with adamw"
    sibling = structures.get((*c.structure[:3], 0))
    if c.settings["train.loss_chunk"] != 0 and sibling is not None:
        plain = replace(c, settings={**c.settings, "train.loss_chunk": 0})
        twin = sibling.bound(plain)
        if twin is not None:
            logits = LOGIT_BYTES_BOUND * c.settings["train.batch_size"] * own.seq_len * own.vocab
            return twin - logits, "bound from the same configuration without loss chunking"
    return None


def _without_bounded(units: dict, structures: dict, usable: int) -> dict:
    """Units without the configurations that a lower bound already rules out."""
    out = {}
    for unit, group in units.items():
        keep = []
        for c in group:
            found = _lower_bound(c, structures)
            if found is not None and found[0] > usable:
                c.status, c.peak_bytes = "too_big", found[0]
                need = f"{found[0] / _GIB:,.2f} GiB > {usable / _GIB:,.2f} GiB usable"
                c.reason = f"needs at least {need} ({found[1]})"
            else:
                keep.append(c)
        if keep:
            out[unit] = keep
    return out


def _twin_key(c: Candidate) -> tuple:
    s = dict(c.settings)
    s.pop("train.attention")
    if s["train.optimizer"] == "paged_adamw8bit":
        s["train.optimizer"] = "adamw8bit"
    return tuple(sorted((k, str(v)) for k, v in s.items()))


def _enough(fitting: list[Candidate], score: float, top: int) -> bool:
    """Whether ``top`` distinct configurations that fit already beat ``score``."""
    return len({_twin_key(c) for c in fitting if c.score >= score}) >= top


def _fold_twins(ranked: list[Candidate]) -> list[Candidate]:
    """One table row per distinct configuration: equal ones (attention kernel, paged or not) are folded into
    the best-scored, which lists them."""
    rows: dict[tuple, Candidate] = {}
    for c in ranked:
        key = _twin_key(c)
        if key in rows:
            first = rows[key]
            diff = [f"{k.split('.')[-1]} {v}" for k, v in c.settings.items() if first.settings[k] != v]
            first.twins.append(", ".join(diff))
        else:
            c.twins = []
            rows[key] = c
    return list(rows.values())


def _twin_of(c: Candidate, r0: int) -> tuple:
    s = {**c.settings, "method.r": r0, "train.optimizer": "adamw"}
    return tuple(sorted((k, str(v)) for k, v in s.items()))


class _Structure:
    """One structure's configurations and its anchors, traced on demand (see ``anchors.py``)."""

    def __init__(
        self, base, candidates: list[Candidate], effective: int, source, dm, extra, usable: int, shape, warmed
    ):
        first = candidates[0].settings
        self.seq_len = base.train.seq_len
        self.vocab = shape.head[1]
        self.adapted_modules = shape.num_layers * len(shape.adapted(base.method.targets))
        self.base, self.candidates, self.effective = base, candidates, effective
        self.source, self.dm, self.extra, self.usable = source, dm, extra, usable
        self.adapters = first["method.kind"] != "full"
        self.r0 = base.method.r
        ranks = {c.settings["method.r"] for c in candidates}
        self.r1 = max(ranks, key=lambda r: (abs(r - self.r0), r))
        self.first = first
        self.anchors: dict[str, anc.Anchor | None] = {}
        self._twins = {_twin_of(c, self.r0): c for c in candidates if self.stage(c) == 1}
        self.runs = 0
        self._warmed = warmed  # (method, optimizer) whose lazy initialisations already ran in this search

    def stage(self, c: Candidate) -> int:
        """1: needs A1 and A2; 2: also A3; 3: also A4."""
        p = c.point
        if p.r != self.r0 and p.batch_size > 1:
            return 3
        return 2 if (p.r != self.r0 or p.eight_bit) else 1

    def _trace(self, name: str) -> anc.Anchor | None:
        if name in self.anchors:
            return self.anchors[name]
        # sharded, no 8-bit optimizer runs (the doctor rules it out): A3 and A4 trace the other rank with adamw
        eight = "adamw8bit" if self.first["hardware.num_devices"] == 1 else "adamw"
        r, b, optimizer = {
            "a1": (self.r0, 1, "adamw"),
            "a2": (self.r0, self.effective, "adamw"),
            "a3": (self.r1, 1, eight),
            "a4": (self.r1, self.effective, eight),
        }[name]
        needed = name in ("a1", "a3") or self.effective > 1
        anchor = None
        if needed:
            s = {
                **self.first,
                "method.r": r,
                "train.batch_size": b,
                "train.grad_accum": 1,
                "train.optimizer": optimizer,
                "train.attention": "sdpa",
            }
            key = (s["method.kind"], optimizer)
            warm = key not in self._warmed
            anchor = anc.trace(self.base.updated(s), source=self.source, device_model=self.dm, warm_up=warm)
            self._warmed.add(key)
            self.runs += len(anchor.traced_layers)
        self.anchors[name] = anchor
        return anchor

    def bound(self, c: Candidate) -> int | None:
        """A lower bound on ``c``'s peak from its twin at rank r0 with adamw, once that one is derived (for
        pruning only; never reported as a prediction). At the twin's peak op a lower rank saves at most, in
        proportion, what the adapters hold: weights, gradients and optimizer state (as counted there), their
        16-bit casts (no more than the weights) and the rank-r projections of every token (counted here at
        4 bytes each); an 8-bit state keeps at least a quarter of adamw's."""
        twin = self._twins.get(_twin_of(c, self.r0))
        if twin is None or twin.peak_bytes is None or not twin.breakdown:
            return None
        ratio = min(1.0, c.settings["method.r"] / self.r0) if self.adapters else 1.0
        b = twin.breakdown
        adapter = 2 * b.get("trainable_weights", 0) + b.get("gradients", 0) + b.get("optimizer_state", 0)
        if self.adapters:
            adapter += 4 * c.settings["train.batch_size"] * self.seq_len * self.r0 * self.adapted_modules
        bound = twin.peak_bytes - (1 - ratio) * adapter
        if c.point.eight_bit:
            bound -= 0.75 * b.get("optimizer_state", 0) * ratio
        return int(bound)

    def floor(self) -> int:
        """Bytes no configuration of this structure goes below (from A1)."""
        eight = any(c.point.eight_bit for c in self.candidates)
        return anc.lower_bound(
            self._trace("a1"), self.extra, r=self.r0, adapters=self.adapters, eight_bit_possible=eight
        )

    def evaluate(self, group: list[Candidate]) -> None:
        """Derive the peak of each configuration of ``group`` (one stage), tracing what it needs."""
        need = max(self.stage(c) for c in group)
        names = ["a1", "a2"] + (["a3"] if need >= 2 else []) + (["a4"] if need >= 3 else [])
        anchors = {n: self._trace(n) for n in names}
        points = {
            anc.Point(self.r0, 1, 1, False),
            anc.Point(self.r0, self.effective, 1, False),
            anc.Point(self.r1, 1, 1, True),
            anc.Point(self.r1, self.effective, 1, True),
        }
        for c in group:
            d = anc.derive(
                c.point,
                adapters=self.adapters,
                r0=self.r0,
                r1=self.r1,
                effective_batch=self.effective,
                a1=anchors["a1"],
                a2=anchors["a2"],
                a3=anchors.get("a3"),
                a4=anchors.get("a4"),
                extra=self.extra,
            )
            c.peak_bytes, c.breakdown, c.peak_region = d.peak_bytes, d.breakdown, d.region
            c.traced = c.point in points and c.settings["train.attention"] == "sdpa"
            if d.peak_bytes <= self.usable:
                c.status = "fits"
            else:
                c.status = "too_big"
                c.reason = f"peak {d.peak_bytes / _GIB:,.2f} GiB > {self.usable / _GIB:,.2f} GiB usable"
