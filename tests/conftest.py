"""Shared fixtures. ``real_data``: the real sample files (shared/data/real, see its README).

The repository and ``shared/`` are siblings (CI clones the repo into another folder with shared/
beside it), so the path is computed from the repo root's parent. Missing samples fail loudly:
the readers and evaluators must meet real formats, a silent skip would hide that.
"""
from __future__ import annotations

from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "README.md").is_file():
        pytest.fail(f"real sample data not found at {REAL_DATA}: the repository must sit beside "
                    f"a shared/ folder holding data/real (coco, crowdpose, mpii)", pytrace=False)
    return REAL_DATA
