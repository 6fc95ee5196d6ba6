"""README is the front page and docs/ the manual (issue 26 items 5 and 6): every link and every
relative path in them resolves, every page is reachable from README, and no resolved version
of a dependency is written in prose."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
# Paths of the repository written in prose: `cbir_tf/search/ann.py`, `benchmarks/house.py`.
REPO_PATH = re.compile(r"`((?:cbir_tf|tests|benchmarks|configs|docs|\.ci)/[\w./-]*)`")


def _ids(path):
    return path.relative_to(ROOT).as_posix()


def _prose(text: str) -> str:
    """The text without its fenced code blocks (commands, not links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchors(page: pathlib.Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    out = set()
    for line in _prose(page.read_text(encoding="utf-8")).splitlines():
        if m := re.match(r"^#{1,6} (.*)", line):
            text = re.sub(r"[`*]", "", m.group(1)).strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def links(page: pathlib.Path) -> list[str]:
    return LINK.findall(_prose(page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=_ids)
def test_every_link_and_path_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {_ids(file)}")
    for path in REPO_PATH.findall(page.read_text(encoding="utf-8")):
        if not (ROOT / path).exists():
            broken.append(f"`{path}`: not in the repository")
    assert not broken, broken


def test_readme_is_the_front_page_and_reaches_every_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200, "README is the front page: the rest goes to docs/"
    for heading in ("Index and search your own photos", "Where to read more"):
        assert f"## {heading}" in readme
    # Pictures of the search page and of a report, both in the repository.
    images = [t for t in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme) if not t.startswith("http")]
    assert {"docs/serve.png", "docs/report.png"} <= set(images)
    # Every page of the manual is reachable from README.
    seen, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        for target in links(page):
            path = target.partition("#")[0]
            if path.endswith(".md") and not re.match(r"^[a-z]+:", path):
                found = (page.parent / path).resolve()
                if found not in seen and found.exists():
                    seen.add(found)
                    todo.append(found)
    assert set(PAGES[1:]) <= seen, sorted(_ids(p) for p in set(PAGES[1:]) - seen)


def _requirements() -> list[str]:
    """The distribution names setup.py requires (install_requires and the extras)."""
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    return sorted(set(re.findall(r'"([A-Za-z][\w.-]*)(?:\[\w+\])?[<>=!~]', text)))


def test_no_resolved_versions_in_prose():
    names = _requirements()
    assert {"tensorflow", "keras", "apache-beam", "pillow", "faiss-cpu"} <= set(names)
    packages = "|".join(re.escape(n) for n in [*names, "protobuf", "pyarrow"])
    resolved = re.compile(rf"\b(?:{packages})[ =]+\d+\.\d+\.\d+", re.I)
    for path in [*PAGES, ROOT / "setup.py"]:
        found = resolved.findall(path.read_text(encoding="utf-8"))
        assert not found, f"{_ids(path)} names resolved versions: {found}"


def test_every_upper_bound_in_setup_py_says_why():
    lines = (ROOT / "setup.py").read_text(encoding="utf-8").splitlines()
    for k, line in enumerate(lines):
        if re.search(r'"[\w.-]+[^"]*<', line):
            assert lines[k - 1].strip().startswith("#") or "#" in line, line
