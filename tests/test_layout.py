"""The layout's acceptance criteria (DESIGN.md "Layout"), checked on the source with `ast` and
regular expressions: nothing is imported. Each assertion lists every offender."""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "ftcluster"
MAX_FUNCTION_LINES = 80
GENERATORS = {PKG / "assets" / "make_assets.py"}  # a generator script, not library code


def package_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()  # a package's __init__ is the package's own node
    return ".".join(parts)


@lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@lru_cache(maxsize=None)
def all_modules() -> frozenset[str]:
    return frozenset(module_name(p) for p in package_files())


def imports_of(tree: ast.Module, *, me: str, is_package: bool, mods: frozenset[str]) -> set[str]:
    """Every ftcluster module a module imports, at module level or inside functions. `from a.b import c`
    is module a.b.c when that is a module of the package, else a.b; relative imports are resolved
    against the importing module's package (a package's __init__ is its own package)."""
    package = me if is_package else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "ftcluster" or a.name.startswith("ftcluster."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == "ftcluster" or base.startswith("ftcluster.")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in mods else base)
    found.discard(me)
    return found


def imported_modules(path: Path) -> set[str]:
    return imports_of(parse(path), me=module_name(path), is_package=path.name == "__init__.py", mods=all_modules())


def import_graph() -> dict[str, set[str]]:
    mods = all_modules()
    return {module_name(p): {m for m in imported_modules(p) if m in mods} for p in package_files()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component with more than one
    module (Tarjan), so the message names every tangle, not only the first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[set[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            sccs.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in sccs:
        if len(comp) < 2:
            continue
        start = min(comp)
        # shortest way back to `start` inside the component (BFS)
        prev: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w == start:
                        end = v
                        break
                    if w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append(list(reversed(path)) + [start])
    return cycles


def test_cycle_finder_finds_a_known_cycle() -> None:
    """The checker itself: a graph with a known 3-cycle and a DAG tail."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_resolution_on_this_package() -> None:
    """The resolver on facts of the tree: `from ftcluster.config import X` is the module config,
    and `from ftcluster import driver` is the module driver."""
    graph = import_graph()
    assert "ftcluster.config" in graph["ftcluster.driver"]
    cli_imports = graph["ftcluster.cli"]
    assert "ftcluster.driver" in cli_imports and "ftcluster" not in cli_imports, cli_imports


def test_import_resolution_of_relative_and_nested_imports() -> None:
    mods = frozenset({"ftcluster", "ftcluster.driver", "ftcluster.config", "ftcluster.launch", "ftcluster.launch.ray",
                      "ftcluster.launch.local"})
    src = (
        "from ..driver import to_job\n"          # relative, two levels: the driver module
        "from . import ray\n"                    # a sibling module
        "def f():\n"
        "    from ftcluster.config import JobConfig\n"  # inside a function: counts
        "    import ftcluster.launch\n"
        "from ftcluster import __version__\n"     # a name, not a module: the package itself
        "import torch\n")
    assert imports_of(ast.parse(src), me="ftcluster.launch.local", is_package=False, mods=mods) == {
        "ftcluster.driver", "ftcluster.launch.ray", "ftcluster.config", "ftcluster.launch", "ftcluster"}
    # In a package's __init__, `.` is the package itself.
    assert imports_of(ast.parse("from .ray import plan\nfrom .. import config\n"), me="ftcluster.launch",
                      is_package=True, mods=mods) == {"ftcluster.launch.ray", "ftcluster.config"}


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among ftcluster modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_launch_never_imports_the_driver() -> None:
    offenders = [rel(p) for p in package_files()
                 if p.is_relative_to(PKG / "launch") and "ftcluster.driver" in imported_modules(p)]
    assert not offenders, f"ftcluster/launch/ must not import ftcluster.driver: {offenders}"


def long_functions(path: Path, *, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for node in ast.walk(parse(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if n > limit:
                out.append(f"{rel(path) if path.is_relative_to(REPO) else path.name}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_long_function_checker(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(79))
    method_body = "".join(f"        x{i} = {i}\n" for i in range(79))
    src = f"def ok():\n{body}\nclass C:\n    def too_long(self):\n{method_body}        pass\n"
    (tmp_path / "m.py").write_text(src)  # ok: 1 + 79 = 80 lines; C.too_long: 81 (a method, nested)
    assert long_functions(tmp_path / "m.py") == ["m.py:83 too_long (81 lines)"]


def test_no_function_longer_than_80_lines() -> None:
    long = [f for path in package_files() if path not in GENERATORS for f in long_functions(path)]
    assert not long, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


BACKEND_INSIDES = re.compile(
    r"\b(?:ds_tensor|ds_shape|ds_numel|ds_process_group|ds_id|DTensor|placements)\b"
    r"|\bto_local\(|\bReplicate\("
    r"|\bShard\(\s*(?:dim\s*=\s*)?-?\d+\s*\)")  # torch's Shard(0) placement; not a `Shard(local=...)` record


def test_backend_shard_details_stay_in_parallel() -> None:
    hits = []
    for path in package_files():
        if path.is_relative_to(PKG / "parallel"):
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for m in BACKEND_INSIDES.finditer(line):
                hits.append(f"{rel(path)}:{lineno}: {m.group(0)}")
    assert not hits, "DeepSpeed partition attributes / DTensor placements outside ftcluster/parallel/:\n" + "\n".join(hits)


ASSEMBLY_CALLS = {"get_peft_model", "apply_peft", "build_meta_model", "TrainModule"}


def called_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def assembly_calls(path: Path) -> list[str]:
    tree = parse(path)
    calls = [f"{rel(path)}:{node.lineno} {called_name(node)}(" for node in ast.walk(tree)
             if isinstance(node, ast.Call) and called_name(node) in ASSEMBLY_CALLS]
    # Code run in a subprocess (`python -c SCRIPT`) lives in string literals: search those too.
    call_in_text = re.compile(r"(?<!def )(?<![\w])(?:[A-Za-z_][\w.]*\.)?(" + "|".join(sorted(ASSEMBLY_CALLS)) + r")\(")
    skip = docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "\n" in node.value and id(node) not in skip:
            calls += [f"{rel(path)}:{node.lineno} {m.group(1)}( in a script string" for m in call_in_text.finditer(node.value)]
    return calls


def test_the_trained_module_is_assembled_in_one_place() -> None:
    allowed = {PKG / "model" / "build.py", Path(__file__).resolve()}
    files = [p for d in ("ftcluster", "tests", "bench") for p in sorted((REPO / d).rglob("*.py"))
             if "__pycache__" not in p.parts and p.resolve() not in allowed]
    calls = [c for path in files for c in assembly_calls(path)]
    assert not calls, ("outside ftcluster/model/build.py the trained module is built only through "
                       "build_module(job):\n" + "\n".join(calls))
