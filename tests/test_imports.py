"""No import cycles between star_elastic modules (issue 10).

Every module under star_elastic/ is parsed with `ast` (nothing is imported), and every import
statement naming a star_elastic module becomes an edge of a graph: module-level and function-level
imports alike (a lazy import only hides a cycle), relative and absolute, and a package `__init__`
importing its submodules. `from pkg import name` is an edge to the submodule `pkg.name` when there
is one, else to `pkg`. Not counted (as in import-linter / grimp): the parent packages that Python
initialises on the way to a submodule. The one loop through those left is hf.py's lazy import of
elastic/manifest.py, which first runs elastic/__init__.py, whose slicing.py imports hf.py: kept inside
the function on purpose (see `hf.check_elastic_manifest`).

The same graph keeps the command layer on top (issue 10): no library module imports cli.py,
commands.py or serve/cli.py, and cli.py itself only parses (`build_parser`, `main`).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "star_elastic"


def module_files() -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package __init__)} for every module of star_elastic."""
    mods = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        mods[".".join(parts)] = (f, is_package)
    return mods


def _known(name: str, mods) -> str | None:
    """`name` if it is a module of ours, else its longest prefix that is one (None: not ours)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, f: Path, is_package: bool, mods) -> dict[str, int]:
    """{star_elastic module imported by `name`: line of the first such import}."""
    here = name.split(".") if is_package else name.split(".")[:-1]  # the package that `.` means
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(here):
                    continue
                base = ".".join(here[:len(here) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        for t in targets:
            t = _known(t, mods) if t.split(".")[0] == "star_elastic" else None
            if t is not None and t != name:
                found.setdefault(t, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    mods = module_files()
    return {name: imports_of(name, f, pkg, mods) for name, (f, pkg) in mods.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[tuple[list[str], set[str]]]:
    """(one cycle, first node repeated at the end; all the modules tangled with it) for every
    strongly connected component of more than one module (Tarjan): every tangle is reported."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:  # the shortest way from the first module back to itself, inside the component
        start = min(comp)
        paths, seen = {start: [start]}, {start}
        queue = [start]
        while queue:
            v = queue.pop(0)
            nxt = [w for w in sorted(graph[v]) if w in comp]
            if start in nxt:
                out.append((paths[v] + [start], comp))
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return out


def describe(cycle: list[str], comp: set[str], graph) -> str:
    files = {name: f.relative_to(ROOT) for name, (f, _) in module_files().items()}
    lines = [f"  {' -> '.join(cycle)}"] + [f"    {files[a]}:{graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:])]
    if len(comp) > len(cycle) - 1:
        lines.append(f"    (also in this tangle: {', '.join(sorted(comp - set(cycle)))})")
    return "\n".join(lines)


def test_graph_sees_imports():
    """The parser finds the kinds of import it must (else 'no cycle' would prove nothing)."""
    graph = import_graph()
    assert "star_elastic.hf" in graph["star_elastic"]  # package __init__, relative
    assert "star_elastic.elastic.slicing" in graph["star_elastic.elastic"]
    assert "star_elastic.hf" in graph["star_elastic.elastic.slicing"]  # `from star_elastic import hf`
    assert "star_elastic.evaluate" in graph["star_elastic.commands"]  # function-level
    assert "star_elastic.commands" in graph["star_elastic.cli"]  # `from . import commands`
    assert "star_elastic.elastic.checkpoint" in graph["star_elastic.serve.engine"]  # `from ..elastic.checkpoint`
    assert "star_elastic.cli" in graph["star_elastic.__main__"]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles between star_elastic modules:\n" + "\n".join(
        describe(c, comp, graph) for c, comp in found)


# The command layer: argument parsing (cli.py, and serve/cli.py's parsers) and the run function of
# every subcommand (commands.py, serve/cli.py). It sits on top: it imports the library, never the
# other way round, so that the library stays usable without the command line.
COMMAND_LAYER = {"star_elastic.__main__", "star_elastic.cli", "star_elastic.commands", "star_elastic.serve.cli"}


def test_library_never_imports_the_command_layer():
    graph = import_graph()
    assert COMMAND_LAYER <= set(graph), f"a command-layer module is gone: {sorted(COMMAND_LAYER - set(graph))}"
    files = {name: f.relative_to(ROOT) for name, (f, _) in module_files().items()}
    found = [f"  {files[a]}:{line} imports {b}" for a, targets in sorted(graph.items()) if a not in COMMAND_LAYER
             for b, line in sorted(targets.items()) if b in COMMAND_LAYER]
    assert not found, "library modules importing the command line (cli / commands / serve.cli):\n" + "\n".join(found)


def test_cli_only_parses():
    """cli.py defines the flags and `main`; every `cmd_*` run function lives in commands.py (or
    serve/cli.py), and no library module defines one."""
    mods = module_files()
    tree = ast.parse(mods["star_elastic.cli"][0].read_text())
    top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert top == {"build_parser", "main"}, f"star_elastic/cli.py defines {sorted(top)}"
    stray = [f"{f.relative_to(ROOT)}: {n.name}" for name, (f, _) in sorted(mods.items()) if name not in COMMAND_LAYER
             for n in ast.parse(f.read_text()).body
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("cmd_")]
    assert not stray, "command run functions outside commands.py / serve/cli.py:\n" + "\n".join(stray)
