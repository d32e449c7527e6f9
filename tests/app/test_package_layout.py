"""The package's shape, read from its source with ``ast`` (nothing is imported): no import cycle, no
function over 60 lines, the model and data layers below the trainer.

Every import counts: at module level, inside functions, under ``if TYPE_CHECKING``, relative or
absolute, ``importlib.import_module`` of a literal name (or an f-string's literal start), and the
modules a table names for loading by name (``NAME_TABLES``: the package's lazy exports, the command
line's subcommands).
``from pkg import name`` depends on ``pkg.name`` when that is a module (or the package's table says
where ``name`` comes from), else on ``pkg``'s ``__init__``. Importing ``a.b.c`` also runs the
``__init__`` of every package above it, except those that already hold the importer (a package's
``__init__`` importing its own submodules is no cycle).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# where each package's source lives (setup.py's package_dir: the Triton kernels ship as regap_fast.kernels)
SOURCES = {"regap_fast": ROOT / "regap_fast", "regap_fast.kernels": ROOT / "kernels"}
MAX_FUNCTION_LINES = 60
# modules that import others by names kept in a dict (module -> the dict; its values are module names,
# or tuples that start with one, absolute or relative to the package)
NAME_TABLES = {"regap_fast": "_EXPORTS", "regap_fast.cli": "COMMANDS"}


def module_name(package: str, path: Path) -> str:
    parts = (*package.split("."), *path.relative_to(SOURCES[package]).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(package, p): p for package, folder in SOURCES.items() for p in sorted(folder.rglob("*.py"))}


@functools.cache
def parse(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


def name_table(name: str) -> dict[str, str]:
    """Module ``name``'s table of NAME_TABLES: key -> the absolute name of the module it loads."""
    for node in parse(name).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if getattr(target, "id", None) == NAME_TABLES[name]:
            table = {k: v[0] if isinstance(v, tuple) else v for k, v in ast.literal_eval(node.value).items()}
            return {k: f"{name}{v}" if v.startswith(".") else v for k, v in table.items()}
    raise AssertionError(f"{name} has no {NAME_TABLES[name]} any more: update NAME_TABLES")


TABLES = {name: name_table(name) for name in NAME_TABLES}


@functools.cache
def top_level_names(name: str) -> set[str]:
    """The names module ``name`` binds at its top level (defined, assigned or imported)."""
    names = set()
    for node in parse(name).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        else:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def imported_modules(name: str):
    """The package's modules that module ``name`` imports (relative imports resolved). A name that is no
    module's source (a compiled extension, ``regap_fast._C``) or outside the package is left out."""
    is_package = MODULES[name].name == "__init__.py"
    for node in ast.walk(parse(name)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            if base not in MODULES:
                continue
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    yield f"{base}.{alias.name}"
                elif alias.name in TABLES.get(base, {}):
                    yield TABLES[base][alias.name]
                elif alias.name in top_level_names(base):
                    yield base
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            yield from modules_named_by(node.args[0])
    yield from TABLES.get(name, {}).values()


def modules_named_by(arg: ast.expr) -> list[str]:
    """``import_module``'s argument: a literal module name, or every module an f-string's literal start
    (``f"regap_fast.kernels.{name}"``) can begin (a relative name goes with ``__name__``: the lazy
    exports' table says which)."""
    if isinstance(arg, ast.Constant):
        return [arg.value] if arg.value in MODULES else []
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = arg.values[0].value
        return [m for m in MODULES if m.startswith(prefix) and not prefix.startswith(".")]
    return []


def packages_above(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def dependencies(name: str) -> set[str]:
    """The package's modules that importing module ``name`` (and calling its functions) may import."""
    mine = packages_above(name) | ({name} if MODULES[name].name == "__init__.py" else set())
    deps = set()
    for target in imported_modules(name):
        deps |= {target} | (packages_above(target) - mine)
    return deps - {name}


def import_graph() -> dict[str, set[str]]:
    return {name: dependencies(name) for name in MODULES}


def shortest_cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest path start -> ... -> start in ``graph`` (breadth first), or None."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for dep in sorted(graph.get(node, ())):
                if dep == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if dep not in came_from:
                    came_from[dep] = node
                    nxt.append(dep)
        frontier = nxt
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each module that is on one (each cycle once)."""
    found: dict[frozenset, list[str]] = {}
    for name in sorted(graph):
        cycle = shortest_cycle_through(graph, name)
        if cycle is not None:
            found.setdefault(frozenset(cycle), cycle)
    return list(found.values())


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"b", "d"}, "b": {"c"}, "c": {"a"}, "d": {"d2"}, "d2": {"d"}, "e": {"a"}}) == [
        ["a", "b", "c", "a"], ["d", "d2", "d"]]
    graph = import_graph()
    assert "regap_fast.model.vlm" in graph["regap_fast.model"]  # the __init__ imports its submodule
    assert "regap_fast.model" not in graph["regap_fast.model.vlm"]  # ... which is no cycle
    assert "regap_fast.train.loop" in graph["regap_fast.train"]  # a lazy import, inside a function
    assert "regap_fast.train.demo" in graph["regap_fast.cli"]  # named in the command table
    assert "regap_fast.integrations.transformers" in graph["regap_fast"]  # a lazy export of the package


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_model_and_data_layers_do_not_import_the_tools_above_them():
    """The trainer and the tools build on the model and the data, never the other way round."""
    above = ("regap_fast.train", "regap_fast.eval", "regap_fast.reproduce", "regap_fast.cli")
    graph = import_graph()
    wrong = {f"{name} -> {dep}" for name, deps in graph.items() for dep in deps
             if name.startswith(("regap_fast.model", "regap_fast.data")) and dep.startswith(above)}
    assert not wrong, sorted(wrong)


def test_no_function_is_longer_than_60_lines():
    too_long = [f"{MODULES[name].relative_to(ROOT)}:{node.lineno} {node.name} "
                f"({node.end_lineno - node.lineno + 1} lines)"
                for name in MODULES for node in ast.walk(parse(name))
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not too_long, "\n".join(too_long)
