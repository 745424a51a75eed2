"""Lean activations: the same math as the model's own forward, with fewer bytes kept for backward.

Autograd keeps every tensor an op needs for its gradient until backward reaches it. In a Llama-family
decoder layer several of those tensors are cheap elementwise functions of tensors it keeps anyway:

- RMSNorm keeps an fp32 copy of its input (twice the bytes of the bf16 input), and its output is kept by
  every adapter that reads it (q/k/v, gate/up);
- the gated MLP keeps ``act(gate)`` and ``act(gate) * up`` next to ``gate`` and ``up``.

``Derived`` is a pair of saved-tensor hooks: a tensor registered as ``fn(*args)`` is not kept when an op
saves it; the op keeps a note instead and backward recomputes it (one elementwise pass, no matrix multiply).
With ``train.recompute_mlp`` the MLP's gate and up projections are recomputed too (two matrix multiplies
per layer, about a seventh of the layer's forward), and the layer keeps nothing of its MLP; with
``recompute_mlp: up`` only the up projection (half the cost, half the saving).
The patched forwards below run the model's own ops in the model's own order (so forward values are
bit-identical) and register those tensors. Only modules whose forward is textually the Llama one are
patched; anything else runs untouched.

``linear_cross_entropy`` is the chunked loss: it projects ``C`` tokens at a time onto the vocabulary and
computes the gradient of the hidden states (and of the head, when it trains) during the forward pass, so
no chunk's logits are kept and nothing is recomputed in backward. Legend: N tokens, D hidden, V vocabulary,
C tokens of one chunk.
"""

from __future__ import annotations

import contextlib
import inspect
import textwrap
import types
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from fitune.techniques.installed import Installed, is_bound

IGNORE = -100  # the data pipeline's ignored target (fitune.data.dataset.IGNORE)


# --------------------------------------------------------------------------- recompute on unpack


class _Recipe:
    """How to recompute one tensor: ``fn(*args)``, where an arg is a kept tensor or another recipe.

    ``uses`` counts the saved tensors and the recipes that still need this value in backward; while more
    than one does, a recomputed value is cached, so a tensor read by several gradients is recomputed once,
    and it is dropped as soon as the last of them has it.
    """

    __slots__ = ("fn", "args", "autocast", "uses", "cached", "active", "packed_args")

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple, autocast: tuple | None) -> None:
        self.fn, self.args, self.autocast = fn, args, autocast
        self.uses = 0
        self.cached: torch.Tensor | None = None
        self.active = False
        self.packed_args: tuple | None = None

    def use(self, outer: tuple[Callable, Callable] | None) -> None:
        if not self.active:
            self.active = True
            # what is kept instead of the tensor are the recipe's inputs: the enclosing hooks (offload, the
            # planner's tracker) see them as saved tensors
            self.packed_args = tuple(
                a if isinstance(a, _Recipe) else (outer[1], outer[0](a)) if outer else (None, a)
                for a in self.args
            )
            for a in self.args:
                if isinstance(a, _Recipe):
                    a.use(outer)
        self.uses += 1

    def release(self) -> None:
        self.uses -= 1
        if self.uses <= 0:
            self.cached = None
            if self.active:
                self.active = False
                for a in self.args:
                    if isinstance(a, _Recipe):
                        a.release()

    def value(self) -> torch.Tensor:
        if self.cached is not None:
            return self.cached
        args = [
            a.value() if isinstance(a, _Recipe) else (a[0](a[1]) if a[0] is not None else a[1])
            for a in self.packed_args
        ]
        with torch.no_grad(), _autocast(self.autocast):
            out = self.fn(*args)
        if self.uses > 1:
            self.cached = out
        return out


def _autocast(state: tuple | None):
    if state is None:
        return contextlib.nullcontext()
    device_type, dtype = state
    return torch.autocast(device_type, dtype=dtype)


class Derived:
    """Saved-tensor hooks that replace registered tensors by a recipe to recompute them in backward.

    Storages are the key (``id(t.untyped_storage())``: torch keeps one Python object per live storage, on real
    and fake tensors alike), so a view of a registered tensor that an op saves (``linear`` flattens its input
    to 2-D) is found too; it is rebuilt as the same view of the recomputed tensor. A registered tensor that
    is an input of another recipe is referenced by its recipe, so neither is kept. Other tensors go to the
    enclosing hooks (activation offload, the planner's tracker), as if these hooks were not there.
    """

    def __init__(self) -> None:
        self._recipes: dict[int, tuple[weakref.ref, _Recipe]] = {}
        self._outer: tuple[Callable, Callable] | None = None

    def register(self, out: torch.Tensor, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> None:
        """Declare ``out == fn(*args)`` (contiguous, recomputed under the autocast state of this call)."""
        if not torch.is_grad_enabled() or not out.is_contiguous():
            return
        st = out.untyped_storage()
        if any(id(a.untyped_storage()) == id(st) for a in args):
            return  # an in-place or identity result: nothing to gain
        device = out.device.type
        state = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        recipe = _Recipe(fn, tuple(self._recipe_of(a) or a for a in args), state)
        key = id(st)
        self._recipes[key] = (weakref.ref(st, lambda _r, k=key: self._recipes.pop(k, None)), recipe)

    def _recipe_of(self, t: torch.Tensor) -> _Recipe | None:
        entry = self._recipes.get(id(t.untyped_storage())) if t.layout == torch.strided else None
        if entry is None or entry[0]() is None or not t.is_contiguous() or t.storage_offset() != 0:
            return None
        return entry[1]

    @contextlib.contextmanager
    def hooks(self):
        # only the innermost saved-tensor hooks run: the tensors not registered here go to the enclosing ones
        self._outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            self._outer = None
            self._recipes.clear()

    def _pack(self, t: torch.Tensor) -> Any:
        entry = self._recipes.get(id(t.untyped_storage())) if t.layout == torch.strided else None
        outer = self._outer
        if entry is None or entry[0]() is None:
            return ("kept", outer[1], outer[0](t)) if outer is not None else ("kept", None, t)
        recipe = entry[1]
        recipe.use(outer)
        return ("derived", recipe, t.size(), t.stride(), t.storage_offset())

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if packed[0] == "kept":
            _, unpack, inner = packed
            return unpack(inner) if unpack is not None else inner
        _, recipe, size, stride, offset = packed
        full = recipe.value()
        recipe.release()
        return full.as_strided(size, stride, offset)


# --------------------------------------------------------------------------- patched module forwards


def _body(fn: Callable) -> str:
    src = textwrap.dedent(inspect.getsource(fn))
    return "\n".join(line.strip() for line in src.splitlines()[1:] if line.strip() and '"""' not in line)


_LLAMA_NORM_BODY = "\n".join(
    [
        "input_dtype = hidden_states.dtype",
        "hidden_states = hidden_states.to(torch.float32)",
        "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
        "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
        "return self.weight * hidden_states.to(input_dtype)",
    ]
)
_LLAMA_MLP_BODY = "\n".join(
    [
        "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
        "return down_proj",
    ]
)
_known_bodies: dict[type, str] = {}


def _is(module: nn.Module, body: str) -> bool:
    cls = type(module)
    if cls not in _known_bodies:
        try:
            _known_bodies[cls] = _body(cls.forward)
        except (OSError, TypeError):
            _known_bodies[cls] = ""
    return _known_bodies[cls] == body


def _to_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def _norm_out(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x.to(torch.float32) * rstd).to(x.dtype)


def _lean_rmsnorm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    derived: Derived | None = getattr(self, "_fitune_derived", None)
    input_dtype = hidden_states.dtype
    x = hidden_states
    hidden_states = hidden_states.to(torch.float32)
    if derived is not None and input_dtype != torch.float32:
        derived.register(hidden_states, _to_fp32, x)  # the fp32 copy pow and mul keep: half the bytes
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(variance + self.variance_epsilon)
    hidden_states = hidden_states * rstd
    out = self.weight * hidden_states.to(input_dtype)
    if derived is not None and out.dtype == input_dtype:
        derived.register(out, _norm_out, x, rstd, self.weight)  # read by the adapters of every projection
    return out


def _act_mul(act_fn: Callable, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return act_fn(g) * u


def _lean_mlp(self, x: torch.Tensor) -> torch.Tensor:
    # each tensor is registered before any op can save it
    derived: Derived | None = getattr(self, "_fitune_derived", None)
    recompute = getattr(self, "_fitune_recompute_projections", ()) if derived is not None else ()
    gate = self.gate_proj(x)
    if (
        "gate" in recompute
    ):  # the widest activations of the layer, recomputed from the (recomputed) norm output
        derived.register(gate, self.gate_proj, x)
    act = self.act_fn(gate)  # keeps gate
    if derived is not None:
        derived.register(act, self.act_fn, gate)
    up = self.up_proj(x)
    if "up" in recompute:
        derived.register(up, self.up_proj, x)
    h = act * up  # keeps act and up
    if derived is not None:
        derived.register(h, partial(_act_mul, self.act_fn), gate, up)
    return self.down_proj(h)  # down_proj's adapter keeps h


def install(
    model: nn.Module,
    derived: Derived,
    *,
    recompute_mlp: bool | str = False,
    installed: Installed | None = None,
) -> list[str]:
    """Patch the Llama-family norms and gated MLPs of ``model``; returns the patched class names.

    ``recompute_mlp`` also recomputes the MLP's up projection (``"up"``) or its gate and up projections
    (``True``) in backward instead of keeping them: one or two matrix multiplies per layer. Each patch is
    recorded in ``installed``, to be checked later."""
    projections = {False: (), "up": ("up",), True: ("gate", "up")}[recompute_mlp]
    patched: set[str] = set()
    for name, module in model.named_modules():
        if _is(module, _LLAMA_NORM_BODY):
            forward = _lean_rmsnorm
        elif _is(module, _LLAMA_MLP_BODY):
            forward = _lean_mlp
            module._fitune_recompute_projections = projections
        else:
            continue
        module.forward = types.MethodType(forward, module)
        module._fitune_derived = derived
        patched.add(type(module).__name__)
        if installed is not None:
            where = f"{name} ({type(module).__name__})"
            installed.add(
                "train.lean_activations", "the lean forward", where, is_bound(module, "forward", forward)
            )
    return sorted(patched)


# --------------------------------------------------------------------------- fused linear cross-entropy


def chunk_loss_sum_(z_CV: torch.Tensor, t_C: torch.Tensor):
    """Summed cross-entropy of one chunk's fp32 logits ``z_CV`` against ``t_C`` (IGNORE skipped), computed in
    place: ``z_CV`` is overwritten with exp(z - row max), so the chunk needs no second logits-sized tensor.
    Returns the sum and what a gradient needs: exp(z - max) (``z_CV``'s storage), its row sums, the valid
    mask and the gather index."""
    valid_C = t_C != IGNORE
    safe_C1 = torch.where(valid_C, t_C, 0).unsqueeze(1)
    z_t_C = z_CV.gather(1, safe_C1).squeeze(1)
    max_C1 = z_CV.amax(dim=1, keepdim=True)
    p_CV = z_CV.sub_(max_C1).exp_()  # in place: the logits are not needed any more
    sum_C1 = p_CV.sum(dim=1, keepdim=True)
    lse_C = (max_C1 + sum_C1.log()).squeeze(1)
    return torch.where(valid_C, lse_C - z_t_C, 0.0).sum(), p_CV, sum_C1, valid_C, safe_C1


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over targets of the cross-entropy of ``hidden @ weight.T`` (fp32 logits), in chunks of C tokens.

    The gradients are computed during the forward pass, chunk by chunk (softmax minus the one-hot target,
    times the head), and scaled by the incoming gradient in backward: the same FLOPs as the plain loss,
    none recomputed, and only one chunk's logits alive at a time.
    """

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, chunk, cap, compute_dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cd = compute_dtype or hidden_ND.dtype
        with torch.autocast(hidden_ND.device.type, enabled=False):
            w_VD = weight_VD.to(cd)
            total = torch.zeros((), dtype=torch.float32, device=hidden_ND.device)
            grad_h_ND = torch.empty_like(hidden_ND) if need_h else None
            grad_w_VD = torch.zeros_like(weight_VD, dtype=torch.float32) if need_w else None
            for start in range(0, hidden_ND.shape[0], chunk):
                h_CD = hidden_ND[start : start + chunk].to(cd)
                t_C = targets_N[start : start + chunk]
                z_CV = (h_CD @ w_VD.T).float()
                th_CV = None
                if cap:
                    th_CV = torch.tanh(z_CV / cap)
                    z_CV = th_CV * cap
                loss, p_CV, sum_C1, valid_C, safe_C1 = chunk_loss_sum_(z_CV, t_C)
                total = total + loss
                if not (need_h or need_w):
                    continue
                p_CV.div_(sum_C1)  # softmax; minus one at the target; nothing for ignored tokens
                p_CV.scatter_add_(1, safe_C1, -valid_C.unsqueeze(1).to(p_CV.dtype))
                p_CV.mul_(valid_C.unsqueeze(1))
                if th_CV is not None:
                    p_CV.mul_(1 - th_CV * th_CV)
                g_CV = p_CV.to(cd)
                del p_CV, z_CV, th_CV
                if need_h:
                    grad_h_ND[start : start + chunk] = g_CV @ w_VD
                if need_w:
                    grad_w_VD += (g_CV.T @ h_CD).float()
        ctx.save_for_backward(*(t for t in (grad_h_ND, grad_w_VD) if t is not None))
        ctx.which = (need_h, need_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.which
        grad_h = saved.pop(0) * grad_out if need_h else None
        grad_w = saved.pop(0) * grad_out if need_w else None
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    chunk: int,
    cap: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Summed token cross-entropy of the head ``weight_VD`` over ``hidden_ND``; see ``_LinearCrossEntropy``."""
    return _LinearCrossEntropy.apply(hidden_ND, weight_VD, targets_N, chunk, cap, compute_dtype)
