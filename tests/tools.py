"""What a test does when a tool it needs (a package, a browser, a model file) is missing.

Locally it skips, saying what to install; under ``CI=true`` (``.ci/run`` sets it) it fails instead, so CI
can never pass by skipping the very thing it is meant to check.
"""
from __future__ import annotations

import os

import pytest


def missing_tool(reason: str) -> None:
    """Skip the test (or, called at import time, the module) for a missing tool; under ``CI=true`` fail it."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: required here, not skipped)")
    pytest.skip(reason, allow_module_level=True)
