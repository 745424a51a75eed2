"""Activation offload: the tensors autograd saves for backward wait in host memory instead of on the GPU.

``ActivationOffload.hooks()`` is a ``torch.autograd.graph.saved_tensors_hooks`` context, entered by
``fitune.step`` around the forward pass and the loss. Each saved tensor of at least ``MIN_BYTES`` that is no
parameter or buffer (weights stay where they are; they are needed on the device anyway) is copied to host
memory when the forward saves it and copied back when the backward needs it, as
``torch.autograd.graph.save_on_cpu`` does, with two differences: weights are never copied, and a tensor that
several ops save (the input of q, k and v projections) is copied once.

The copy to the host is pinned and asynchronous on CUDA. On a CPU device there is nowhere to move anything, so
the session builds no offload at all (``offload_for``) and a recipe asking for it trains exactly as without.

Planning for a GPU runs the step on fake CPU tensors. There, ``host_memory`` is the tracker's context for host
memory (``MemoryTracker.off_device(host_category=...)``): the host copy is allocated inside it, so the tracker
counts it as host memory under ``offloaded_activations``, the device copy the forward made is freed as in a
real run, and the copy back in backward is a device allocation like the real ``.to(device)``.

Gradient checkpointing saves its own way (its hooks are innermost inside a checkpointed layer): with every
layer checkpointed, what remains to offload is the loss's saved tensors; with ``checkpoint_layers`` choosing
some layers, the other layers' activations are offloaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

MIN_BYTES = 1024  # smaller tensors are not worth a transfer (torchtune's OffloadActivations default)
HOST_CATEGORY = "offloaded_activations"


class ActivationOffload:
    """Saved-tensor hooks moving activations of ``model`` to host memory; see the module docstring."""

    def __init__(self, model: nn.Module, host_memory: Callable[..., Any] | None = None) -> None:
        self.model = model
        self.host_memory = host_memory  # planning: the tracker's host-memory context factory
        self._weights: set[int] = set()
        self._copies: WeakIdKeyDictionary = WeakIdKeyDictionary()  # device tensor -> (version, host copy)
        self._outer: tuple[Callable, Callable] | None = None

    @contextlib.contextmanager
    def hooks(self):
        # weights can be re-assigned between steps (p.data = ...): collect their storages each time
        tensors = [*self.model.parameters(), *self.model.buffers()]
        self._weights = {id(t.untyped_storage()) for t in tensors}
        # only the innermost saved-tensor hooks run: tensors kept on the device go to the enclosing ones
        # (the planner's tracker names them activations through its hooks)
        self._outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._weights = set()
            self._copies = WeakIdKeyDictionary()
            self._outer = None

    def _pack(self, t: torch.Tensor) -> Any:
        if (
            t.numel() * t.element_size() < MIN_BYTES
            or t.layout != torch.strided
            or id(t.untyped_storage()) in self._weights
        ):
            outer = self._outer
            return ("kept", outer[1], outer[0](t)) if outer is not None else ("kept", None, t)
        known = self._copies.get(t)
        if known is not None and known[0] == t._version:
            return "host", t.device, known[1]
        host = self._to_host(t)
        self._copies[t] = (t._version, host)
        return "host", t.device, host

    def _unpack(self, packed: Any) -> torch.Tensor:
        kind, a, b = packed
        if kind == "kept":
            return a(b) if a is not None else b
        if self.host_memory is not None:
            return b.clone()  # planning: the copy back is a new device allocation
        return b.to(a, non_blocking=True)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if self.host_memory is not None:
            with self.host_memory(host_category=HOST_CATEGORY):
                host = torch.empty(t.size(), dtype=t.dtype, device=t.device)
                host.copy_(t)
            return host
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, device="cpu", pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host


def offload_for(
    enabled: bool, model: nn.Module, device: torch.device, *, fake: bool, host_memory=None
) -> ActivationOffload | None:
    """The offload a session uses: none when not asked for, or when activations already live in host memory
    (a real CPU run, or planning for a CPU target)."""
    if not enabled:
        return None
    if fake:
        return ActivationOffload(model, host_memory) if host_memory is not None else None
    return ActivationOffload(model) if device.type != "cpu" else None
