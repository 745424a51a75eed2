"""The doctor as fitune runs it: detect (or simulate) the environment, read the model's config, check."""

from __future__ import annotations

from fitune.errors import FituneError
from fitune.preflight.checks import SEVERITY_ORDER, DoctorContext, Finding, run_rules

DATA_SOURCE = ("fitune/data/scan.py: every line read and tokenized as training will",)


def environment_for(recipe, *, training: bool = False):
    """The environment a recipe will meet.

    Planning for a catalog GPU simulates that GPU; training always meets this machine's real device. A CUDA
    request on a machine without CUDA is described as the CPU, so the rule about it can report it.
    """
    from fitune.hardware.detect import detect_environment

    device = recipe.hardware.device
    if training and device not in ("auto", "cpu") and not device.startswith("cuda"):
        device = "cuda"
    try:
        return detect_environment(device)
    except FituneError:
        if device.startswith("cuda"):
            return detect_environment("cpu")
        raise


def resolved_source(recipe):
    """(the model's source resolved without weights, None), or (None, why it cannot be resolved)."""
    from fitune.models import sources

    try:
        return sources.resolve(recipe, need_weights=False), None
    except FituneError as exc:
        return None, str(exc).partition("; fix: ")[0]


def plan_for(recipe, env):
    """The plan of ``recipe`` on the environment's device, or (None, why) when it cannot be planned."""
    from fitune.planner import plan

    target = "cpu" if env.device_type == "cpu" else (env.gpu.name if env.simulated and env.gpu else "cuda")
    try:
        return plan(recipe.updated({"hardware.device": target})), None
    except FituneError as exc:
        return None, str(exc)


def planned_peak(recipe, env) -> int | None:
    """The plan's peak for the environment's device (None when the step cannot be planned)."""
    found, _ = plan_for(recipe, env)
    return found.peak_bytes if found is not None else None


def doctor(
    recipe,
    *,
    env=None,
    planned_peak_bytes: int | None = None,
    training: bool = False,
    with_plan: bool = True,
    with_data: bool = True,
    source=None,
) -> list[Finding]:
    """Check a recipe against its environment, its memory fit and its dataset; findings come errors first.

    The dataset is read line by line (never a weight): bad lines as file:line, and, unless ``training``
    (which tokenizes right after, before loading weights), the token lengths against ``train.seq_len``.
    ``source`` is the model's source when the caller has resolved it (``resolved_source``).
    """
    from fitune.data.scan import check_data

    env = env if env is not None else environment_for(recipe, training=training)
    why = None
    if source is None:
        source, why = resolved_source(recipe)
    issues, usable = (
        check_data(recipe, tokenize=not training, source=source, source_error=why)
        if with_data
        else ([], None)
    )
    if planned_peak_bytes is None and with_plan:
        planned_peak_bytes = planned_peak(recipe, env)
    ctx = DoctorContext(
        recipe=recipe,
        env=env,
        model_config=source.config.to_dict() if source is not None else None,
        planned_peak_bytes=planned_peak_bytes,
        data_examples=usable,
    )
    data = [Finding(i.rule_id, i.severity, i.message, i.change, i.fix_text, DATA_SOURCE) for i in issues]
    return sorted(data + run_rules(ctx), key=lambda f: SEVERITY_ORDER[f.severity])
