"""The LM head's GEMM paths (numbaxent/linear.py): `grad_weight` accumulated by BLAS itself
(`beta = 1` through NumPy's bundled OpenBLAS) or through the temporary of the fallback, and
`grad_hidden` from the direct or the transposed product (by the BLAS thread count), over hidden states in C order, Fortran order and with
ignored rows (gathered chunks). Expected values: float64 NumPy products of the float64 naive
cross-entropy's gradient (tests/naive.py), never numbaxent's own core."""
from __future__ import annotations

import numpy as np
import pytest

import numbaxent as nx
from numbaxent import linear
from naive import naive_cross_entropy
from test_core_parity import assert_close

N, H, V, CHUNK = 41, 24, 50, 8


@pytest.mark.parametrize("blas_threads", [1, 2])  # grad_hidden: G @ W, or (W.T @ G.T).T
@pytest.mark.parametrize("layout", ["C", "F", "ignored"])
@pytest.mark.parametrize("path", ["blas", "temporary"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_paths_match_the_float64_products(monkeypatch, dtype, path, layout, blas_threads):
    calls = []
    monkeypatch.setattr(linear, "_blas_threads", lambda: blas_threads)
    monkeypatch.setattr(linear, "VOCAB_BLOCK", 16)  # several blocks, a short last one
    if path == "temporary":
        monkeypatch.setattr(linear, "_cblas_gemm", lambda dt: None)
    else:
        gemm = linear._cblas_gemm(np.dtype(dtype))
        if gemm is None:
            pytest.skip("NumPy's bundled BLAS is not reachable in this NumPy build")

        def counting(dt):
            def call(*args):
                calls.append(args[3:6])  # M, N, K
                return gemm(*args)
            return call
        monkeypatch.setattr(linear, "_cblas_gemm", counting)
    rng = np.random.default_rng(11)
    h = rng.standard_normal((N, H)).astype(dtype)
    if layout == "F":
        h = np.asfortranarray(h)
    w = (rng.standard_normal((V, H)) * 0.3).astype(dtype)
    t = rng.integers(0, V, N)
    if layout == "ignored":
        t[[0, 5, 6, 20]] = -100
    loss, gh, gw, _ = nx.linear_cross_entropy_with_grad(h, w, t, chunk_size=CHUNK)
    h64, w64 = h.astype(np.float64), w.astype(np.float64)
    ref_loss, G = naive_cross_entropy(h64 @ w64.T, t)
    assert_close(loss, ref_loss, dtype)
    assert_close(gh, G @ w64, dtype, 64)
    assert_close(gw, G.T @ h64, dtype, 64)
    if path == "blas":
        kept = int(np.count_nonzero(t != -100))
        chunks = -(-kept // CHUNK)
        # Fortran-order rows cannot be handed to BLAS as row-major: the temporary path instead
        expected = [] if layout == "F" else [(min(16, V - v0), H, min(CHUNK, kept - i * CHUNK))
                                              for i in range(chunks) for v0 in range(0, V, 16)]
        assert calls == expected
