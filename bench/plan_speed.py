"""Planning speed: seconds of ``fitune.plan`` per catalog model, after imports.

    .venv/bin/python bench/plan_speed.py                      # every catalog model, LoRA and QLoRA, for a T4
    .venv/bin/python bench/plan_speed.py --model llama-3.1-70b --method qlora --repeat 5
    .venv/bin/python bench/plan_speed.py --recipe examples/llama-3.1-70b-qlora-plan.yaml

Each row plans the recipe ``fitune plan MODEL`` starts from for a catalog model (the recipe defaults, micro-batch
4 x accumulation 2) with the given method, for ``--gpu``; ``--recipe`` plans a recipe file instead. The
first plan of the process pays one-time initialisations (lazy caches inside torch and the libraries) and is
reported apart as ``first``; ``median`` and ``max`` are over ``--repeat`` more. The time is ``Plan.seconds``:
the whole ``fitune.plan`` call but the Python imports it does before its clock starts. The load average is
printed because tracing is CPU-bound.
"""

from __future__ import annotations

import argparse
import os
import statistics


def _row(label: str, recipe, repeat: int) -> float:
    import fitune

    seconds, plan = [], None
    for _ in range(repeat + 1):
        plan = fitune.plan(recipe)
        seconds.append(plan.seconds)
    first, rest = seconds[0], seconds[1:] or seconds
    print(
        f"{label:<44} {first:8.2f} {statistics.median(rest):9.2f} {max(rest):7.2f}  {plan.peak_bytes / 2**30:8.2f}",
        flush=True,
    )
    return max(first, *rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="catalog model (repeat); default: all")
    parser.add_argument("--method", action="append", choices=("full", "lora", "qlora"))
    parser.add_argument("--gpu", default="t4", help="catalog GPU to plan for, or cpu")
    parser.add_argument("--recipe", action="append", help="a recipe file to plan instead (repeat)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from fitune.libraries import prepare_libraries
    from fitune.models.catalog import model_names
    from fitune.recipe import Recipe

    prepare_libraries()
    import bitsandbytes  # noqa: F401  (imported by fitune.plan before its clock; here so `first` excludes it)
    import peft  # noqa: F401

    print(
        f"load average {os.getloadavg()[0]:.2f} (1 min) at start; FITUNE_PLAN_PROCESSES="
        f"{os.environ.get('FITUNE_PLAN_PROCESSES', '(unset)')}"
    )
    print(f"{'plan':<44} {'first s':>8} {'median s':>9} {'max s':>7}  peak GiB")
    worst = 0.0
    if args.recipe:
        for path in args.recipe:
            worst = max(worst, _row(path, Recipe.from_yaml(path), args.repeat))
    else:
        for name in args.model or list(model_names()):
            for method in args.method or ["lora", "qlora"]:
                recipe = Recipe.from_dict(
                    {
                        "model": {"source": name},
                        "method": {"kind": method},
                        "train": {"batch_size": 4, "grad_accum": 2},
                        "hardware": {"device": args.gpu},
                    }
                )
                worst = max(worst, _row(f"{name} {method} on {args.gpu}", recipe, args.repeat))
    print(f"slowest plan {worst:.2f} s; load average {os.getloadavg()[0]:.2f} (1 min) at end")


if __name__ == "__main__":
    main()
