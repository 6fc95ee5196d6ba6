"""The shape of the library: its import graph against the stages of the data flow, and its sizes.

  python benchmarks/house.py          # the figures, the offenders, and whether the rules hold
  python benchmarks/house.py --json   # the same figures as JSON

Rules (exit 1 when one is broken, so that CI holds them):
  * no import cycle between modules (a package importing its own modules is not one);
  * no module uses another module's `_private` names;
  * no shim: a module of nothing but imports, a module-level `__getattr__`, a `__path__` alias;
  * no import runs back up the stages: data -> describe -> store -> search/rerank -> evaluate
    and the index (retriever, Beam, training) -> serve/export -> runs -> commands (`STAGES`);
  * at most `MAX_TOP_LEVEL` modules directly under cbir_tf/, none named like a stdlib module.
Warnings only (a module reads in one sitting because it holds one idea, not because of a count):
modules over `WARN_MODULE_LINES` lines and functions over `WARN_FUNCTION_LINES`.
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "cbir_tf"
WARN_MODULE_LINES = 600
WARN_FUNCTION_LINES = 100
MAX_TOP_LEVEL = 12
# The stages, lowest first: a module may import its own stage and those below, never above.
STAGES = (
    ("base", ("cbir_tf", "cbir_tf.config", "cbir_tf.fileio", "cbir_tf.quiet", "cbir_tf.remote")),
    ("data", ("cbir_tf.data",)),
    ("describe", ("cbir_tf.describe",)),
    ("store", ("cbir_tf.store",)),
    ("search/rerank", ("cbir_tf.search", "cbir_tf.rerank")),
    ("evaluate/index", ("cbir_tf.evaluate", "cbir_tf.retriever", "cbir_tf.train", "cbir_tf.beam")),
    ("serve/export", ("cbir_tf.serve", "cbir_tf.export")),
    ("runs", ("cbir_tf.runs",)),
    ("commands", ("cbir_tf.commands",)),
)


def _modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(package.rglob("*.py")):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def stage_of(module: str) -> int:
    """The index in `STAGES` of the stage a module belongs to (the longest prefix named)."""
    best, where = -1, 0
    for i, (_, prefixes) in enumerate(STAGES):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, where = len(p), i
    return where


def _resolve(name: str, modules: set[str]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def _imports(name: str, path: pathlib.Path, modules: set[str]):
    """(imported modules, private names used, shim reason or None) of one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rsplit(".", 1)[0]
    edges, private, aliases = set(), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = base.split(".")
            src = node.module or ""
            if node.level:
                src = ".".join(parts[: len(parts) - node.level + 1] + ([src] if src else []))
            if not src.startswith(PACKAGE):
                continue
            for a in node.names:
                full = f"{src}.{a.name}"
                target = full if full in modules else _resolve(src, modules)
                if full in modules:
                    aliases[a.asname or a.name] = full
                elif a.name.startswith("_") and not a.name.startswith("__"):
                    private.append(f"{name} imports {src}.{a.name}")
                if target and target != name:
                    edges.add(target)
        elif isinstance(node, ast.Import):
            for a in node.names:
                target = _resolve(a.name, modules) if a.name.startswith(PACKAGE) else None
                if target and target != name:
                    edges.add(target)
                    aliases[a.asname or a.name] = target
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if node.attr.startswith("__"):
                continue
            dotted, v = [], node.value
            while isinstance(v, ast.Attribute):
                dotted.append(v.attr)
                v = v.value
            if isinstance(v, ast.Name):
                owner = aliases.get(".".join([v.id, *reversed(dotted)]))
                if owner and owner != name:
                    private.append(f"{name} uses {owner}.{node.attr}")
    body = [
        n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
    ]
    shim = None
    if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in body) and not is_pkg:
        shim = "a module-level __getattr__"
    elif any(
        isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__path__" for t in n.targets)
        for n in body
    ):
        shim = "a __path__ alias"
    elif body and not is_pkg and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in body):
        shim = "nothing but imports"
    return edges, private, shim


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), packages' own
    re-exports left out."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            rest = [c for c in comp if not any(o.startswith(c + ".") for o in comp)]
            if len(rest) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def measure(package: pathlib.Path = ROOT / PACKAGE) -> dict:
    """The import graph's figures and offenders, and the sizes of modules and functions."""
    files = _modules(package)
    names = set(files)
    graph, private, shims, sizes, functions, shadowing = {}, [], [], {}, {}, []
    for name, path in files.items():
        edges, priv, shim = _imports(name, path, names)
        graph[name] = edges
        private += priv
        if shim:
            shims.append(f"{name}: {shim}")
        source = path.read_text(encoding="utf-8")
        rel = str(path.relative_to(ROOT))
        sizes[rel] = source.count("\n")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions[f"{rel}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
        if path.stem in sys.stdlib_module_names:
            shadowing.append(rel)
    upward = sorted(
        f"{a} ({STAGES[stage_of(a)][0]}) -> {b} ({STAGES[stage_of(b)][0]})"
        for a, targets in graph.items()
        for b in targets
        if stage_of(b) > stage_of(a)
    )
    top = sorted(n for n, p in files.items() if n.count(".") == 1 and p.name != "__init__.py")
    return {
        "modules": len(files),
        "import_edges": sum(len(t) for t in graph.values()),
        "upward": upward,
        "cycles": _cycles(graph),
        "private": sorted(set(private)),
        "shims": shims,
        "top_level": top,
        "shadowing": shadowing,
        "sizes": sizes,
        "functions": functions,
    }


def size_distribution(sizes: dict[str, int]) -> dict[str, int]:
    """How many modules have up to 100, 200, ... lines (the last bin: over 600)."""
    bins = {"<=100": 0, "101-200": 0, "201-300": 0, "301-400": 0, "401-500": 0, "501-600": 0}
    bins[">600"] = 0
    for n in sizes.values():
        if n > 600:
            bins[">600"] += 1
        else:
            bins[list(bins)[max(0, (n - 1) // 100)]] += 1
    return bins


def broken_rules(m: dict) -> list[str]:
    """One line per broken rule (empty: the house holds)."""
    out = []
    for key, what in (("cycles", "import cycles"), ("private", "uses of private names"),
                      ("shims", "shims"), ("upward", "imports running back up the stages"),
                      ("shadowing", "stdlib-named modules")):  # fmt: skip
        if m[key]:
            out.append(f"{len(m[key])} {what}: {m[key][:10]}")
    if len(m["top_level"]) > MAX_TOP_LEVEL:
        out.append(f"{len(m['top_level'])} modules directly under {PACKAGE}/ (max {MAX_TOP_LEVEL})")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    m = measure()
    big = {k: v for k, v in m["sizes"].items() if v > WARN_MODULE_LINES}
    long = {k: v for k, v in m["functions"].items() if v > WARN_FUNCTION_LINES}
    broken = broken_rules(m)
    if args.json:
        print(json.dumps({**m, "distribution": size_distribution(m["sizes"])}, indent=1))
        return 1 if broken else 0
    print(
        f"{m['modules']} modules, {sum(m['sizes'].values())} lines, {m['import_edges']} import "
        f"edges; running back up: {len(m['upward'])}; cycles: {len(m['cycles'])}; private "
        f"names used: {len(m['private'])}; shims: {len(m['shims'])}; modules under "
        f"{PACKAGE}/: {len(m['top_level'])}; stdlib-named: {len(m['shadowing'])}"
    )
    print("module sizes:", ", ".join(f"{k}: {v}" for k, v in size_distribution(m["sizes"]).items()))
    for name, lines in sorted(big.items(), key=lambda kv: -kv[1]):
        print(f"warning: {name} has {lines} lines (over {WARN_MODULE_LINES})")
    for name, lines in sorted(long.items(), key=lambda kv: -kv[1]):
        print(f"warning: {name} has {lines} lines (over {WARN_FUNCTION_LINES})")
    for line in broken:
        print(f"broken: {line}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
