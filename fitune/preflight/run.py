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


def model_config_of(recipe) -> dict | None:
    """The model's config as a dict, without loading weights (None when it cannot be resolved cheaply)."""
    from fitune.models import sources

    try:
        return sources.resolve(recipe, need_weights=False).config.to_dict()
    except FituneError:
        return None


def planned_peak(recipe, env) -> int | None:
    """The plan's peak for the environment's device (None when the step cannot be planned)."""
    from fitune.planner import plan

    target = "cpu" if env.device_type == "cpu" else (env.gpu.name if env.simulated and env.gpu else "cuda")
    try:
        return plan(recipe.updated({"hardware.device": target})).peak_bytes
    except FituneError:
        return None


def doctor(
    recipe,
    *,
    env=None,
    planned_peak_bytes: int | None = None,
    training: bool = False,
    with_plan: bool = True,
    with_data: bool = True,
) -> list[Finding]:
    """Check a recipe against its environment, its memory fit and its dataset; findings come errors first.

    The dataset is read line by line (never a weight): bad lines as file:line, and, unless ``training``
    (which tokenizes right after, before loading weights), the token lengths against ``train.seq_len``.
    """
    from fitune.data.scan import check_data

    env = env if env is not None else environment_for(recipe, training=training)
    issues, usable = check_data(recipe, tokenize=not training) if with_data else ([], None)
    if planned_peak_bytes is None and with_plan:
        planned_peak_bytes = planned_peak(recipe, env)
    ctx = DoctorContext(
        recipe=recipe,
        env=env,
        model_config=model_config_of(recipe),
        planned_peak_bytes=planned_peak_bytes,
        data_examples=usable,
    )
    data = [Finding(i.rule_id, i.severity, i.message, None, i.fix_text, DATA_SOURCE) for i in issues]
    return sorted(data + run_rules(ctx), key=lambda f: SEVERITY_ORDER[f.severity])
