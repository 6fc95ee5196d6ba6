"""The shape of the library: module and function sizes, and module names, against the targets.

  python benchmarks/house.py          # prints the largest rooms and whether the targets hold
  python benchmarks/house.py --json   # the same figures as JSON

Targets (issue 13): no library module over 600 lines, no function over 100 lines, no module named
like a standard-library module (`io`, `html`, ...: they force `import html as _html` elsewhere).
Exits 1 when a target is missed, so it can run in CI.
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def measure(package: pathlib.Path = ROOT / "cbir_tf") -> dict:
    """Line counts of every module and function of `package`, and stdlib-shadowing names."""
    modules, functions, shadowing = {}, {}, []
    for path in sorted(package.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        source = path.read_text(encoding="utf-8")
        modules[rel] = source.count("\n")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions[f"{rel}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
        if path.stem in sys.stdlib_module_names:
            shadowing.append(rel)
    return {"modules": modules, "functions": functions, "shadowing": shadowing}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    m = measure()
    big = {k: v for k, v in m["modules"].items() if v > MAX_MODULE_LINES}
    long = {k: v for k, v in m["functions"].items() if v > MAX_FUNCTION_LINES}
    if args.json:
        print(json.dumps({**m, "too_big": big, "too_long": long}, indent=1))
    else:
        top = sorted(m["modules"].items(), key=lambda kv: -kv[1])[:8]
        print(f"{len(m['modules'])} modules, {sum(m['modules'].values())} lines; largest:")
        for name, lines in top:
            print(f"  {lines:5d}  {name}")
        longest = sorted(m["functions"].items(), key=lambda kv: -kv[1])[:5]
        print("longest functions:")
        for name, lines in longest:
            print(f"  {lines:5d}  {name}")
        shadowing = m["shadowing"] or 0
        print(f"modules over {MAX_MODULE_LINES} lines: {len(big)}; functions over "
              f"{MAX_FUNCTION_LINES}: {len(long)}; stdlib-named modules: {shadowing}")  # fmt: skip
    return 1 if big or long or m["shadowing"] else 0


if __name__ == "__main__":
    sys.exit(main())
