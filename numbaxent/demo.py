"""`numbaxent demo`: train a small NumPy multilayer perceptron with numbaxent's loss and gradient.

Data: the 8x8 handwritten digits (1,797 images, 10 classes) that ship inside scikit-learn
(`sklearn.datasets.load_digits`, a copy of the UCI "Optical Recognition of Handwritten Digits" test
set, E. Alpaydin and C. Kaynak, 1998; distributed with scikit-learn under its BSD-3-Clause licence;
the UCI original under CC BY 4.0). Nothing is downloaded.

Model: 64 -> hidden -> hidden -> 10, ReLU, written in plain NumPy, trained with Adam on mini-batches;
the loss and its gradient with respect to the logits come from
`numbaxent.cross_entropy_with_grad` with label smoothing, computed in place over the logits.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import numbaxent as nx


def load_data(seed: int, test_fraction: float = 0.2):
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - exercised by hand
        raise SystemExit("numbaxent demo needs scikit-learn: pip install 'numbaxent[demo]'")
    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):  # stratified split
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, int(round(len(idx) * test_fraction)), replace=False)] = True
    mean, std = x[~test].mean(0), x[~test].std(0) + 1e-3
    x = (x - mean) / std
    return x[~test], y[~test], x[test], y[test]


class MLP:
    """Two hidden ReLU layers; parameters and Adam state as plain float32 arrays."""

    def __init__(self, sizes, rng):
        self.params = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            w = rng.standard_normal((fan_in, fan_out)).astype(np.float32) * np.sqrt(2.0 / fan_in)
            self.params += [w, np.zeros(fan_out, np.float32)]
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.t = 0

    def forward(self, x):
        acts = [x]
        h = x
        n_layers = len(self.params) // 2
        for i in range(n_layers):
            h = h @ self.params[2 * i] + self.params[2 * i + 1]
            if i < n_layers - 1:
                h = np.maximum(h, 0)
            acts.append(h)
        return acts

    def backward(self, acts, grad_logits):
        grads = [None] * len(self.params)
        g = grad_logits
        for i in reversed(range(len(self.params) // 2)):
            grads[2 * i] = acts[i].T @ g
            grads[2 * i + 1] = g.sum(0)
            if i:
                g = (g @ self.params[2 * i].T) * (acts[i] > 0)
        return grads

    def adam_step(self, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.t += 1
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= lr * (m / c1) / (np.sqrt(v / c2) + eps)


def accuracy(model, x, y):
    return float(np.mean(model.forward(x)[-1].argmax(1) == y))


def train(epochs=30, batch_size=64, hidden=128, lr=2e-3, label_smoothing=0.1, seed=0, out=print):
    """Train and return the history: a list of per-epoch dicts."""
    xtr, ytr, xte, yte = load_data(seed)
    rng = np.random.default_rng(seed)
    model = MLP([xtr.shape[1], hidden, hidden, 10], rng)
    t0 = time.perf_counter()
    nx.cross_entropy_with_grad(np.zeros((2, 10), np.float32), np.array([0, 1]))
    out(f"kernels ready in {time.perf_counter() - t0:.2f} s (compiled on the first run, then "
        f"loaded from the on-disk cache)")
    out(f"digits: {len(ytr)} train / {len(yte)} test images, MLP 64-{hidden}-{hidden}-10, "
        f"Adam lr={lr}, batch {batch_size}, label_smoothing={label_smoothing}, seed {seed}")
    out(f"{'epoch':>5} {'loss':>8} {'train acc':>9} {'test acc':>8} {'time s':>7} {'in loss':>7}")
    history = []
    for epoch in range(1, epochs + 1):
        t_epoch = time.perf_counter()
        t_loss = 0.0
        order = rng.permutation(len(ytr))
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            acts = model.forward(xtr[idx])
            logits = acts[-1]
            t1 = time.perf_counter()
            # the gradient overwrites the logits: no extra (batch, classes) array
            loss, grad = nx.cross_entropy_with_grad(logits, ytr[idx],
                                                    label_smoothing=label_smoothing, out=logits)
            t_loss += time.perf_counter() - t1
            model.adam_step(model.backward(acts, grad), lr)
            total += float(loss) * len(idx)
            count += len(idx)
        elapsed = time.perf_counter() - t_epoch
        row = dict(epoch=epoch, loss=total / count, train_acc=accuracy(model, xtr, ytr),
                   test_acc=accuracy(model, xte, yte), time=elapsed, loss_share=t_loss / elapsed)
        history.append(row)
        out(f"{epoch:5d} {row['loss']:8.4f} {row['train_acc']:9.4f} {row['test_acc']:8.4f} "
            f"{elapsed:7.3f} {100 * row['loss_share']:6.1f}%")
    return history


def plot(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(ep, [h["loss"] for h in history], marker=".")
    a1.set(xlabel="epoch", ylabel="training loss (label smoothing 0.1)", title="loss")
    a2.plot(ep, [h["train_acc"] for h in history], marker=".", label="train")
    a2.plot(ep, [h["test_acc"] for h in history], marker=".", label="test")
    a2.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0.8, 1.0))
    a2.legend()
    fig.suptitle("NumPy MLP on the 8x8 digits, loss and gradient by numbaxent")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="numbaxent demo",
                                 description=__doc__.splitlines()[0].replace("``", ""))
    ap.add_argument("--epochs", type=int, default=30,
                    help="passes over the training images (80%% of the 1,797 digits) (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=64,
                    help="images per Adam step (default: %(default)s)")
    ap.add_argument("--hidden", type=int, default=128,
                    help="units in each of the two hidden ReLU layers (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=2e-3,
                    help="Adam learning rate (default: %(default)s)")
    ap.add_argument("--label-smoothing", type=float, default=0.1,
                    help="label_smoothing of the cross-entropy, in [0, 1] (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the train/test split, the initial weights and the batch order "
                         "(default: %(default)s)")
    ap.add_argument("--plot", metavar="FILE.png",
                    help="also write the loss and accuracy curves to FILE.png (needs matplotlib)")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.hidden < 1:
        ap.error("--epochs, --batch-size and --hidden must be positive")
    t0 = time.perf_counter()
    history = train(args.epochs, args.batch_size, args.hidden, args.lr, args.label_smoothing,
                    args.seed)
    if args.plot:
        plot(history, args.plot)
        print(f"plot written to {args.plot}")
    print(f"final test accuracy: {history[-1]['test_acc']:.4f} "
          f"({time.perf_counter() - t0:.1f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
