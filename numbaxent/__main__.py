"""`numbaxent` command line: `python -m numbaxent COMMAND [options]`.

Each sub-command lives in its own module (imported only when used, so the core never imports the
CLI's dependencies) and exposes `main(argv) -> int` (or the function named after `module:`).
"""
from __future__ import annotations

import importlib
import os
import sys

# status of a command whose reader went away (``numbaxent ... | head``): what the shell reports for a
# program that SIGPIPE ended, 128 + 13
BROKEN_PIPE_STATUS = 141

COMMANDS = {
    "demo": ("numbaxent.demo", "train a small NumPy MLP on handwritten digits with numbaxent's loss"),
    "eval": ("numbaxent.eval_cli", "stream-evaluate saved logits against targets (loss, accuracy, ...)"),
    "eval-hidden": ("numbaxent.eval_cli:hidden_main",
                    "evaluate a language model from hidden states and its output layer"),
    "merge": ("numbaxent.eval_cli:merge_main", "merge evaluator states saved by 'eval --save-state'"),
    "bench": ("numbaxent.bench", "side-by-side speed comparison with the memory floors, PyTorch, JAX"),
    "warmup": ("numbaxent._warmup", "compile every kernel ahead of time into the on-disk cache"),
    "cache": ("numbaxent.cache_cli", "show where compiled kernels are cached, their size; --clear"),
}


def _usage() -> str:
    lines = ["usage: numbaxent [--version] COMMAND [options]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "'numbaxent COMMAND --help' describes a command's options."]
    return "\n".join(lines)


def _version() -> str:
    try:  # the installed distribution's version; the package's own when run from a source tree
        from importlib.metadata import PackageNotFoundError, version

        return version("numbaxent")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _dispatch(argv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"numbaxent {_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"numbaxent: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, func = COMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, func or "main")(rest) or 0)


def _stdout_to_devnull() -> None:
    # the interpreter flushes stdout once more at exit: point it at /dev/null so that flush cannot
    # fail again and print "Exception ignored ... BrokenPipeError"
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured stdout)
        pass


def main(argv=None) -> int:
    """Run ``numbaxent COMMAND [options]``; returns the exit status.

    A reader that goes away before the output is written (``numbaxent ... --help | head -1``) ends
    the command quietly with status 141, as it would a C program, instead of a ``BrokenPipeError``
    traceback.
    """
    try:
        try:
            return _dispatch(argv)
        finally:  # also after argparse's SystemExit: write the buffered output now, where we can
            sys.stdout.flush()  # catch a closed pipe, not at interpreter exit
    except BrokenPipeError:
        _stdout_to_devnull()
        return BROKEN_PIPE_STATUS


if __name__ == "__main__":
    sys.exit(main())
