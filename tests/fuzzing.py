"""What the property-based fuzz tests (test_fuzz*.py) share: the device they run on, and their
settings: a number of cases from an environment variable, derandomized (a CI run is repeatable)
unless RNNATTN_FUZZ_SEED=N draws another, equally repeatable, set (a long run split over processes)."""

from __future__ import annotations

import os

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (scripts/setup.sh installs it)")
from hypothesis import HealthCheck, settings  # noqa: E402

DEVICE = os.environ.get("RNNATTN_FUZZ_DEVICE", "cpu")
SEED = os.environ.get("RNNATTN_FUZZ_SEED")


def fuzz_settings(examples_variable: str, default: int):
    """Decorates a @given test: as many cases as `examples_variable` says (default `default`)."""
    examples = int(os.environ.get(examples_variable, str(default)))

    def decorate(test):
        test = settings(max_examples=examples, deadline=None, derandomize=SEED is None, database=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(test)
        return hypothesis.seed(int(SEED))(test) if SEED is not None else test

    return decorate
