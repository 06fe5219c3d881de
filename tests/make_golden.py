"""Generate tests/data/golden_torch.npz: inputs, options, and PyTorch's loss and gradient.

    pip install torch==2.13.0 && python tests/make_golden.py

Every case records torch.nn.functional.cross_entropy's value and the gradient of
``sum(grad_output * loss)`` with respect to the input (grad_output random for reduction='none',
a random scalar otherwise), so torch parity is checked by tests/test_core_parity.py even where torch
is not installed. The grid: class-index and probability targets x unbatched/2-D/3-D/4-D/5-D inputs
x weight x ignore_index (default with ignored rows, in range) x reduction x label_smoothing
(0, 0.1, 1) in float32 and float64, plus non-finite logits, all-ignored and empty batches; then
shapes for every kernel path (C = 50 rows, K-dim with 20 positions), zero total weights, zero
classes, and float16/bfloat16 logits. bfloat16 values (inputs and PyTorch's results) are stored as
the float32 numbers they equal, since NumPy has no bfloat16.
"""
from __future__ import annotations

import itertools
import json
import os

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden_torch.npz")
C = 5
SHAPES = [(C,), (6, C), (3, C, 4), (2, C, 3, 2), (2, C, 2, 1, 2)]


def cases(rng):
    for dt, shape, soft, reduction, eps, use_w, ign in itertools.product(
            ("float64", "float32"), SHAPES, (False, True), ("none", "mean", "sum"),
            (0.0, 0.1, 1.0), (False, True), ("default", "in_range")):
        if soft and ign == "in_range":
            continue
        x = (rng.standard_normal(shape) * 2).astype(dt)
        w = rng.uniform(0.2, 2.0, C).astype(dt) if use_w else None
        ignore_index = -100 if ign == "default" else 1
        if soft:
            t = rng.dirichlet(np.ones(C), size=int(np.prod(shape)) // C).astype(dt)
            t = np.moveaxis(t.reshape((shape[0] if len(shape) > 1 else 1,) + shape[2:] + (C,)), -1,
                            1).reshape(shape)
        else:
            tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
            t = rng.integers(0, C, tshape)
            if ign == "default" and len(shape) > 1:
                t = np.where(rng.random(tshape) < 0.25, -100, t)
        yield dict(dtype=dt, x=x, t=t, weight=w, ignore_index=ignore_index, reduction=reduction,
                   label_smoothing=eps, tag="grid")
    # non-finite logits (spec section 6), all ignored, empty batches
    inf, nan = np.inf, np.nan
    special = [
        ([[-inf, -inf, -inf], [1.0, 2.0, 3.0]], [0, 1], {}),
        ([[-inf, -inf, -inf], [1.0, 2.0, 3.0]], [-100, 1], {}),
        ([[inf, 0.0, 1.0], [1.0, 2.0, 3.0]], [1, 1], {}),
        ([[nan, 0.0, 1.0], [1.0, 2.0, 3.0]], [-100, 1], {}),
        ([[-inf, 0.0, 1.0]], [1], {}),
        ([[-inf, 0.0, 1.0]], [0], {}),
        ([[-inf, 0.0, 1.0]], [1], {"label_smoothing": 0.1}),
        ([[-inf, 0.0, 1.0]], [1], {"label_smoothing": 0.1, "weight": [0.0, 1.0, 1.0]}),
        ([[1e30, -1e30, 0.0]], [1], {}),
        ([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], [-100, -100], {}),
        ([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], [-100, -100], {"label_smoothing": 0.1}),
        ([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], [0, 1], {"weight": [0.0, 0.0, 3.0]}),
        ([[-inf, 0.0, 1.0]], [[0.0, 0.5, 0.5]], {}),
    ]
    for dt in ("float64", "float32"):
        for x, t, kw in special:
            for reduction in ("none", "mean", "sum"):
                xa = np.array(x, dtype=dt)
                ta = np.array(t, dtype=dt if np.array(t).dtype.kind == "f" else np.int64)
                w = kw.get("weight")
                yield dict(dtype=dt, x=xa, t=ta, weight=None if w is None else np.array(w, dt),
                           ignore_index=-100, reduction=reduction,
                           label_smoothing=kw.get("label_smoothing", 0.0), tag="special")
        for shape in ((0, C), (2, C, 0)):
            for reduction in ("none", "mean", "sum"):
                tshape = (shape[0],) + shape[2:]
                yield dict(dtype=dt, x=np.zeros(shape, dt), t=np.zeros(tshape, np.int64),
                           weight=None, ignore_index=-100, reduction=reduction,
                           label_smoothing=0.0, tag="empty")
    # Appended after the cases above, so those keep their random draws.
    yield from kernel_path_cases(rng)
    yield from zero_weight_cases(rng)
    yield from half_cases(rng)


def kernel_path_cases(rng):
    """Shapes that take the other kernel paths: rows longer than the column kernels' limit (C = 50,
    the row kernels), K-dim with many positions (S = 20; the grid above has S <= 4); the test
    also runs every 2-D case Fortran-ordered, in place and forced through both kernel paths."""
    for dt, (shape, tag), soft, reduction, eps in itertools.product(
            ("float64", "float32"), (((6, 50), "rows"), ((2, C, 4, 5), "kdim20"), ((50,), "rows1d")),
            (False, True), ("none", "mean", "sum"), (0.0, 0.1)):
        c = shape[0] if len(shape) == 1 else shape[1]
        x = (rng.standard_normal(shape) * 2).astype(dt)
        w = rng.uniform(0.2, 2.0, c).astype(dt)
        yield dict(dtype=dt, x=x, t=_targets(rng, shape, soft, dt), weight=w, ignore_index=-100,
                   reduction=reduction, label_smoothing=eps, tag=tag)


def zero_weight_cases(rng):
    """'mean' with a total target weight of exactly 0 (zero weights; negative weights that cancel
    exactly in binary), with and without ignored rows, unbatched and batched, with smoothing 0,
    0.1 and 1; and probability targets over zero classes."""
    weights = {"zero": [0.0, 0.0, 0.0, 0.0], "cancel": [1.0, -0.5, 0.0, 2.0],
               "zero_at_targets": [0.0, 1.0, 0.0, 3.0]}
    for dt, (wtag, w), eps, layout in itertools.product(
            ("float64", "float32"), weights.items(), (0.0, 0.1, 1.0),
            ("1d", "2d", "2d_ignored", "kdim")):
        if layout == "1d":
            x = rng.standard_normal(4).astype(dt)
            t = np.array(2 if wtag != "cancel" else 2)  # class 2 has weight 0 in every set
        elif layout == "kdim":
            x = rng.standard_normal((2, 4, 3)).astype(dt)
            t = np.array([[0, 1, 2], [1, 2, 2]]) if wtag == "cancel" else np.array([[0, 2, 2],
                                                                                   [2, 0, 0]])
        else:
            x = (rng.standard_normal((5, 4)) * 2).astype(dt)
            t = np.array([0, 1, 2, 1, 2]) if wtag == "cancel" else np.array([0, 2, 2, 0, 2])
            if layout == "2d_ignored":
                t[2] = -100
        for reduction in ("mean", "sum"):
            yield dict(dtype=dt, x=x, t=t, weight=np.array(w, dt), ignore_index=-100,
                       reduction=reduction, label_smoothing=eps, tag=f"w0-{wtag}-{layout}")
    for dt, reduction, shape in itertools.product(("float64", "float32"), ("none", "mean", "sum"),
                                                  ((3, 0), (2, 0, 3))):
        yield dict(dtype=dt, x=np.zeros(shape, dt), t=np.zeros(shape, dt), weight=None,
                   ignore_index=-100, reduction=reduction, label_smoothing=0.0, tag="soft-C0")


def half_cases(rng):
    """float16 and bfloat16 logits (bfloat16 stored as float32 values that bfloat16 holds exactly;
    PyTorch's results too), through the column kernels (C = 5), the row kernels (C = 50) and K-dim."""
    for dt, shape, soft, reduction, eps in itertools.product(
            ("float16", "bfloat16"), ((6, C), (6, 50), (2, C, 4, 5)), (False, True),
            ("none", "mean", "sum"), (0.0, 0.1)):
        c = shape[1]
        x = _round_to(rng.standard_normal(shape) * 2, dt)
        w = _round_to(rng.uniform(0.2, 2.0, c), dt)
        t = _targets(rng, shape, soft, "float32")
        if soft:
            t = _round_to(t, dt)
        yield dict(dtype=dt, x=x, t=t, weight=w, ignore_index=-100, reduction=reduction,
                   label_smoothing=eps, tag="half")


def _round_to(a, dt):
    """``a`` in dtype ``dt``; for bfloat16, the float32 values that bfloat16 rounding gives."""
    import torch

    if dt != "bfloat16":
        return np.asarray(a, dt)
    return torch.tensor(np.asarray(a, np.float32)).to(torch.bfloat16).float().numpy()


def _targets(rng, shape, soft, dt):
    c = shape[0] if len(shape) == 1 else shape[1]
    if soft:
        t = rng.dirichlet(np.ones(c), size=int(np.prod(shape)) // c).astype(dt)
        return np.moveaxis(t.reshape((shape[0] if len(shape) > 1 else 1,) + shape[2:] + (c,)), -1,
                           1).reshape(shape)
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    t = rng.integers(0, c, tshape)
    if len(shape) > 1:
        t = np.where(rng.random(tshape) < 0.25, -100, t)
    return t


def _torch_tensor(a, dtype_name):
    import torch

    t = torch.tensor(a)
    return t.to(torch.bfloat16) if dtype_name == "bfloat16" and t.is_floating_point() else t


def _to_numpy(t):
    import torch

    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def main():
    import torch

    rng = np.random.default_rng(20261124)
    arrays, index = {}, []
    for i, case in enumerate(cases(rng)):
        dt = case["dtype"]
        x = _torch_tensor(case["x"], dt).requires_grad_(True)
        t = _torch_tensor(case["t"], dt)
        w = None if case["weight"] is None else _torch_tensor(case["weight"], dt)
        loss = torch.nn.functional.cross_entropy(
            x, t, weight=w, ignore_index=case["ignore_index"], reduction=case["reduction"],
            label_smoothing=case["label_smoothing"])
        # the upstream gradient in the case's dtype (bfloat16 values stored as float32)
        store = "float32" if dt == "bfloat16" else dt
        if case["reduction"] == "none":
            go = _round_to(rng.standard_normal(tuple(loss.shape)), dt).astype(store)
        else:
            go = _round_to(np.asarray(rng.uniform(0.5, 2.0)), dt).astype(store)
        (loss * _torch_tensor(go, dt)).sum().backward()
        arrays[f"{i}/x"] = case["x"]
        arrays[f"{i}/t"] = case["t"]
        if case["weight"] is not None:
            arrays[f"{i}/weight"] = case["weight"]
        arrays[f"{i}/grad_output"] = go
        arrays[f"{i}/loss"] = _to_numpy(loss)
        arrays[f"{i}/grad"] = _to_numpy(x.grad)
        index.append({k: case[k] for k in ("dtype", "ignore_index", "reduction", "label_smoothing",
                                           "tag")})
    arrays["index"] = np.array(json.dumps(dict(torch=torch.__version__, cases=index)))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {len(index)} cases to {OUT} ({os.path.getsize(OUT) / 1024:.0f} KiB), "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
