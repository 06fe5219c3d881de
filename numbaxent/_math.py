"""Math primitives shared by every kernel: a vectorisable `exp`, and loads/stores of the storage dtypes.

Why a hand-written exp: LLVM only vectorises a loop whose body it can see through. `math.exp` lowers to
a libm call (numba's SVML path is not active on these machines), so a row loop calling it runs one
element at a time. `exp` below is plain arithmetic plus a bit cast, so the loops that call it
compile to packed (AVX2/AVX-512) instructions.

Storage dtypes: Numba has no float16 or bfloat16 arrays, so the API layer passes such logits as 16-bit
integer views of the same memory (float16 -> `uint16`, bfloat16 -> `int16`); `load` widens any
storage element to its compute type (float32 for both half types) and `store` rounds a compute
value back to the storage dtype (round to nearest even).
"""
from __future__ import annotations

import operator

import numpy as np
from llvmlite import ir
from numba import types
from numba.core.imputils import impl_ret_borrowed, impl_ret_new_ref, impl_ret_untracked
from numba.core.typing import signature
from numba.extending import intrinsic, register_jitable

from ._jit import FASTMATH, HELPER_OPTIONS  # (importing _jit sets the threading layer first)

# NumPy's error model, as the kernels have: a helper compiled with Python's checks every division for
# zero, and that branch out of a loop keeps the loop from vectorising.
_PLAIN = dict(HELPER_OPTIONS, error_model="numpy")

__all__ = ["exp", "exp_nonpos", "exp_nonpos2", "exp_summand", "exp_summand2", "log", "max_skipnan", "min_int", "load",
           "store", "compute_zero", "exp_stash", "stash_in_grad", "exp_summand_bits", "exp_nonpos_bits",
           "summand_and_probe", "nonpos_and_probe", "nan_if_probed", "empty", "clear", "compute_scratch", "run_view",
           "col_run", "span", "as_compute", "one_like", "capped", "cap_slope", "rows_flat", "as_2d", "max_int",
           "storage_bits", "stored_bits", "from_storage_bits", "shuffle_classes", "transpose_group",
           "untranspose_group"]


# -- exp and log, emitted as LLVM IR --------------------------------------------------------------------
# exp and log are `@intrinsic`s: their few dozen instructions are written straight into the calling
# loop, where a Numba-compiled helper was a function of its own that Numba typed, lowered and
# LLVM optimised and linked per dtype before inlining it anyway (0.4-0.6 s of every kernel's first
# call). Every float operation carries the kernels' fast-math flags (`_jit.FASTMATH`, so that
# `a * b + c` becomes one FMA), and the operations are in the order written below.
#
# exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2] (Cody-Waite split of ln2
# so that r is exact), exp(r) = 1 + r + r^2 q(r) with q a polynomial, evaluated as one Horner chain
# 1 + r (1 + r (q_0 + r (q_1 + ...))): one FMA per degree and no separate r^2, `+ r` and `+ 1`, which
# is both cheaper (an FMA and an add fewer than `1 + r + r^2 q`) and, measured, more accurate (at
# most 0.93 ulp in float32 and 0.94 in float64 on dense samples of [-104, 0] and [-745, 0], against
# 1.04 and 1.06 for the same q summed as `1 + r + r^2 q`; `tests/test_math.py` holds them to 1 ulp).
# 2^n is built from exponent bits.
# Inputs below LO give 0, NaN stays NaN (the clamps are compares that are false for NaN), +inf is
# clamped to a finite overflow (`exp`) or never an input (`exp_nonpos`).
#
# log(x) = e ln2 + log(f), x = 2^e f with f in [sqrt(1/2), sqrt(2)) read off the bits; log(f) =
# 2 atanh(u) with u = (f - 1)/(f + 1), |u| <= 0.172, by its odd series (u^2 <= 0.0295 makes the
# truncation error ~1e-9 relative after 5 terms for float32, ~1e-18 after 12 for float64). Built for
# the row sums of exponentials (x >= 1 or NaN), it is exact to ~1 ulp for every positive normal x;
# +inf and NaN pass through.

class _Format:
    """One float format's constants for the exp and log code: LLVM types, exponent layout, the
    clamps, the power of two `2^-shift` by which `exp_nonpos` rounds into the subnormal range, and
    the polynomial coefficients (highest degree first)."""

    def __init__(self, bits, mbits, bias, lo, hi, shift, ln2_hi, ln2_lo, q, log_series):
        self.bits, self.mbits, self.bias, self.lo, self.hi, self.shift = bits, mbits, bias, lo, hi, shift
        # the lowest input whose 2^n is normal: n = round(x / ln2) >= 2 - bias (with margin)
        self.lo_normal = -(bias - 2) * 0.6931471805599453
        self.ln2_hi, self.ln2_lo, self.q, self.log_series = ln2_hi, ln2_lo, q, log_series
        self.ftype = ir.DoubleType() if bits == 64 else ir.FloatType()
        self.itype = ir.IntType(bits)


# float32: q is a near-minimax fit (Chebyshev, `python benchmarks/exp_fit.py --degree 4`) of
# (exp(r) - 1 - r) / r^2 on |r| <= ln2/2, degree 4 (exp to degree 6; max rel. error 1.0e-8, a tenth
# of float32's rounding: the degree-5 q before it cost one FMA more per element for nothing a float32
# result can show); ln2's high part has 9 significant bits, so n * ln2_hi is exact for |n| < 2^15
_F32 = _Format(32, 23, 127, -104.0, 88.7, 64, 0.693359375, -2.12194440e-4,
               (0.0013926213466332444, 0.008363202971575855, 0.04166655443768594, 0.16666576845993977,
                0.5),
               tuple(2.0 / k for k in (9.0, 7.0, 5.0, 3.0, 1.0)))
# float64: q is a near-minimax fit (Chebyshev, `python benchmarks/exp_fit.py --degree 9`) of degree 9
# on |r| <= ln2/2 (exp to degree 11): max rel. error 1.6e-17 with the coefficients rounded to
# float64. Summed as `1 + r + r^2 q` this degree measured 1.06 ulp at worst, which had kept degree 10;
# in the single Horner chain it is 0.94 ulp. ln2_hi * n is exact for |n| < 2^11
_F64 = _Format(64, 52, 1023, -746.0, 709.7, 512, 0.6931471803691238, 1.9082149292705877e-10,
               (2.5100424157005067e-08, 2.7620138719733994e-07, 2.7557268378684192e-06,
                2.480152119021773e-05, 0.00019841269863105968, 0.0013888888917281794,
                0.008333333333330051, 0.04166666666662399, 0.16666666666666669, 0.5000000000000001),
               tuple(2.0 / k for k in (25.0, 23.0, 21.0, 19.0, 17.0, 15.0, 13.0, 11.0, 9.0, 7.0, 5.0,
                                       3.0, 1.0)))
_FLAGS = tuple(sorted(FASTMATH))  # the kernels' fast-math flags, on every float operation below


class _Lanes:
    """An LLVM builder whose instructions, given tuples of values, are emitted once per member, one
    instruction for every member before the next: several independent evaluations of the same code
    interleaved instruction by instruction (see `exp_nonpos2`). Plain values pass through."""

    def __init__(self, builder):
        self._b = builder

    @property
    def module(self):
        return self._b.module

    def __getattr__(self, name):
        op = getattr(self._b, name)

        def each(*args, **kw):
            n = next((len(a) for a in args if isinstance(a, tuple)), 0)
            if not n:
                return op(*args, **kw)
            return tuple(op(*[a[i] if isinstance(a, tuple) else a for a in args], **kw) for i in range(n))
        return each


class _Emit:
    """Float arithmetic on one LLVM builder in one format, with the fast-math flags (on tuples of
    values too, with a `_Lanes` builder)."""

    def __init__(self, builder, fmt: _Format):
        self.b, self.f = builder, fmt

    def const(self, v):
        return ir.Constant(self.f.ftype, float(v))

    def int(self, v):
        return ir.Constant(self.f.itype, int(v))

    def mul(self, a, b):
        return self.b.fmul(a, b, flags=_FLAGS)

    def add(self, a, b):
        return self.b.fadd(a, b, flags=_FLAGS)

    def sub(self, a, b):
        return self.b.fsub(a, b, flags=_FLAGS)

    def horner(self, coeffs, t):
        p = self.const(coeffs[0])
        for c in coeffs[1:]:
            p = self.add(self.mul(p, t), self.const(c))
        return p

    def floor(self, a):
        fn = self.b.module.declare_intrinsic("llvm.floor", [self.f.ftype])
        return self.b.call(fn, [a])

    def lt(self, a, b):
        return self.b.fcmp_ordered("<", a, b, flags=_FLAGS)

    def as_float(self, i):
        return self.b.bitcast(i, self.f.ftype)

    def as_int(self, x):
        return self.b.bitcast(x, self.f.itype)


def _exp_reduced(e: _Emit, x):
    """`(p, n)` with `exp(x) = p * 2^n` (`n` an integer of the format's width), `x` clamped.

    `n = round(x / ln2)` by the float format's own rounding: adding `1.5 * 2^mbits` leaves `n` in
    the low mantissa bits, from which the integer is a bit cast and a subtraction (no float round
    and no float -> int conversion: AVX2 has no packed float64 -> int64 one, which kept every
    float64 exp loop scalar). Those two operations carry no fast-math flags: reassociation would
    fold `(t + R) - R` back into `t`."""
    f, b = e.f, e.b
    rnd = e.const(1.5 * 2.0 ** f.mbits)
    shifted = b.fadd(e.mul(x, e.const(1.4426950408889634)), rnd)
    n = b.fsub(shifted, rnd)
    ni = b.sub(e.as_int(shifted), e.as_int(rnd))
    r = e.sub(x, e.mul(n, e.const(f.ln2_hi)))
    r = e.sub(r, e.mul(n, e.const(f.ln2_lo)))
    return e.horner(tuple(f.q) + (1.0, 1.0), r), ni


def _pow2(e: _Emit, ni, bias):
    """The float `2^(ni + bias - format bias)` built from exponent bits."""
    return e.as_float(e.b.shl(e.b.add(ni, e.int(bias)), e.int(e.f.mbits)))


def _times_pow2_bits(e: _Emit, p, ni):
    """`p * 2^ni` by adding `ni` to the exponent field of `p`'s bits: exact, and one multiply fewer
    than `p * _pow2(...)`, where the result is a normal number; for a NaN `p` whose `ni` came from
    the NaN's payload bits, an arbitrary value (see `summand_and_probe`)."""
    return e.as_float(e.b.add(e.as_int(p), e.b.shl(ni, e.int(e.f.mbits))))


def _clamp_low(e: _Emit, x, lo):
    lo = e.const(lo)
    return e.b.select(e.lt(x, lo), lo, x)


def _emit_exp(e: _Emit, x):
    """exp for every input: 2^n applied in two halves, so results down to the subnormal range (and
    0 below it) come out right."""
    hi = e.const(e.f.hi)
    x = _clamp_low(e, x, e.f.lo)
    x = e.b.select(e.lt(hi, x), hi, x)
    p, ni = _exp_reduced(e, x)
    n1 = e.b.ashr(ni, e.int(1))
    n2 = e.b.sub(ni, n1)
    return e.mul(e.mul(p, _pow2(e, n1, e.f.bias)), _pow2(e, n2, e.f.bias))


def _emit_exp_nonpos(e: _Emit, x):
    """exp for `x <= 0` (or NaN) only: 2^n applied as the normal number `2^(n + shift)` in one
    step, times the constant `2^-shift`, whose multiply does the single rounding into the subnormal
    range -- four fewer vector instructions per element than the two-half scaling, same results."""
    p, ni = _exp_reduced(e, _clamp_low(e, x, e.f.lo))
    return e.mul(e.mul(p, _pow2(e, ni, e.f.bias + e.f.shift)), e.const(2.0 ** -e.f.shift))


def _emit_exp_summand(e: _Emit, x):
    """exp for `x <= 0` (or NaN) as a term of a sum that also holds `exp(0) = 1` (a row's
    exponentials shifted by its maximum): inputs below `lo_normal` are raised to it, so every
    result is a normal number and 2^n is applied in one multiply, with no rounding step into the
    subnormal range (one multiply fewer per element than `exp_nonpos`). A term below
    `exp(lo_normal)` (~1e-38 in float32) is absorbed by the sum's 1 whatever its value."""
    p, ni = _exp_reduced(e, _clamp_low(e, x, e.f.lo_normal))
    return e.mul(p, _pow2(e, ni, e.f.bias))


def _emit_exp_summand_bits(e: _Emit, x):
    """`_emit_exp_summand` with `2^n` added to the exponent field of `p`'s bits instead of multiplied
    in (exact: every result is a normal number): one multiply fewer per element, on the FMA pipes
    that bound a float64 exp-sum. A NaN `x` gives an arbitrary value (its `n` comes from the NaN's
    payload bits), so the caller must find NaN rows on its own (`summand_and_probe`)."""
    p, ni = _exp_reduced(e, _clamp_low(e, x, e.f.lo_normal))
    return _times_pow2_bits(e, p, ni)


def _emit_exp_nonpos_bits(e: _Emit, x):
    """`_emit_exp_nonpos` with `2^(n + shift)` added to the exponent field of `p`'s bits (a normal
    number for every input down to the clamp) instead of multiplied in; the multiply by `2^-shift`
    still rounds into the subnormal range. The same results but for NaN `x`, which gives an
    arbitrary value (see `summand_and_probe`)."""
    p, ni = _exp_reduced(e, _clamp_low(e, x, e.f.lo))
    return e.mul(_times_pow2_bits(e, p, e.b.add(ni, e.int(e.f.shift))), e.const(2.0 ** -e.f.shift))


def _emit_log(e: _Emit, x):
    f, b = e.f, e.b
    i32 = ir.IntType(32)
    bits = e.as_int(x)
    # the exponent field in 32-bit integers, converted by a packed int32 -> float instruction
    # (AVX2 has no packed int64 -> float conversion: a loop that needs one is not vectorised)
    high = b.trunc(b.lshr(bits, e.int(32)), i32) if f.bits == 64 else bits
    field = b.and_(b.lshr(high, i32(f.mbits - (32 if f.bits == 64 else 0))), i32(2 * f.bias + 1))
    ef = b.sitofp(b.sub(field, i32(f.bias)), f.ftype)
    frac = e.as_float(b.or_(b.and_(bits, e.int((1 << f.mbits) - 1)), e.int(f.bias << f.mbits)))
    big = e.lt(e.const(2.0 ** 0.5), frac)
    frac = b.select(big, e.mul(e.const(0.5), frac), frac)
    ef = b.select(big, e.add(ef, e.const(1.0)), ef)
    u = b.fdiv(e.sub(frac, e.const(1.0)), e.add(frac, e.const(1.0)), flags=_FLAGS)
    p = e.horner(f.log_series, e.mul(u, u))
    r = e.add(e.mul(ef, e.const(f.ln2_hi)), e.add(e.mul(u, p), e.mul(ef, e.const(f.ln2_lo))))
    return b.select(e.lt(x, e.const(float("inf"))), r, x)  # +inf and NaN (the compare is false)


def _float_intrinsic(emit, name: str, doc: str, lanes: int = 1):
    """An intrinsic computing `emit` on a float32 or float64 scalar (callable from Numba code only);
    with `lanes=2`, on two scalars of one type at once, returning a pair: the two evaluations'
    instructions interleaved one by one (a `_Lanes` builder)."""

    def typed(xs):  # `(signature, codegen)`, or None for arguments it does not take
        x = xs[0]
        if x not in (types.float32, types.float64) or any(y != x for y in xs):
            return None
        fmt = _F64 if x == types.float64 else _F32

        def codegen(ctx, builder, sig, args):
            if lanes == 1:
                return emit(_Emit(builder, fmt), args[0])
            out = emit(_Emit(_Lanes(builder), fmt), tuple(args))
            return ctx.make_tuple(builder, sig.return_type, list(out))
        return (x if lanes == 1 else types.UniTuple(x, lanes))(*xs), codegen

    # fixed arities, not `*xs`: Numba would type a star-args typer's call as taking a tuple
    if lanes == 1:
        def typer(typingctx, x):
            return typed((x,))
    elif lanes == 2:
        def typer(typingctx, x, y):
            return typed((x, y))
    else:
        raise ValueError(lanes)

    typer.__name__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


exp_nonpos2 = _float_intrinsic(
    _emit_exp_nonpos, "exp_nonpos2",
    """`(exp_nonpos(x), exp_nonpos(y))`, the two evaluations' instructions interleaved.
Why: in a loop that is not a reduction LLVM vectorises one vector per iteration, and one exp's
chain of dependent instructions leaves the core waiting; two interleaved chains fill it (the column
kernels' exp-sum over two classes: 25-35% less time per logit than two exps one after the other,
same results bit for bit).""", lanes=2)
exp_nonpos = _float_intrinsic(
    _emit_exp_nonpos, "exp_nonpos",
    "`exp` for `x <= 0` (or NaN) only: cheaper, the same results. Callable from Numba code.")
exp_summand = _float_intrinsic(
    _emit_exp_summand, "exp_summand",
    "`exp_nonpos` as a term of a sum that also holds 1: tiny results differ, the sum does not.")
exp_summand2 = _float_intrinsic(
    _emit_exp_summand, "exp_summand2",
    "`(exp_summand(x), exp_summand(y))`, the two evaluations' instructions interleaved (see `exp_nonpos2`).",
    lanes=2)
exp_summand_bits = _float_intrinsic(
    _emit_exp_summand_bits, "exp_summand_bits",
    "`exp_summand` for non-NaN `x`, one multiply fewer (a NaN gives an arbitrary value: `summand_and_probe`).")
exp_nonpos_bits = _float_intrinsic(
    _emit_exp_nonpos_bits, "exp_nonpos_bits",
    "`exp_nonpos` for non-NaN `x`, one multiply fewer (a NaN gives an arbitrary value: `nonpos_and_probe`).")
exp = _float_intrinsic(_emit_exp, "exp", "Vectorisable `exp` for float32 and float64 scalars inside Numba code.")
log = _float_intrinsic(_emit_log, "log",
                       "Vectorisable `log` for positive float32 and float64 scalars inside Numba code.")


def _probed_intrinsic(bits_emit, plain_emit, name: str, doc: str):
    """An intrinsic `(v, row) -> (exp(v), q)` for the exp-sum loops of the row kernels: `bits_emit`
    (the power of two added to the exponent's bits; wrong for NaN) and `q = v` for float32/float64
    rows, `plain_emit` and `q = 0` for 16-bit rows (see `summand_and_probe`)."""

    def typer(typingctx, v, row):
        if v not in (types.float32, types.float64):
            return None
        fmt = _F64 if v == types.float64 else _F32
        wide = _is_compute_type(row.dtype)

        def codegen(ctx, builder, sig, args):
            e, x = _Emit(builder, fmt), args[0]
            pair = (bits_emit(e, x), x) if wide else (plain_emit(e, x), e.const(0.0))
            return ctx.make_tuple(builder, sig.return_type, list(pair))
        return types.UniTuple(v, 2)(v, row), codegen

    typer.__name__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


summand_and_probe = _probed_intrinsic(_emit_exp_summand_bits, _emit_exp_summand, "summand_and_probe", """\
`(exp(v), q)` for `v = x - m <= 0` (or NaN) as a term of the exp-sum of `row`, whose terms' `q` are
summed alongside it. For float32/float64 rows `exp_summand_bits` and `q = v`: the sum of the `q` is
NaN iff some `v` is (the others are <= 0), the one input `exp_summand_bits` gets wrong
(`nan_if_probed`). For 16-bit rows `exp_summand` and `q = 0`, whose sum LLVM drops (measured
there: the sum of `v` cost more than the multiply it saves). An intrinsic, not an inlined helper
that branches on `row`'s type: as a helper, a long-row forward's first call took 1.16 times as long
as with `exp_summand`, as this intrinsic 1.09-1.12 (`compile_pairs.py`).""")
nonpos_and_probe = _probed_intrinsic(_emit_exp_nonpos_bits, _emit_exp_nonpos, "nonpos_and_probe", """\
`summand_and_probe` for the exponentials the fused row pass keeps (`exp_nonpos_bits` /
`exp_nonpos`): a kept exponential of a NaN row is then any value, and its gradient NaN all the same
(the row's `1 / s` is NaN).""")


@intrinsic
def nan_if_probed(typingctx, s, q):
    """An exp-sum `s` whose terms came from `summand_and_probe` or `nonpos_and_probe`: NaN (`q`)
    where their probes' sum `q` is, else `s`."""
    if s != q or not _is_compute_type(s):
        return None

    def codegen(ctx, builder, sig, args):
        s, q = args
        return builder.select(builder.fcmp_unordered("uno", q, q), q, s)
    return s(s, q), codegen


# -- storage <-> compute ------------------------------------------------------------------------------
# The casts below are `@intrinsic`s, not `@overload`s: an intrinsic emits its few LLVM instructions
# straight into the caller, where an overload is a separate function that Numba types, lowers,
# optimises and links on its own (about 0.02-0.1 s each on first use, measured with
# benchmarks/compile_profile.py), for what is a no-op or one instruction.

def _compute_type(t):
    """The compute type for a storage or scalar Numba type: float64 for float64, float32 for
    everything else (float32 and the 16-bit storage types)."""
    return types.float64 if t == types.float64 else types.float32


def _is_compute_type(t) -> bool:
    """Whether a storage type is its own compute type (float32/float64, not 16-bit storage)."""
    return t in (types.float32, types.float64)


_HALF_STORAGE = (types.uint16, types.int16)  # how float16 and bfloat16 logits reach the kernels


def _widen(builder, raw, storage):
    """LLVM instructions widening a stored 16-bit element `raw` (i16) to float32: float16 storage
    (`uint16`; F16C's vcvtph2ps when available) or bfloat16 storage (`int16`: the high half of a
    float32). Exact."""
    if storage == types.uint16:
        return builder.fpext(builder.bitcast(raw, ir.HalfType()), ir.FloatType())
    wide = builder.shl(builder.sext(raw, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
    return builder.bitcast(wide, ir.FloatType())


@intrinsic
def load(typingctx, v):
    """Widen one stored element to its compute type (float16/bfloat16 storage -> float32)."""
    if _is_compute_type(v):
        return v(v), lambda ctx, builder, sig, args: args[0]
    if v in _HALF_STORAGE:
        return types.float32(v), lambda ctx, builder, sig, args: _widen(builder, args[0], v)
    return None


@intrinsic
def as_compute(typingctx, v, arr):
    """`v` converted to `arr`'s compute type (keeps float32 arithmetic in float32)."""
    to = _compute_type(arr.dtype)
    v = types.unliteral(v)

    def codegen(ctx, builder, sig, args):
        return ctx.cast(builder, args[0], sig.args[0], to)
    return to(v, arr), codegen


@intrinsic
def compute_zero(typingctx, arr):
    """Zero of `arr`'s compute type (float32 for 16-bit storage, else the array's own dtype)."""
    to = _compute_type(arr.dtype)
    return to(arr), lambda ctx, builder, sig, args: ctx.get_constant(to, 0.0)


@intrinsic
def one_like(typingctx, v):
    """1 in `v`'s float type (float32 for float32, else float64)."""
    to = types.float32 if v == types.float32 else types.float64
    return to(v), lambda ctx, builder, sig, args: ctx.get_constant(to, 1.0)


def _f32_to_bf16_bits(builder, v):
    """LLVM instructions rounding a float32 to bfloat16 bits (i16): round to nearest even on the 16
    dropped bits, NaN kept a quiet NaN. Emitted in 32-bit integers and branch-free: written as Numba
    code, the integer arithmetic was widened to 64 bits and the NaN test was a branch, and the
    gradient loops that store bfloat16 (exp included) ran at a quarter of the float16 speed."""
    i32 = ir.IntType(32)
    b = builder.bitcast(v, i32)
    high = builder.lshr(b, i32(16))
    rounded = builder.lshr(builder.add(builder.add(b, i32(0x7FFF)), builder.and_(high, i32(1))), i32(16))
    quiet_nan = builder.or_(high, i32(0x40))
    is_nan = builder.icmp_unsigned(">", builder.and_(b, i32(0x7FFFFFFF)), i32(0x7F800000))
    return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))


def _narrow(builder, val, storage):
    """LLVM instructions rounding the float32 `val` to a 16-bit storage element (i16), the inverse
    of `_widen`: float16 by IEEE round-to-nearest-even, bfloat16 by `_f32_to_bf16_bits`."""
    if storage == types.uint16:
        return builder.bitcast(builder.fptrunc(val, ir.HalfType()), ir.IntType(16))
    return _f32_to_bf16_bits(builder, val)


@intrinsic
def store(typingctx, arr, j, v):
    """`arr[j] = v` rounding the compute value `v` to `arr`'s storage dtype (float16 by IEEE
    round-to-nearest-even, bfloat16 by `_f32_to_bf16_bits`)."""
    dt = arr.dtype
    if _is_compute_type(dt):
        vt = dt
    elif dt in _HALF_STORAGE:
        vt = types.float32
    else:
        return None

    def codegen(ctx, builder, sig, args):
        a, idx, val = args
        if dt in _HALF_STORAGE:
            val = _narrow(builder, val, dt)
        setitem = ctx.get_function(operator.setitem, signature(types.none, arr, types.intp, dt))
        setitem(builder, (a, idx, val))
        return ctx.get_dummy_value()
    return types.none(arr, types.intp, vt), codegen


@intrinsic
def stash_in_grad(typingctx, grad):
    """Whether a gradient array of this storage type can hold the compute-type exponentials that the
    fused row kernels keep between their sum and gradient passes (float32/float64: True; the 16-bit
    storage of float16/bfloat16: False). A constant of the compiled code."""
    keep = _is_compute_type(grad.dtype)
    return types.boolean(grad), lambda ctx, builder, sig, args: ctx.get_constant(types.boolean, keep)


@intrinsic
def exp_stash(typingctx, grow, scratch):
    """Where the fused row kernels keep `exp(x - m)`: the gradient row `grow` itself when
    `stash_in_grad` (rescaled there in place), else the compute-type `scratch` (at least a row
    long; rounding each exponential to 16 bits would cost the gradient its precision)."""
    k = 0 if _is_compute_type(grow.dtype) else 1

    def codegen(ctx, builder, sig, args):  # a new reference to an existing array (NRT counts it)
        return impl_ret_borrowed(ctx, builder, sig.return_type, args[k])
    return (grow, scratch)[k](grow, scratch), codegen


def _c_view(ctx, builder, outty, src, data, dims):
    """An array of type `outty` over `data` with the C-contiguous strides of the shape `dims`
    (intp values), sharing `src`'s memory owner: a view, returned as a new reference."""
    from numba.np.arrayobj import make_array, populate_array

    strides, step = [], src.itemsize
    for d in reversed(dims):
        strides.insert(0, step)
        step = builder.mul(step, d)
    out = make_array(outty)(ctx, builder)
    populate_array(out, data=data, shape=dims, strides=strides, itemsize=src.itemsize,
                   meminfo=src.meminfo, parent=src.parent)
    return impl_ret_borrowed(ctx, builder, outty, out._getvalue())


@intrinsic
def rows_flat(typingctx, X, n0, nb):
    """Rows `n0 .. n0+nb` of a C-contiguous 2-D array as one flat 1-D view of `nb * C` elements
    (no copy; the column kernels' transposes index it with a loop-invariant stride). What
    `X[n0:n0 + nb].reshape(nb * C)` gives, without compiling Numba's general `reshape` (about 1 s
    of a first call, measured)."""
    if not (isinstance(X, types.Array) and X.ndim == 2 and X.layout == "C"):
        return None

    def codegen(ctx, builder, sig, args):
        from numba.np.arrayobj import make_array

        src = make_array(sig.args[0])(ctx, builder, args[0])
        C = builder.extract_value(src.shape, 1)
        first = ctx.cast(builder, args[1], sig.args[1], types.intp)
        count = ctx.cast(builder, args[2], sig.args[2], types.intp)
        return _c_view(ctx, builder, sig.return_type, src,
                       builder.gep(src.data, [builder.mul(first, C)]), [builder.mul(count, C)])
    return X.copy(ndim=1)(X, n0, nb), codegen


@intrinsic
def as_2d(typingctx, a, rows, cols):
    """A C-contiguous array of any dimension seen as `(rows, cols)` (`rows * cols` must be its
    size; not checked): `a.reshape((rows, cols))` without compiling Numba's general `reshape`."""
    if not (isinstance(a, types.Array) and a.layout == "C"):
        return None

    def codegen(ctx, builder, sig, args):
        from numba.np.arrayobj import make_array

        src = make_array(sig.args[0])(ctx, builder, args[0])
        dims = [ctx.cast(builder, v, t, types.intp) for v, t in zip(args[1:], sig.args[1:])]
        return _c_view(ctx, builder, sig.return_type, src, src.data, dims)
    return a.copy(ndim=2)(a, rows, cols), codegen


def _line_view(X, ndim_in, axis, owned=True):
    """The intrinsic behind `run_view`, `col_run` and `span`: a 1-D view of `n` elements of the
    `ndim_in`-D array `X` starting at a given index and running along `axis`, for indices in
    range (not checked or clipped). Numba's general basic indexing types and lowers each
    `(int, slice)` index through its generic templates: `cols_grad`'s first compile went from
    0.74 to 0.51 s (0.40 to 0.27 s of it type inference) in one profile of the 10-class first
    call with `run_view` in place of `X[i, s0:s0 + n]`."""
    if not (isinstance(X, types.Array) and X.ndim == ndim_in):
        return None
    unit = X.layout == "C" and axis == ndim_in - 1
    outty = X.copy(ndim=1, layout="C" if unit else "A")

    def codegen(ctx, builder, sig, args):
        from numba.np.arrayobj import make_array, populate_array

        src = make_array(sig.args[0])(ctx, builder, args[0])
        start = [ctx.cast(builder, v, t, types.intp) for v, t in zip(args[1:-1], sig.args[1:-1])]
        n = ctx.cast(builder, args[-1], sig.args[-1], types.intp)
        steps = [builder.extract_value(src.strides, k) for k in range(ndim_in)]
        offset = ir.Constant(ctx.get_value_type(types.intp), 0)
        for k in range(ndim_in):
            offset = builder.add(offset, builder.mul(start[k], steps[k]))
        raw = builder.gep(builder.bitcast(src.data, ir.IntType(8).as_pointer()), [offset])
        out = make_array(outty)(ctx, builder)
        populate_array(out, data=builder.bitcast(raw, src.data.type), shape=[n],
                       strides=[steps[axis]], itemsize=src.itemsize,
                       meminfo=src.meminfo if owned else None, parent=src.parent if owned else None)
        ret = impl_ret_borrowed if owned else impl_ret_untracked  # (no owner: no reference to count)
        return ret(ctx, builder, outty, out._getvalue())
    return outty, codegen


def _borrowed_view(X, ndim):
    """The intrinsic behind `borrowed_row` and `borrowed`: the last axis of `X` at the leading
    indices given (none for 1-D), as a view with a null memory owner (`_line_view`)."""
    outty, codegen = _line_view(X, ndim, ndim - 1, owned=False) or (None, None)
    if outty is None:
        return None

    def whole(ctx, builder, sig, args):
        from numba.np.arrayobj import make_array

        intp = types.intp
        src = make_array(sig.args[0])(ctx, builder, args[0])
        lead = [ctx.cast(builder, v, t, intp) for v, t in zip(args[1:], sig.args[1:])]
        zero = ir.Constant(ctx.get_value_type(intp), 0)
        n = builder.extract_value(src.shape, ndim - 1)
        return codegen(ctx, builder, outty(X, *[intp] * (ndim + 1)), [args[0], *lead, zero, n])
    return outty, whole


@intrinsic
def borrowed_row(typingctx, X, r):
    """`X[r]` of a 2-D array whose owner outlives the view (a kernel's argument), as a view that
    counts no references: its memory owner is null. Numba counts a reference on every array passed
    into an inlined helper, an atomic add and subtract on the owner's count each, and for the rows
    of one shared array every thread counts on the same owner. Views taken of it (`span`) count
    none either. Never returned from a kernel."""
    view = _borrowed_view(X, 2)
    return None if view is None else (view[0](X, r), view[1])


@intrinsic
def borrowed(typingctx, a):
    """A 1-D array whose owner outlives the view, as a view that counts no references
    (`borrowed_row`)."""
    view = _borrowed_view(a, 1)
    return None if view is None else (view[0](a), view[1])


@intrinsic
def run_view(typingctx, X, i, s0, n):
    """`X[i, s0:s0 + n]` of a 2-D array (indices in range; see `_line_view`): the column kernels'
    view of one class row of a block. C-contiguous when `X` is."""
    outty, codegen = _line_view(X, 2, 1) or (None, None)
    return None if outty is None else (outty(X, i, s0, n), codegen)


@intrinsic
def col_run(typingctx, X, i0, j, n):
    """`X[i0:i0 + n, j]` of a 2-D array (indices in range; see `_line_view`)."""
    outty, codegen = _line_view(X, 2, 0) or (None, None)
    return None if outty is None else (outty(X, i0, j, n), codegen)


@intrinsic
def span(typingctx, a, s0, n):
    """`a[s0:s0 + n]` of a 1-D array (indices in range; see `_line_view`).

    Also the way for a loop to read or write `a[s0 + k]`: Numba wraps a negative signed index
    (`i < 0 ? i + len : i`, boundscheck or not), and LLVM, unable to prove `s0 + k >= 0`,
    vectorises such a loop with gathers or scatters of computed addresses. Over `span(a, s0, n)[k]`
    with `k` from `range(n)` the index is provably non-negative and the loop uses plain vector loads
    and stores (the target check's count: 0.65 -> 0.14 ns per target on a cached block, Zen 4)."""
    outty, codegen = _line_view(a, 1, 0) or (None, None)
    return None if outty is None else (outty(a, s0, n), codegen)


# -- in-register transposition of a few classes -------------------------------------------------------
# The column kernels transpose short 2-D rows into a (C, nb) scratch and back. Element by element
# that is a scalar load and store per logit (0.28-0.36 ns per float32 logit from memory, Zen 4),
# whatever C. For a few classes a group of `lanes` rows is `C` vectors of `lanes` elements, and each
# class's vector (lane j = row j) is put together from the few vectors its elements lie in by
# LLVM vector shuffles with constant masks, which LLVM lowers to permutes and blends: per logit,
# 0.06-0.25 ns for float32 up to 6 classes (2 to 6) and 0.05-0.13 ns for 16-bit storage up to 12
# (same measure). The shuffle count grows with C (each class's vector draws from up to C vectors),
# so above these counts the element loop is as fast or faster: also in AVX2 code (compiled for
# znver3 and run on the same Zen 4, where 6 float64 classes already lost, hence 4 for float64).
# The code has one branch per class count, in a kernel variant of its own (`shuffle_classes`).

_SHUFFLE_LANES = {2: 16, 4: 16, 8: 8}  # rows per group, by storage itemsize (a 256/512-bit vector)
_SHUFFLE_MAX_CLASSES = {2: 12, 4: 6, 8: 4}


def _itemsize(t) -> int:
    return {types.float64: 8, types.float32: 4, types.uint16: 2, types.int16: 2}.get(t, 0)


def shuffle_max_classes(dtype) -> int:
    """The most classes `transpose_group` takes for a storage dtype (NumPy's), from Python."""
    return _SHUFFLE_MAX_CLASSES.get(np.dtype(dtype).itemsize, 0)


@intrinsic
def shuffle_classes(typingctx, arr, in_registers):
    """`(lanes, most)` for `arr`'s storage dtype, constants of the compiled code: `transpose_group`
    and `untranspose_group` move groups of `lanes` rows of `1 <= C <= most` classes. `most` is 0
    when `in_registers` is None: the kernel variant for other class counts then holds none of the
    shuffle code (nor spends its compile time)."""
    size = _itemsize(arr.dtype)
    if not size:
        return None
    lanes = _SHUFFLE_LANES[size]
    most = 0 if in_registers == types.none else _SHUFFLE_MAX_CLASSES[size]

    def codegen(ctx, builder, sig, args):
        return ctx.make_tuple(builder, sig.return_type, [ctx.get_constant(types.intp, lanes),
                                                         ctx.get_constant(types.intp, most)])
    return types.UniTuple(types.intp, 2)(arr, in_registers), codegen


def _assemble(builder, vecs, sources, lanes):
    """A vector whose lane `j` is lane `sources[j][1]` of `vecs[sources[j][0]]`: the source
    vectors merged pairwise (a tree of two-input shuffles, each lane placed where it ends up),
    then permuted into place if only one was needed."""
    i32 = ir.IntType(32)
    parts = {}
    for j, (k, lane) in enumerate(sources):
        parts.setdefault(k, {})[j] = lane
    level = [(vecs[k], where) for k, where in sorted(parts.items())]
    while len(level) > 1:
        merged = []
        for (a, wa), (b, wb) in zip(level[0::2], level[1::2]):
            mask = [0] * lanes  # (lanes no output reads: any index)
            for j, lane in wa.items():
                mask[j] = lane
            for j, lane in wb.items():
                mask[j] = lanes + lane
            v = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, lanes), [i32(m) for m in mask]))
            merged.append((v, {j: j for j in list(wa) + list(wb)}))
        if len(level) % 2:
            merged.append(level[-1])
        level = merged
    v, where = level[0]
    if any(j != lane for j, lane in where.items()):
        mask = ir.Constant(ir.VectorType(i32, lanes), [i32(where[j]) for j in range(lanes)])
        v = builder.shuffle_vector(v, ir.Constant(v.type, None), mask)
    return v


def _group_intrinsic(name, to_columns, doc):
    """`transpose_group` (`to_columns`) or `untranspose_group`: a switch over the class count,
    each case loading the group's `C` vectors, assembling its `C` output vectors (`_assemble`)
    and storing them."""
    def typer(typingctx, a, a0, C, b, b0):
        flat, cols = (a, b) if to_columns else (b, a)
        size = _itemsize(flat.dtype)
        if not (size and cols.dtype == flat.dtype and flat.ndim == 1 and cols.ndim == 2
                and flat.layout == "C" and cols.layout == "C"):
            return None
        lanes, most = _SHUFFLE_LANES[size], _SHUFFLE_MAX_CLASSES[size]

        def codegen(ctx, builder, sig, args):
            from numba.np.arrayobj import make_array

            i8p, intp = ir.IntType(8).as_pointer(), ctx.get_value_type(types.intp)
            vty = ir.VectorType(ir.IntType(8 * size), lanes)
            arrays = [make_array(t)(ctx, builder, v) for t, v in ((sig.args[0], args[0]), (sig.args[3], args[3]))]
            starts = [ctx.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 4)]
            n = ctx.cast(builder, args[2], sig.args[2], types.intp)
            flat_i, cols_i = (0, 1) if to_columns else (1, 0)
            flat_p = builder.gep(builder.bitcast(arrays[flat_i].data, i8p), [builder.mul(starts[flat_i], intp(size))])
            cols_p = builder.gep(builder.bitcast(arrays[cols_i].data, i8p), [builder.mul(starts[cols_i], intp(size))])
            row_bytes = builder.extract_value(arrays[cols_i].strides, 0)

            def flat_vec(k):  # the k-th vector of the group's flat elements
                return builder.bitcast(builder.gep(flat_p, [intp(k * lanes * size)]), vty.as_pointer())

            def col_vec(c):  # class c's `lanes` elements in the (C, nb) array
                return builder.bitcast(builder.gep(cols_p, [builder.mul(row_bytes, intp(c))]), vty.as_pointer())

            fn = builder.function
            done = fn.append_basic_block(f"{name}.done")
            switch = builder.switch(n, done)
            for count in range(1, most + 1):
                block = fn.append_basic_block(f"{name}.c{count}")
                switch.add_case(intp(count), block)
                builder.position_at_end(block)
                if to_columns:  # class c, row j <- flat element j*C + c
                    vecs = [builder.load(flat_vec(k), align=size) for k in range(count)]
                    for c in range(count):
                        src = [divmod(j * count + c, lanes) for j in range(lanes)]
                        builder.store(_assemble(builder, vecs, src, lanes), col_vec(c), align=size)
                else:  # flat element f = j*C + c <- class c, row j
                    vecs = [builder.load(col_vec(c), align=size) for c in range(count)]
                    for k in range(count):
                        src = [((f % count), f // count) for f in range(k * lanes, (k + 1) * lanes)]
                        builder.store(_assemble(builder, vecs, src, lanes), flat_vec(k), align=size)
                builder.branch(done)
            builder.position_at_end(done)
            return ctx.get_dummy_value()
        return types.none(a, a0, C, b, b0), codegen

    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


transpose_group = _group_intrinsic("transpose_group", True, """`transpose_group(flat, f0, C, cols, b0)`:
    `cols[c, b0 + j] = flat[f0 + j*C + c]` for the `lanes` rows `j` of a group and every class `c`
    (`lanes, most = shuffle_classes(flat, True)`; `1 <= C <= most`, else nothing is done; indices in
    range, not checked). `flat` 1-D and `cols` 2-D, both C-contiguous, of one dtype.""")
untranspose_group = _group_intrinsic("untranspose_group", False, """`untranspose_group(cols, b0, C, flat, f0)`:
    `flat[f0 + j*C + c] = cols[c, b0 + j]`, the inverse of `transpose_group`.""")


def _dtype_of(token):
    """The Numba type a dtype argument names: `arr.dtype` (a `DType`) or a scalar class such as
    `np.int64`; None for anything else."""
    if isinstance(token, types.DType):
        return token.dtype
    if isinstance(token, types.NumberClass):
        return token.instance_type
    return None


def _empty_intrinsic(name, dtype_rule, doc):
    """An intrinsic `(shape, token) -> ` new uninitialised C-contiguous array, its dtype
    `dtype_rule(token)`: NumPy's `np.empty` compiled its overload once per shape and dtype
    (0.35 s of a column kernel's first call, measured); this emits numba's allocation directly
    into the caller."""
    def typer(typingctx, shape, token):
        if isinstance(shape, types.Integer):
            dims = [shape]
        elif isinstance(shape, types.BaseTuple) and all(isinstance(t, types.Integer) for t in shape):
            dims = list(shape)
        else:
            return None
        dt = dtype_rule(token)
        if dt is None:
            return None
        arrty = types.Array(dt, len(dims), "C")

        def codegen(ctx, builder, sig, args):
            from numba.np.arrayobj import _empty_nd_impl

            if isinstance(sig.args[0], types.Integer):
                sizes = [args[0]]
            else:
                sizes = [builder.extract_value(args[0], i) for i in range(len(dims))]
            sizes = [ctx.cast(builder, v, t, types.intp) for v, t in zip(sizes, dims)]
            ary = _empty_nd_impl(ctx, builder, arrty, sizes)
            return impl_ret_new_ref(ctx, builder, arrty, ary._getvalue())
        return arrty(shape, token), codegen
    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


empty = _empty_intrinsic("empty", _dtype_of, """`np.empty(shape, dtype)` for the kernels' scratch: `shape` an
    integer or a tuple of non-negative integers (not checked), `dtype` as `arr.dtype` or a scalar
    class (`np.int64`, `np.bool_`).""")


@intrinsic
def clear(typingctx, a):
    """`a[...] = 0` for a C-contiguous array of integers or floats: one `memset` of its bytes (all
    zero bits are 0 and 0.0), where a slice assignment compiles NumPy's broadcasting setitem per
    shape and dtype."""
    if not (isinstance(a, types.Array) and a.layout == "C"
            and isinstance(a.dtype, (types.Integer, types.Float))):
        return None

    def codegen(ctx, builder, sig, args):
        from numba.core import cgutils
        from numba.np.arrayobj import make_array

        arr = make_array(sig.args[0])(ctx, builder, args[0])
        cgutils.memset(builder, arr.data, builder.mul(arr.nitems, arr.itemsize), 0)
        return ctx.get_dummy_value()
    return types.none(a), codegen


def _compute_of(token):
    return _compute_type(token.dtype) if isinstance(token, types.Array) else None


compute_scratch = _empty_intrinsic("compute_scratch", _compute_of, """`compute_scratch(shape, arr)`: an uninitialised
    array of `arr`'s compute type (float64 for float64 storage, float32 otherwise).""")


# -- maximum -----------------------------------------------------------------------------------------
def _binary_llvm(name):
    """Codegen calling the overloaded LLVM intrinsic `name` on two arguments of one type."""
    def codegen(ctx, builder, sig, args):
        t = args[0].type
        return builder.call(builder.module.declare_intrinsic(name, [t], ir.FunctionType(t, [t, t])), args)
    return codegen


@intrinsic
def max_skipnan(typingctx, a, b):
    """`max(a, b)` of two floats of the same type, a NaN operand skipped (the other is returned).

    LLVM's `maxnum`: the loop vectoriser turns `m = max_skipnan(m, x[j])` into a packed-max reduction
    with several accumulators, where the compare-and-select spelling `m = v if v > m else m` is not
    vectorised without the 'nnan' flag (which numbaxent does not set: NaN must propagate) and runs at
    one element per compare-select latency. Measured on one cached float32 row, 2-core AMD EPYC
    (Zen 3): 0.10 ns per element, against 0.7 ns for a block of 256 running maxima."""
    if a != b or not _is_compute_type(a):
        return None
    return a(a, b), _binary_llvm("llvm.maxnum")


@intrinsic
def max_int(typingctx, a, b):
    """`max(a, b)` of two signed integers of the same type, as LLVM's `smax` (see `min_int`)."""
    if a != b or not isinstance(a, types.Integer) or not a.signed:
        return None
    return a(a, b), _binary_llvm("llvm.smax")


# A row's maximum taken by integer compares of the stored floats' bits: a loop that already sums (the
# exp-sum of one row) can also take the maximum of the *next* row -- reading it from memory while
# the exps are computed -- only as an integer reduction: LLVM 22 does not vectorise a loop that has
# both a float sum and a `maxnum` reduction. Read as signed integers (`storage_bits`), non-negative
# floats order as the floats do, and negative ones in reverse (a larger magnitude is a larger
# integer, all below every non-negative one). So the loop keeps the largest and the smallest bits
# (`max_int`, `min_int`: two instructions an element, where a map to order keys first cost three
# more), and the maximum is the float of the largest if that is non-negative, else of the
# smallest, started at -inf's bits so that a negative NaN (whose bits are above -inf's) is skipped
# as `max_skipnan` skips it; a positive NaN's bits are above +inf's (the caller must then take the
# float maximum instead). See `_rows.max_start` and `_rows.next_row_max`. The bits are those of the
# element as stored, so float16 and bfloat16 rows are compared as int16, not widened to float32
# first: one conversion fewer per element, and half-width compares (a float16 row's exp-sum with the
# next row's maximum 0.25 -> 0.21 ns per logit, one thread, Zen 4).

@intrinsic
def storage_bits(typingctx, x):
    """The bits of a stored element `x` as a signed integer: float32 -> int32, float64 -> int64,
    float16 (`uint16` storage) and bfloat16 (`int16` storage) -> int16."""
    if _is_compute_type(x):
        bits = x.bitwidth
        return (types.int64 if bits == 64 else types.int32)(x), \
            lambda ctx, builder, sig, args: builder.bitcast(args[0], ir.IntType(bits))
    if x in _HALF_STORAGE:
        return types.int16(x), lambda ctx, builder, sig, args: args[0]
    return None


@intrinsic
def stored_bits(typingctx, v, arr):
    """`storage_bits` of the compute value `v` stored in `arr`'s dtype (rounded as `store` rounds):
    where a row maximum by bits starts (-0.0, -inf) and ends (+inf)."""
    dt = arr.dtype
    if not isinstance(v, types.Float) or not (_is_compute_type(dt) or dt in _HALF_STORAGE):
        return None
    to = _compute_type(dt)

    def codegen(ctx, builder, sig, args):
        x = ctx.cast(builder, args[0], sig.args[0], to)
        if dt in _HALF_STORAGE:
            return _narrow(builder, x, dt)
        return builder.bitcast(x, ir.IntType(dt.bitwidth))
    return getattr(types, f"int{dt.bitwidth}")(v, arr), codegen


@intrinsic
def from_storage_bits(typingctx, k, arr):
    """The compute value of the element of `arr`'s dtype whose `storage_bits` are `k` (int32 ->
    float32, int64 -> float64, int16 -> float32 through float16 or bfloat16, as `load` widens)."""
    dt = arr.dtype
    if not (_is_compute_type(dt) or dt in _HALF_STORAGE) or k != getattr(types, f"int{dt.bitwidth}"):
        return None

    def codegen(ctx, builder, sig, args):
        if dt in _HALF_STORAGE:
            return _widen(builder, args[0], dt)
        return builder.bitcast(args[0], ir.DoubleType() if dt.bitwidth == 64 else ir.FloatType())
    return _compute_type(dt)(k, arr), codegen


@intrinsic
def min_int(typingctx, a, b):
    """`min(a, b)` of two integers of the same type, as LLVM's `smin` (a packed min in vectorised
    loops; no builtin `min` to compile, no select that LLVM could turn into a masked store)."""
    if a != b or not isinstance(a, types.Integer) or not a.signed:
        return None
    return a(a, b), _binary_llvm("llvm.smin")


# -- soft-capping (Gemma 2): x -> s * tanh(x / s) ---------------------------------------------------------
# `capped` and `cap_slope` are intrinsics for the same reason as the casts: without a cap (the usual case, `cap=None` resolved at
# compile time) they are no code at all; with one they compile `_soft_cap`/`_soft_cap_slope` in
# the logits' float type, the cap converted to it.

@register_jitable(**_PLAIN)
def _tanh(u):
    # 1 - 2/(e^{2u} + 1) with the vectorisable exp; saturates to +-1, NaN stays NaN. Absolute error is
    # a few ulps of 1, which is what a logit of size `cap` carries anyway.
    one = one_like(u)
    return one - (one + one) / (exp(u + u) + one)


def _soft_cap(v, c):
    return c * _tanh(v / c)


def _soft_cap_slope(vc, c):
    q = vc / c
    return one_like(vc) - q * q


def _no_cap(cap):
    return isinstance(cap, (types.NoneType, types.Omitted))


@intrinsic
def capped(typingctx, v, cap):
    """`cap * tanh(v / cap)`, or `v` itself when `cap` is None (resolved at compile time)."""
    if _no_cap(cap):
        return v(v, cap), lambda ctx, builder, sig, args: args[0]

    def codegen(ctx, builder, sig, args):
        c = ctx.cast(builder, args[1], sig.args[1], v)
        return ctx.compile_internal(builder, _soft_cap, v(v, v), [args[0], c])
    return v(v, types.unliteral(cap)), codegen


@intrinsic
def cap_slope(typingctx, vc, cap):
    """`d capped / d v` given the capped value `vc`: `1 - (vc / cap)**2` (1 when `cap` is None)."""
    if _no_cap(cap):
        to = types.float32 if vc == types.float32 else types.float64
        return to(vc, cap), lambda ctx, builder, sig, args: ctx.get_constant(to, 1.0)

    def codegen(ctx, builder, sig, args):
        c = ctx.cast(builder, args[1], sig.args[1], vc)
        return ctx.compile_internal(builder, _soft_cap_slope, vc(vc, vc), [args[0], c])
    return vc(vc, types.unliteral(cap)), codegen
