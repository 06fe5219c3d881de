"""numbaxent.torch.cross_entropy on PyTorch's own OpInfo samples for
``nn.functional.cross_entropy`` (the inputs PyTorch's test suite uses for the op): value and
gradients (input, and a probability target that requires grad) against
torch.nn.functional.cross_entropy in every dtype the OpInfo lists for the CPU, then gradcheck and
gradgradcheck on the float64 samples."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: the drop-in needs it")
pytest.importorskip("expecttest", reason="PyTorch's OpInfo database needs expecttest")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

import numbaxent.torch as nt  # noqa: E402

F = torch.nn.functional
OPS = [op for op in op_db if op.name == "nn.functional.cross_entropy"]
DTYPES = sorted({dt for op in OPS for dt in op.supported_dtypes("cpu")}, key=str)

# float32 and float64 as the other parity tests. The half types: numbaxent computes in float32 and
# rounds once, PyTorch rounds its intermediate results to the half type too, so the tolerance is a
# few units of the half type's precision (2**-11 for float16, 2**-8 for bfloat16) at the values'
# scale (logits in [-9, 9]).
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.float16: dict(rtol=5e-3, atol=5e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _samples(dtype):
    return [(op, s) for op in OPS for s in op.sample_inputs("cpu", dtype, requires_grad=True)]


def _id(sample):
    target = sample.args[0]
    kind = "probs" if target.is_floating_point() else "index"
    kw = ",".join(f"{k}={'tensor' if isinstance(v, torch.Tensor) else v}"
                  for k, v in sample.kwargs.items())
    return f"{tuple(sample.input.shape)}-{kind}-{kw}"


def _loss_and_grads(fn, sample, target_grad=None):
    x = sample.input.detach().clone().requires_grad_()
    target = sample.args[0]
    target_grad = target.requires_grad if target_grad is None else target_grad
    t = target.detach().clone().requires_grad_(target_grad)
    loss = fn(x, t, *sample.args[1:], **sample.kwargs)
    # a fixed, non-uniform upstream gradient (so 'none' is not only checked through its sum)
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    ins = (x, t) if t.requires_grad else (x,)
    grads = torch.autograd.grad(loss, ins, go)
    return loss.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_first_order_matches_torch(dtype):
    samples = _samples(dtype)
    assert samples, "the OpInfo produced no samples"
    n_target_grads = 0
    for op, sample in samples:
        loss, grads = _loss_and_grads(nt.cross_entropy, sample)
        ref_loss, ref_grads = _loss_and_grads(F.cross_entropy, sample)
        msg = _id(sample)
        assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape, msg
        torch.testing.assert_close(loss, ref_loss, **TOL[dtype], msg=lambda m: f"{msg}: {m}")
        assert len(grads) == len(ref_grads), msg
        n_target_grads += len(grads) - 1
        for g, r in zip(grads, ref_grads):
            assert g.dtype == r.dtype and g.shape == r.shape, msg
            torch.testing.assert_close(g, r, **TOL[dtype], msg=lambda m: f"{msg}: {m}")
    assert n_target_grads > 0  # the samples include probability targets that require grad


# numbaxent rounds half-type results once from float32/float64: against PyTorch in float64 on the
# same (already rounded) inputs, the error is one rounding (2**-11 or 2**-8 relative).
ONE_ROUNDING = {torch.float16: dict(rtol=2**-10, atol=1e-5),
                torch.bfloat16: dict(rtol=2**-7, atol=1e-4)}


@pytest.mark.parametrize("dtype", [dt for dt in DTYPES if dt in ONE_ROUNDING], ids=str)
def test_half_types_are_rounded_once(dtype):
    for op, sample in _samples(dtype):
        loss, grads = _loss_and_grads(nt.cross_entropy, sample)
        wide = sample.transform(lambda a: a.double() if isinstance(a, torch.Tensor)
                                and a.is_floating_point() else a)
        ref_loss, ref_grads = _loss_and_grads(F.cross_entropy, wide, sample.args[0].requires_grad)
        msg = _id(sample)
        assert len(grads) == len(ref_grads), msg
        for a, b in zip((loss,) + grads, (ref_loss,) + ref_grads):
            torch.testing.assert_close(a.double(), b, **ONE_ROUNDING[dtype],
                                       msg=lambda m: f"{msg}: {m}")


def _float64_cases():
    cases = []
    for op, sample in _samples(torch.float64):
        target = sample.args[0]
        kwargs = dict(sample.kwargs)
        inputs = [sample.input.detach().clone().requires_grad_()]
        if target.requires_grad:
            inputs.append(target.detach().clone().requires_grad_())

            def fn(x, t, kwargs=kwargs):
                return nt.cross_entropy(x, t, **kwargs)
        else:
            def fn(x, target=target.detach(), kwargs=kwargs):
                return nt.cross_entropy(x, target, **kwargs)
        cases.append(pytest.param(fn, tuple(inputs), id=_id(sample)))
    return cases


FLOAT64_CASES = _float64_cases()


@pytest.mark.parametrize("fn,inputs", FLOAT64_CASES)
def test_gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("fn,inputs", FLOAT64_CASES)
def test_gradgradcheck(fn, inputs):
    assert torch.autograd.gradgradcheck(fn, inputs)


def _second_order(fn, sample):
    """First derivatives with create_graph=True, then the derivatives of <first, v> with respect to
    the inputs and the upstream gradient (Hessian-vector products), with fixed v and upstream."""
    x = sample.input.detach().clone().requires_grad_()
    target = sample.args[0]
    t = target.detach().clone().requires_grad_(target.requires_grad)
    loss = fn(x, t, *sample.args[1:], **sample.kwargs)
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    go.requires_grad_()
    ins = (x, t) if t.requires_grad else (x,)
    first = torch.autograd.grad(loss, ins, go, create_graph=True)
    vs = [torch.linspace(-1.0, 1.0, a.numel(), dtype=a.dtype).reshape(a.shape) for a in first]
    second = torch.autograd.grad(sum((a * v).sum() for a, v in zip(first, vs)), ins + (go,),
                                 allow_unused=True)
    return first + second


def test_second_order_matches_torch():
    for op, sample in _samples(torch.float64):
        msg = _id(sample)
        ours = _second_order(nt.cross_entropy, sample)
        theirs = _second_order(F.cross_entropy, sample)
        assert len(ours) == len(theirs), msg
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, **TOL[torch.float64], msg=lambda m: f"{msg}: {m}")
