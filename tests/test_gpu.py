"""Checks that need a CUDA GPU (marked `gpu`; skipped where there is none)."""

import pytest
import torch

import fitune
from fitune.recipe import Recipe

from .conftest import TINY_LLAMA

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _recipe(kind: str, **train):
    return Recipe.from_dict(
        {
            "model": {
                "config": dict(
                    TINY_LLAMA, hidden_size=512, intermediate_size=1408, vocab_size=32000, num_hidden_layers=4
                ),
                "dtype": "bf16",
            },
            "method": {"kind": kind, "r": 16},
            "train": {"seq_len": 512, "batch_size": 4, "precision": "bf16", **train},
            "hardware": {"device": "cuda"},
        }
    )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["lora", "qlora", "full"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_plan_matches_cuda_max_memory_allocated(kind, ckpt):
    r = _recipe(kind, gradient_checkpointing=ckpt)
    predicted, measured = fitune.plan(r), fitune.measure(r)
    for phase in ("first_step", "steady_step"):
        assert predicted.phases[phase] == pytest.approx(measured.phases[phase], rel=0.05), phase
