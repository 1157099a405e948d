"""Shared fixtures. Real reference files come from ../shared/data (or $GPFM_TEST_DATA); tests skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("GPFM_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not (d / "cmu_small_region.svs").is_file():
        pytest.skip(f"reference data not found at {d} (set GPFM_TEST_DATA)")
    return d
