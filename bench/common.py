"""Helpers shared by the benchmark scripts (run as `python bench/<script>.py`, which puts the
repository root on sys.path so that `bench.common` imports)."""

from __future__ import annotations

import os


def load_average() -> str:
    """1/5/15-minute load averages: the machine may be shared, so the numbers carry its noise."""
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"
