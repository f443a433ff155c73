"""Shared fixtures: deterministic seeding and the optional ../shared/data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BSQ_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (or $BSQ_SHARED_DATA); tests using it skip when it is absent, as on users' machines."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data check skipped: {SHARED_DATA} is absent (set BSQ_SHARED_DATA to run it)")
    return SHARED_DATA
