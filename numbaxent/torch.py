"""PyTorch drop-in: ``nn.CrossEntropyLoss`` and ``F.cross_entropy`` backed by numbaxent's kernels.

Optional: importing this module imports torch; the core never does. CPU tensors only. Tensors are
shared with NumPy without copies (``Tensor.numpy()`` / ``torch.from_numpy``); the forward keeps the
row statistics numbaxent's backward needs, and the backward writes ``grad_input`` in one pass.

    from numbaxent.torch import CrossEntropyLoss
    criterion = CrossEntropyLoss(label_smoothing=0.1)       # same constructor as torch's
    loss = criterion(logits, target); loss.backward()

Every core option works (``weight``, ``ignore_index``, ``reduction``, ``label_smoothing``,
class-index or probability targets, any input rank) plus the keyword-only extras ``z_loss`` and
``softcap``. Gradients flow to the input only (a probability target that requires grad is an error);
double backward (differentiating the gradient again) is not supported and raises.
"""
from __future__ import annotations

import numpy as np
import torch

from . import _api

__all__ = ["cross_entropy", "CrossEntropyLoss"]

_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16}


def _as_numpy(t: torch.Tensor, name: str) -> np.ndarray:
    if t.device.type != "cpu":
        raise ValueError(f"numbaxent.torch supports CPU tensors only; {name} is on {t.device}")
    t = t.detach()
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: share the bits, as ml_dtypes does
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _as_tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    if like.dtype == torch.bfloat16:
        bits = np.ascontiguousarray(a).view(np.int16).reshape(a.shape)  # (0-d stays 0-d)
        return torch.from_numpy(bits).view(torch.bfloat16)
    return torch.from_numpy(a)


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap):
        x = _as_numpy(input, "input")
        t = _as_numpy(target, "target")
        w = None if weight is None else _as_numpy(weight, "weight").astype(x.dtype, copy=False)
        crit = _api.CrossEntropyLoss(weight=w, ignore_index=ignore_index, reduction=reduction,
                                     label_smoothing=label_smoothing, z_loss=z_loss,
                                     softcap=softcap)
        loss = crit.forward(x, t)
        ctx.crit = crit
        return _as_tensor(np.asarray(loss), input)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: a constant gradient would be silently wrong
            raise RuntimeError("numbaxent.torch.cross_entropy does not support double backward "
                               "(create_graph=True); use torch.nn.functional.cross_entropy there")
        # O(rows): widen half-precision upstream gradients (the kernels compute in float32 anyway)
        go = _as_numpy(grad_output if grad_output.dtype in (torch.float32, torch.float64)
                       else grad_output.float(), "grad_output")
        grad = ctx.crit.backward(go if go.ndim else go.item())
        ctx.crit = None  # free the saved statistics
        return _as_tensor(grad, grad_output), None, None, None, None, None, None, None


@torch.compiler.disable
def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None):
    """``torch.nn.functional.cross_entropy`` with numbaxent's forward and backward."""
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("numbaxent.torch.cross_entropy expects torch tensors")
    if input.dtype not in _DTYPES:
        raise TypeError(f"cross_entropy: expected a floating point input, got {input.dtype}")
    if target.requires_grad:
        raise ValueError("numbaxent.torch computes the gradient with respect to the input only; "
                         "detach the probability target (target.requires_grad is True)")
    if size_average is not None or reduce is not None:
        reduction = _api.legacy_reduction(size_average, reduce)
    return _CrossEntropyFunction.apply(input, target, weight, ignore_index, reduction,
                                       label_smoothing, z_loss, softcap)


class CrossEntropyLoss(torch.nn.Module):
    """``torch.nn.CrossEntropyLoss`` with numbaxent's kernels (same constructor, plus ``z_loss`` and
    ``softcap`` keyword-only)."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _api.legacy_reduction(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _api._check_reduction(reduction)
        self.label_smoothing = _api._check_label_smoothing(label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input, target):
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap)
