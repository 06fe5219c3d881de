"""The vector width of numbaxent's kernels, when the user asks for one (`NUMBAXENT_VECTOR_WIDTH`).

LLVM picks the width of the vectors its loop vectoriser uses from the CPU's tuning: on AMD Zen 4 it
takes 512-bit vectors (`zmm`), on Intel server CPUs with AVX-512 (Skylake-SP to Emerald Rapids) it
prefers 256-bit ones (`ymm`; LLVM's `prefer-256-bit` tuning, against the clock drop that heavy
512-bit code once cost those CPUs). Whether 512-bit vectors pay for numbaxent's exp-bound loops on
such a CPU is a question of measurement, so the width can be chosen:

    NUMBAXENT_VECTOR_WIDTH=512 python train.py     # or 256; unset: LLVM's choice for the CPU

It applies to numbaxent's own kernels only. The width is an LLVM function attribute
(`"prefer-vector-width"`), set on every function numbaxent compiles (kernels and helpers) when it
is lowered to LLVM IR, so the user's own Numba functions in the same process keep LLVM's choice.
Changing the process-wide `NUMBA_CPU_FEATURES` (e.g. `-prefer-256-bit`) would change theirs too.
The width is part of the kernel cache's key (`_cache.source_stamp`): kernels compiled with one
width are never loaded for another.

This leans on Numba internals (`NativeLowering.lowering_class`); with a Numba that lacks them, or a
value other than 256 or 512, a warning says so and the kernels are compiled as without the setting.
"""
from __future__ import annotations

import os
import warnings

ENV_VAR = "NUMBAXENT_VECTOR_WIDTH"
WIDTHS = ("256", "512")

try:
    from numba.core import compiler, lowering, typed_passes
    from numba.core.compiler_machinery import register_pass
    _HOOK = hasattr(typed_passes.NativeLowering, "lowering_class")
except ImportError:  # pragma: no cover - a Numba without these internals
    _HOOK = False


def requested() -> str | None:
    """The width asked for in `NUMBAXENT_VECTOR_WIDTH` ("256" or "512") if it can be applied, else
    None (unset or empty; or, with a warning, a value it cannot be or a Numba without the hook)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if value not in WIDTHS:
        warnings.warn(f"numbaxent: {ENV_VAR}={value!r} is not one of {', '.join(WIDTHS)}; "
                      f"the kernels are compiled with LLVM's vector width for this CPU", RuntimeWarning,
                      stacklevel=2)
        return None
    if not _HOOK:
        warnings.warn(f"numbaxent: {ENV_VAR} is ignored with this Numba version (its lowering pass "
                      f"has no `lowering_class`)", RuntimeWarning, stacklevel=2)
        return None
    return value


WIDTH = requested()  # read once, when the kernels are first needed


def mark(module, width: str) -> None:
    """Give every function defined in the LLVM IR `module` the attribute
    `"prefer-vector-width"="<width>"` (llvmlite's attribute set knows only enum attributes, so the
    string attribute goes in as its text)."""
    for fn in module.functions:
        if not fn.is_declaration:
            set.add(fn.attributes, f'"prefer-vector-width"="{width}"')


def lowering_pass(base, width: str):
    """The Numba lowering pass `base` (a `NativeLowering`), its functions marked with `width`."""

    class Lower(lowering.Lower):
        def lower_normal_function(self, fndesc):
            super().lower_normal_function(fndesc)
            mark(self.module, width)

    class Marked(base):
        _name = f"{base._name}_vector_width_{width}"

        @property
        def lowering_class(self):
            return Lower

    Marked.__name__ = Marked.__qualname__ = f"{base.__name__}VectorWidth{width}"
    return register_pass(mutates_CFG=True, analysis_only=False)(Marked)


def pipeline(lowering_pass_class):
    """Numba's nopython compiler pipeline with its `NativeLowering` replaced by
    `lowering_pass_class`."""

    class Compiler(compiler.CompilerBase):
        def define_pipelines(self):
            pm = compiler.DefaultPassBuilder.define_nopython_pipeline(self.state)
            pm.passes = [(lowering_pass_class, desc) if cls is typed_passes.NativeLowering else (cls, desc)
                         for cls, desc in pm.passes]
            pm.finalize()
            return [pm]

    Compiler.__name__ = Compiler.__qualname__ = f"{lowering_pass_class.__name__}Compiler"
    return Compiler
