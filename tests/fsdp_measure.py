"""Run by ``tests/test_fsdp_plan.py`` under torchrun: ``fitune.measure`` of each recipe in a JSON file on
this process, the figures written to ``OUT/rank-R.json``."""

import json
import sys
from pathlib import Path

import torch

import fitune
from fitune.distributed import world

recipes, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
here = world.start(torch.device("cpu"))
results = {}
for name, recipe in recipes.items():
    m = fitune.measure(recipe)
    results[name] = {"peak": m.peak_bytes, "phases": m.phases}
(out / f"rank-{here.rank}.json").write_text(json.dumps(results))
world.finish()
