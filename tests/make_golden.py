"""Generate tests/data/golden_torch.npz: inputs, options, and PyTorch's loss and gradient.

    pip install torch==2.13.0 && python tests/make_golden.py

Every case records torch.nn.functional.cross_entropy's value and the gradient of
``sum(grad_output * loss)`` with respect to the input (grad_output random for reduction='none',
a random scalar otherwise), so torch parity is checked by tests/test_core_parity.py even where torch
is not installed. The grid: class-index and probability targets x unbatched/2-D/3-D/4-D/5-D inputs
x weight x ignore_index (default with ignored rows, in range) x reduction x label_smoothing
(0, 0.1, 1) in float32 and float64, plus non-finite logits, all-ignored and empty batches.
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


def main():
    import torch

    rng = np.random.default_rng(20261124)
    arrays, index = {}, []
    for i, case in enumerate(cases(rng)):
        x = torch.tensor(case["x"], requires_grad=True)
        t = torch.tensor(case["t"])
        w = None if case["weight"] is None else torch.tensor(case["weight"])
        loss = torch.nn.functional.cross_entropy(
            x, t, weight=w, ignore_index=case["ignore_index"], reduction=case["reduction"],
            label_smoothing=case["label_smoothing"])
        if case["reduction"] == "none":
            go = rng.standard_normal(tuple(loss.shape)).astype(case["dtype"])
        else:
            go = np.asarray(rng.uniform(0.5, 2.0), dtype=case["dtype"])
        (loss * torch.tensor(go)).sum().backward()
        arrays[f"{i}/x"] = case["x"]
        arrays[f"{i}/t"] = case["t"]
        if case["weight"] is not None:
            arrays[f"{i}/weight"] = case["weight"]
        arrays[f"{i}/grad_output"] = go
        arrays[f"{i}/loss"] = loss.detach().numpy()
        arrays[f"{i}/grad"] = x.grad.numpy()
        index.append({k: case[k] for k in ("dtype", "ignore_index", "reduction", "label_smoothing",
                                           "tag")})
    arrays["index"] = np.array(json.dumps(dict(torch=torch.__version__, cases=index)))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {len(index)} cases to {OUT} ({os.path.getsize(OUT) / 1024:.0f} KiB), "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
