"""The library keeps the shape the Layout section draws (docs/design.md, linked from README),
and the import rules of the house."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_import_graph_keeps_the_rules_of_the_house():
    # Run as a script: tests do not import benchmarks (see test_test_setup.py).
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "house.py")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"running back up: 0; cycles: 0; private names used: 0; shims: 0", out.stdout)


def layout_section() -> str:
    """The "## Layout" section: README's own, or that of the docs page README links for it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if "\n## Layout" in readme:
        return readme.split("\n## Layout", 1)[1]
    for target in re.findall(r"\]\(([^)#\s]+\.md)#layout\)", readme):
        page = (ROOT / target).read_text(encoding="utf-8")
        if "\n## Layout" in page:
            return page.split("\n## Layout", 1)[1]
    raise AssertionError("README has no Layout section and links no page#layout that has one")


def _layout_entries() -> list[str]:
    """The Layout block's entries (a line and its indented continuation), each prefixed with
    the section header it stands under."""
    block = layout_section().split("```", 2)[1]
    entries, header = [], ""
    for line in block.splitlines():
        if line.startswith("─"):
            header = line
        elif line.startswith(" ") and entries:
            entries[-1] += " " + line.strip()
        elif line.strip():
            entries.append(header + " | " + line)
    return entries


def test_every_library_module_is_named_in_the_layout_section():
    entries = _layout_entries()
    missing = []
    for path in sorted((ROOT / "cbir_tf").rglob("*.py")):
        rel = path.relative_to(ROOT / "cbir_tf")
        if path.name == "__init__.py":
            continue
        folder = f"{rel.parent.name}/" if rel.parent.parts else "cbir_tf/"
        named = [e for e in entries if re.search(rf"(^|[\s/(,]){re.escape(path.name)}\b", e)]
        if not any(folder in e for e in named):
            missing.append(str(rel))
    assert not missing, f"modules the Layout section does not name in their folder: {missing}"
