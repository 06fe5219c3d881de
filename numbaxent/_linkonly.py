"""Helpers compiled for linking only: no machine code of their own.

Numba compiles every jitted function to machine code, even a helper that only other kernels call:
the helper's LLVM module is optimised, linked into each caller's module, optimised there again and
turned into machine code as part of the caller. The helper's own machine code is never run (a
numbaxent helper has no CPython or C entry point, see `_jit.HELPER_OPTIONS`), yet generating it was
0.3-0.4 s of a column kernel's first call (docs/internals.md, "Compile time").

`LinkOnlyCompiler` is Numba's default nopython pipeline with its last pass swapped for one that
gives the helper a `LinkOnlyLibrary`: linked and optimised as before, but never handed to the JIT
engine, so nothing is generated for it. Callers now link the helper's optimised IR, where before they
linked what was left of it after its own code generation (LLVM's back end rewrites a module in place
as it compiles it), so a kernel's machine code differs a little; its results do not (bit-identical on
the check sets of docs/internals.md) and its run time measured the same. Such a helper cannot be
cached on its own (a cache entry is machine code) and need not be: a cached kernel carries its
helpers' code, and loading it never compiles them.

This leans on Numba internals (`CPUCodeLibrary._finalize_final_module`, `NativeLowering`), so
it is used only with the Numba versions it was checked against (`TESTED`, the range the test
matrix runs); with any other, or when the internals are not there, helpers are compiled the
ordinary way.
"""
from __future__ import annotations

import numba

from ._vector_width import pipeline

TESTED = ((0, 60), (0, 68))  # first and last Numba minor versions checked (CI's lower bound, newest)

try:
    from numba.core import typed_passes
    from numba.core.codegen import JITCodeLibrary
    from numba.core.compiler_machinery import register_pass
except ImportError:  # pragma: no cover - a Numba without these internals
    JITCodeLibrary = None


def _numba_version() -> tuple:
    return tuple(int(p) for p in numba.__version__.split(".")[:2])


def available() -> bool:
    """Whether helpers are compiled for linking only with this Numba."""
    return (JITCodeLibrary is not None and TESTED[0] <= _numba_version() <= TESTED[1]
            and all(hasattr(JITCodeLibrary, a) for a in
                    ("_finalize_final_module", "_finalize_dynamic_globals",
                     "_verify_declare_only_symbols", "_get_module_for_linking")))


if available():

    class LinkOnlyLibrary(JITCodeLibrary):
        """A code library that is only ever linked into other libraries: Numba's `finalize`
        (linking its callees, the optimisation passes) unchanged, the last step without machine
        code."""

        def _finalize_final_module(self):
            # what CPUCodeLibrary._finalize_final_module does, but not adding the module to the
            # execution engine (whose `finalize_object` generates its machine code)
            self._finalize_dynamic_globals()
            self._verify_declare_only_symbols()
            self._finalized = True

        def get_pointer_to_function(self, name):
            self._ensure_finalized()
            return 0  # no entry point (the helper has no wrapper to point to anyway)

        @property
        def codegen(self):
            return _NoEnvCodegen(self._codegen)

    class _NoEnvCodegen:
        """The library's codegen, except that `set_env` (which writes the function's environment
        pointer into its module in the execution engine) does nothing: the module is not there, and
        numbaxent's helpers use no environment (it serves object-mode calls and exceptions with
        run-time values, which they do not have)."""

        def __init__(self, codegen):
            self._codegen = codegen

        def set_env(self, env_name, env):
            pass

        def __getattr__(self, name):
            return getattr(self._codegen, name)

    @register_pass(mutates_CFG=True, analysis_only=False)
    class LinkOnlyLowering(typed_passes.NativeLowering):
        _name = "numbaxent_link_only_lowering"

        def run_pass(self, state):
            if state.library is None:
                state.library = LinkOnlyLibrary(state.targetctx.codegen(), state.func_id.func_qualname)
            return super().run_pass(state)

    LinkOnlyCompiler = pipeline(LinkOnlyLowering)
    LinkOnlyCompiler.__doc__ = "Numba's nopython pipeline, lowering into a `LinkOnlyLibrary`."
