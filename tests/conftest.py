"""Shared test configuration.

Under CI (``CI`` set in the environment) hypothesis runs derandomized: the same examples on every run,
so a red CI always reproduces. Locally it explores new examples each run (``--hypothesis-seed=N``
replays one).
"""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


import contextlib  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402


@contextlib.contextmanager
def kernel_path(path):
    """Force the row kernels or the column kernels for every 2-D shape (``path`` 'rows' or
    'columns'; K-dim and Fortran-ordered input always take the column kernels); None leaves the
    dispatch alone."""
    from numbaxent import _kernels as k

    saved = k.COLUMN_MAX_C
    if path == "rows":
        k.COLUMN_MAX_C = -1
    elif path == "columns":
        k.COLUMN_MAX_C = 2**62
    try:
        yield
    finally:
        k.COLUMN_MAX_C = saved


@pytest.fixture(params=["rows", "columns"])
def each_kernel_path(request):
    """Run the test once through the row kernels and once through the column kernels."""
    with kernel_path(request.param):
        yield request.param


def stable_seed(*params) -> int:
    """A seed from the parameters' text: the same in every process (``hash()`` of a tuple holding
    strings changes with each interpreter's hash randomisation)."""
    return zlib.crc32(repr(params).encode())


WARMUP_MIN_TESTS = 300  # a run this large reaches most kernel variants: compile them first, in parallel


def pytest_collection_finish(session):
    """Before a large run, compile every kernel variant into the kernel cache with `numbaxent
    warmup`, one process per CPU: the tests then load kernels instead of compiling them one after
    another on one core (a cold run's time is mostly compilation). With a warm cache this takes a
    few seconds. `NUMBAXENT_TEST_WARMUP=0` turns it off.

    Under pytest-xdist (`-n N`) every worker collects, so the first worker to get here runs the
    warm-up while the others wait on a lock, and the controller prints its summary at the end."""
    if len(session.items) < WARMUP_MIN_TESTS or os.environ.get("NUMBAXENT_TEST_WARMUP") == "0":
        return
    if session.config.option.collectonly:
        return
    if getattr(session.config, "workerinput", None) is None:  # no xdist: this process runs the tests
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("numbaxent warmup (kernel cache; NUMBAXENT_TEST_WARMUP=0 skips it):")
        line = _run_warmup()
        if reporter is not None:
            reporter.write_line(line)
        return
    import fcntl

    # an xdist worker is a child of the controller: its pid names this run's warm-up
    summary = _warmup_summary_path(os.getppid())
    with open(f"{summary}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(summary):
            line = _run_warmup()
            with open(summary, "w") as f:
                f.write(line)


def _warmup_summary_path(controller_pid: int) -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"numbaxent-test-warmup-{controller_pid}")


def _run_warmup() -> str:
    """Run `numbaxent warmup`; return its last line (the time it took), or why it failed."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "numbaxent", "warmup"], capture_output=True,
                       text=True)
    if r.returncode != 0:  # the tests would compile on first use instead; say why
        print(r.stderr, file=sys.stderr)
    lines = r.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {r.returncode}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Under pytest-xdist, report the workers' warm-up (see `pytest_collection_finish`)."""
    if getattr(config, "workerinput", None) is not None:
        return
    summary = _warmup_summary_path(os.getpid())
    if os.path.exists(summary):
        with open(summary) as f:
            terminalreporter.write_line(f"numbaxent warmup (kernel cache, run by the first xdist "
                                        f"worker; NUMBAXENT_TEST_WARMUP=0 skips it): {f.read()}")
        for path in (summary, f"{summary}.lock"):
            with contextlib.suppress(OSError):
                os.remove(path)
