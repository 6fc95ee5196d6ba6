"""The library keeps the shape README's Layout section promises (issue 13's targets)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_no_oversized_module_or_function_and_no_stdlib_names():
    # Run as a script: tests do not import benchmarks (see test_test_setup.py).
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "house.py")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "modules over 600 lines: 0; functions over 100: 0; stdlib-named modules: 0" in out.stdout


def test_every_library_module_is_in_the_layout_section():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = []
    for path in sorted((ROOT / "cbir_tf").glob("*.py")):
        if path.stem != "__init__" and path.name not in layout:
            missing.append(path.name)
    assert not missing, f"modules not drawn in README's Layout: {missing}"
