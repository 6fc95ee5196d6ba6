"""Shared test fixtures: the project's golden data, ../shared, and the skip policy of CI.

- `golden_dir` is the project's own copy of the reference values (tests/fixtures/golden): golden
  tests run in every clone, and a missing file there fails the test (a broken checkout), never
  skips it.
- `shared_dir` / `shared_path` reach the workspace's ../shared folder (real weights, real photos;
  override the place with CBIR_SHARED). Tests that need it skip with one reason, starting with
  `SHARED_ABSENT`, when it is not there: a user's clone has no ../shared.
- CBIR_FAIL_ON_SKIP=1 (set by .ci/run) turns every skip whose reason is not allowed into a
  failure. Allowed: the reasons in `ALLOWED_SKIPS`, and `SHARED_ABSENT` skips while the shared
  folder itself is absent (the bare-clone run); a missing file inside a present ../shared fails.
"""

from __future__ import annotations

import os
import pathlib
import re

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "fixtures" / "golden"
GOLDEN_FILES = (
    "diffusion_public.npz",
    "gnd_rparis6k.pkl",
    "map_edge_cases.json",
    "map_rparis6k.npz",
    "pooling_cirtorch.npz",
    "rmac_regions.json",
)
SHARED_ABSENT = "needs the workspace's shared folder"
# Skip reasons CI accepts (regular expressions matched at the start of the reason): hardware or
# platform a CI machine may lack. Everything else a test skips for is a gap CI must not hide.
ALLOWED_SKIPS = (
    r"needs a GPU",
    r"per-thread priority: Linux",
    r"needs root to mount a size-limited tmpfs",
)


def shared_root() -> pathlib.Path:
    """Where ../shared is looked for: $CBIR_SHARED, else the folder beside the project."""
    return pathlib.Path(os.environ.get("CBIR_SHARED", ROOT.parent / "shared"))


def shared_path(*parts: str) -> pathlib.Path:
    """A file or folder under ../shared; skips the calling test, naming it, when it is absent."""
    path = shared_root().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{SHARED_ABSENT}: {path} not found (set CBIR_SHARED to point at it)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The read-only ../shared folder (override with CBIR_SHARED); skips when absent."""
    return shared_path()


def golden_path() -> pathlib.Path:
    """tests/fixtures/golden; fails the calling test (never skips it) when a file is missing."""
    missing = [name for name in GOLDEN_FILES if not (GOLDEN / name).is_file()]
    if missing:
        pytest.fail(f"golden data missing from {GOLDEN}: {', '.join(missing)} (see its README)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    """tests/fixtures/golden: reference values of the field's reference implementations."""
    return golden_path()


# The real Revisited Paris ground truth (a golden file) and a dataset folder around it, shared by
# test_ground_truth, test_revisited and test_prepare.
RPARIS_SHA = "d2e729a5293dda7dda8a15c8383424a42e4964a2c4cfea2f32fa85d11d2df499"


@pytest.fixture(scope="session")
def real_gnd_path(golden_dir) -> pathlib.Path:
    return golden_dir / "gnd_rparis6k.pkl"


@pytest.fixture(scope="session")
def rparis_jpg(tmp_path_factory, real_gnd_path) -> pathlib.Path:
    """Empty stand-ins for the 6392 images of rparis6k, made once (thousands of files)."""
    from cbir_tf.data.ground_truth import load_ground_truth

    jpg = tmp_path_factory.mktemp("rparis_jpg")
    cfg = load_ground_truth(real_gnd_path)
    for n in [*cfg["imlist"], *cfg["qimlist"]]:
        (jpg / f"{n}.jpg").touch()
    return jpg


@pytest.fixture
def rparis_folder(tmp_path, real_gnd_path, rparis_jpg):
    """<tmp>/data/datasets/rparis6k with the real ground truth; jpg/ links to the stand-ins."""
    import shutil

    from cbir_tf.data.ground_truth import load_ground_truth

    folder = tmp_path / "data" / "datasets" / "rparis6k"
    folder.mkdir(parents=True)
    shutil.copy(real_gnd_path, folder / "gnd_rparis6k.pkl")
    os.symlink(rparis_jpg, folder / "jpg")
    return folder, load_ground_truth(real_gnd_path)


def skip_is_allowed(reason: str) -> bool:
    """Whether CI accepts a skip with this reason (see the module docstring)."""
    reason = reason.removeprefix("Skipped: ")
    if reason.startswith(SHARED_ABSENT):
        return not shared_root().is_dir()
    return any(re.match(pattern, reason) for pattern in ALLOWED_SKIPS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CBIR_FAIL_ON_SKIP") != "1" or not report.skipped:
        return
    if hasattr(report, "wasxfail") or not isinstance(report.longrepr, tuple):
        return
    reason = str(report.longrepr[2])
    if not skip_is_allowed(reason):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped for a reason CI does not allow (CBIR_FAIL_ON_SKIP=1): {reason}\n"
            f"allowed: {', '.join(ALLOWED_SKIPS)}, and '{SHARED_ABSENT}' while "
            f"{shared_root()} is absent (tests/conftest.py)"
        )
