"""Shared test fixtures: where ../shared lives, and a skip when it is absent."""

import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _shared_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CBIR_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The read-only ../shared folder (override with CBIR_SHARED); skips when absent."""
    path = _shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set CBIR_SHARED to point at it)")
    return path


@pytest.fixture(scope="session")
def golden_dir(shared_dir) -> pathlib.Path:
    """../shared/golden: reference values of the field's reference implementations."""
    path = shared_dir / "golden"
    if not path.is_dir():
        pytest.skip(f"golden data folder {path} not found")
    return path
