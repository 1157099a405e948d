"""A small demo cohort shared by the demo tests (18 patients, 22 slides of 1280-1536 px; a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpfm.demo.cohort import make_cohort

SMALL = dict(n_patients=18, two_slide_fraction=0.25, slide_size=(1280, 1536), roi_per_slide=6, svs_every=4)


@pytest.fixture(scope="session")
def demo_small() -> dict:
    """The parameters of `demo_cohort` (besides seed=3)."""
    return dict(SMALL)


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "cohort"
    make_cohort(out, seed=3, workers=1, quiet=True, **SMALL)
    return out
