"""PyTorch drop-in: `nn.CrossEntropyLoss` and `F.cross_entropy` backed by numbaxent's kernels.

Optional: importing this module imports torch; the core never does. CPU tensors only. Tensors are
shared with NumPy without copies (`Tensor.numpy()` / `torch.from_numpy`); the forward keeps the
row statistics numbaxent's backward needs, and the backward writes `grad_input` in one pass.

    from numbaxent.torch import CrossEntropyLoss
    criterion = CrossEntropyLoss(label_smoothing=0.1)       # same constructor as torch's
    loss = criterion(logits, target); loss.backward()

Every core option works (`weight`, `ignore_index`, `reduction`, `label_smoothing`,
class-index or probability targets, any input rank) plus the keyword-only extras `z_loss` and
`softcap`. Gradients flow to the input and to a probability target that requires grad (not to
`weight`). Tensors are kept with `ctx.save_for_backward`, so modifying the logits in place
between forward and backward raises PyTorch's usual error. Double backward
(`create_graph=True`) computes the gradient with PyTorch operations instead of the kernels, so
that it can be differentiated again.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _api, _prepare

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


def _as_tensor(a: np.ndarray, dtype_from: torch.Tensor) -> torch.Tensor:
    """`a` as a tensor without a copy; a bfloat16 result (when `dtype_from` is bfloat16, `a` then
    holds `ml_dtypes.bfloat16`) goes through its 16-bit pattern, which torch cannot import."""
    if dtype_from.dtype == torch.bfloat16:
        bits = np.ascontiguousarray(a).view(np.int16).reshape(a.shape)  # (0-d stays 0-d)
        return torch.from_numpy(bits).view(torch.bfloat16)
    return torch.from_numpy(a)


def _weight_array(weight, x: np.ndarray):
    return None if weight is None else _as_numpy(weight, "weight").astype(x.dtype, copy=False)


def _prepared(input, target, weight, options):
    """numbaxent's canonical views of the tensors (no copy where the layout allows)."""
    x = _as_numpy(input, "input")
    return _prepare.prepare(x, _as_numpy(target, "target"), _weight_array(weight, x), *options)


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap):
        options = (ignore_index, reduction, label_smoothing, z_loss, softcap)
        p = _prepared(input, target, weight, options)
        loss_rows, row_max, row_logsum, _, blocks = _api.kernel_pass(
            p, _prepare.kernels().FORWARD, np.ones(1), np.empty((1, 1, 1), dtype=p.x3.dtype))
        # Everything backward reads goes through save_for_backward: autograd frees it after the
        # backward (unless retain_graph) and checks that nothing was modified in place meanwhile.
        ctx.save_for_backward(input, target, weight, torch.from_numpy(row_max),
                              torch.from_numpy(row_logsum))
        ctx.options = options
        return _as_tensor(np.asarray(_api.reduce_losses(p, loss_rows, blocks)), input)

    @staticmethod
    def backward(ctx, grad_output):
        # (saved_tensors runs PyTorch's in-place version check)
        input, target, weight, row_max, row_logsum = ctx.saved_tensors
        need_x, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            # create_graph=True: the gradient must itself be differentiable, so it is written with
            # PyTorch operations (second derivatives as PyTorch's); the kernels serve first order
            gx, gt = _differentiable_grads(input, target, weight, ctx.options, grad_output,
                                           need_x, need_t)
        else:
            # O(rows): widen half-precision upstream gradients (the kernels compute in float32)
            go = _as_numpy(grad_output if grad_output.dtype in (torch.float32, torch.float64)
                           else grad_output.float(), "grad_output")
            p = _prepared(input, target, weight, ctx.options)  # O(rows): views, target checks
            gx, gt = _api.backward_pass(p, row_max.numpy(), row_logsum.numpy(),
                                        go if go.ndim else go.item(),
                                        input_grad=need_x, target_grad=need_t)
            gx = None if gx is None else _as_tensor(gx, input)
            gt = None if gt is None else _as_tensor(gt, target)
        return gx, gt, None, None, None, None, None, None


def _differentiable_grads(x, t, weight, options, go, need_x, need_t):
    r"""numbaxent's gradients written with differentiable PyTorch operations (double backward).

    With $z$ the (soft-capped) logits, $\log p = \operatorname{log\_softmax}(z)$,
    $G = \partial \ell / \partial \log p$ ($-w\tilde t$ for probability targets,
    $-v[(1-\varepsilon) w_y \mathbb 1_y + \frac{\varepsilon}{C} w]$ for class indices) and
    $g$ the upstream gradient (over the `'mean'` denominator):
    $\partial/\partial z = g\,(G - p \sum_c G_c + 2\zeta v\,\operatorname{lse}(z)\, p)$,
    times $1 - \tanh^2(x/s)$ under a soft-cap $s$; and for a probability target
    $\partial/\partial t = -g\,(1-\varepsilon)\, w \log p$.
    Half types are computed in float32, as the kernels do."""
    ignore_index, reduction, eps, z_loss, cap = options
    eps = float(eps)
    cdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    cls = 0 if x.dim() == 1 else 1
    C = x.shape[cls]
    bshape = [1] * x.dim()
    bshape[cls] = C
    w = (torch.ones(C, dtype=cdt) if weight is None else weight.detach().to(cdt)).view(bshape)
    xc = x.to(cdt)
    zc = cap * torch.tanh(xc / cap) if cap is not None else xc
    logp = torch.log_softmax(zc, cls)
    p = logp.exp()
    if t.shape == x.shape:  # probability target (numbaxent's and PyTorch's test)
        tc = t.to(cdt)
        G = -(w * (tc * (1 - eps) + eps / C if eps > 0 else tc))
        valid = None
        denom = math.prod(s for i, s in enumerate(x.shape) if i != cls)
    else:
        y = t.long()
        valid = (y != ignore_index).unsqueeze(cls) if y.dim() else (y != ignore_index)
        ys = torch.where(y != ignore_index, y, 0)
        onehot = torch.nn.functional.one_hot(ys, C).movedim(-1, cls).to(cdt)
        wy = (w * onehot).sum(cls, keepdim=True) * valid  # w[y] on kept elements, 0 elsewhere
        G = -((1 - eps) * wy * onehot + (eps / C) * w * valid)
        denom = wy.sum()
    g = go.to(cdt)
    if reduction == "mean":
        g = g / denom
    g = g.unsqueeze(cls) if g.dim() else g
    gx = gt = None
    if need_x:
        dz = G - p * G.sum(cls, keepdim=True)
        if z_loss:
            zt = 2 * z_loss * torch.logsumexp(zc, cls, keepdim=True) * p
            dz = dz + (zt if valid is None else zt * valid)
        if cap is not None:
            dz = dz * (1 - torch.tanh(xc / cap) ** 2)
        gx = (g * dz).to(x.dtype)
    if need_t:
        gt = (-(g * w * logp) * (1 - eps)).to(t.dtype)
    return gx, gt


@torch.compiler.disable
def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None):
    """`torch.nn.functional.cross_entropy` with numbaxent's forward and backward.

    Same arguments as PyTorch's, plus `z_loss` and `softcap` (keyword-only, as in
    [`numbaxent.cross_entropy`][numbaxent.cross_entropy]). CPU tensors only; the gradient flows to
    `input` and to a probability `target` that requires grad, not to `weight`.
    """
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("numbaxent.torch.cross_entropy expects torch tensors")
    if input.dtype not in _DTYPES:
        raise TypeError(f"cross_entropy: expected a floating point input, got {input.dtype}")
    if isinstance(weight, torch.Tensor) and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("numbaxent.torch does not compute a gradient with respect to weight; "
                         "detach it (weight.requires_grad is True)")
    if size_average is not None or reduce is not None:
        reduction = _prepare.legacy_reduction(size_average, reduce)
    return _CrossEntropyFunction.apply(input, target, weight, ignore_index, reduction,
                                       label_smoothing, z_loss, softcap)


class CrossEntropyLoss(torch.nn.Module):
    """`torch.nn.CrossEntropyLoss` with numbaxent's kernels (same constructor, plus `z_loss` and
    `softcap` keyword-only); its forward calls [`cross_entropy`][numbaxent.torch.cross_entropy]."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _prepare.legacy_reduction(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _prepare.check_reduction(reduction)
        self.label_smoothing = _prepare.check_label_smoothing(label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input, target):
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap)
