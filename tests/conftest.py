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
