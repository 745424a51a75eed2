"""What fitune installs on a model, checked to be still in place.

Each technique that changes a model (lean norms and MLPs, the CPU attention, peft's input casts turned off,
checkpointed layers, the head the fused loss reads) records here how to tell it is still there. Libraries
can undo such a change without a word: transformers 5.25's hub kernels deleted the lean norms at every
``model.train()`` and ``model.eval()``, and the run kept 26 MB more than its plan. The session checks after
every switch between training and evaluation; a lost technique stops the run, naming the module and the
library versions, instead of costing memory quietly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from fitune.errors import FituneError

# the recipe setting that runs without each technique
WITHOUT = {
    "train.lean_activations": "train.lean_activations: false",
    "train.attention": "train.attention: eager",
    "train.gradient_checkpointing": "train.gradient_checkpointing: false",
    "train.loss_chunk": "train.loss_chunk: 0",
    "train.precision": "train.precision: fp32",
}


class TechniqueLostError(FituneError):
    """A technique fitune installed on the model is no longer in place (a library replaced it)."""


@dataclass(frozen=True)
class Patch:
    technique: str  # the recipe field that asked for it, e.g. "train.lean_activations"
    what: str  # e.g. "the lean forward"
    where: str  # e.g. "model.layers.3.input_layernorm (LlamaRMSNorm)"
    holds: Callable[[], bool]


def is_bound(obj, attr: str, function: Callable) -> Callable[[], bool]:
    """A check that ``obj.<attr>`` is still ``function`` bound to ``obj`` as an instance attribute."""

    def holds() -> bool:
        bound = obj.__dict__.get(attr)
        return getattr(bound, "__func__", None) is function and getattr(bound, "__self__", None) is obj

    return holds


class Installed:
    def __init__(self) -> None:
        self.patches: list[Patch] = []

    def add(self, technique: str, what: str, where: str, holds: Callable[[], bool]) -> None:
        self.patches.append(Patch(technique, what, where, holds))

    def lost(self) -> list[Patch]:
        return [p for p in self.patches if not p.holds()]

    def verify(self, after: str) -> None:
        """Raise ``TechniqueLostError`` if any technique is gone; ``after`` names what was just done."""
        lost = self.lost()
        if not lost:
            return
        first = lost[0]
        others = len([p for p in lost if p.technique == first.technique]) - 1
        more = f" and {others} other module(s)" if others else ""
        techniques = sorted({p.technique for p in lost})
        raise TechniqueLostError(
            f"{first.technique}: {first.what} of {first.where}{more} is no longer in place after {after}; "
            f"a library replaced it ({library_versions()}), and the run would no longer execute what its plan "
            "traced. fix: install the library versions fitune was tested with (the ranges `pip install fitune` "
            "asks for; in a checkout, `make install` installs requirements.lock), or set "
            f"{' and '.join(WITHOUT.get(t, t) for t in techniques)} and plan again"
        )


def library_versions() -> str:
    """The versions of the libraries that change models, as imported in this process."""
    parts = []
    for name in ("torch", "transformers", "peft", "kernels"):
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None)
        if version:
            parts.append(f"{name} {version}")
    return ", ".join(parts)
