"""Imports run downward only, and no module imports itself back through others.

The layers, bottom first (docs/architecture.md). A package may import its own modules and
any package of a lower layer; never one of the same layer (``server_app`` and ``client_app``
are siblings that meet only in ``protocol``) or of a higher one. Imports inside functions count
too: a lazy import hides a cycle, it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS: list[tuple[str, ...]] = [
    ("workloads",),  # shared by both apps: config, data, partitions, models, training math
    ("estimators",),  # memory estimator, performance model
    ("protocol",),  # the messages between server and clients, their keys and wire format
    ("strategies",),  # the server's round: aggregation, teachers, optimizer, batch policies
    ("server_app", "client_app"),  # the two Flower apps: glue
    ("flb",),  # the Python API and the launcher
    ("deploy",),  # real SuperNodes: certificates, node data, the local rehearsal
    ("experiments",),  # studies and benchmarks
]
LAYER_OF = {pkg: i for i, group in enumerate(LAYERS) for pkg in group}
# Lower packages a package must not use all the same: a client knows the protocol, not the server's math.
FORBIDDEN = {("client_app", "strategies")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in LAYER_OF for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body (``from a import b``: ``a.b`` if a module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b (why)`` for every import that runs upward or sideways."""
    out = []
    for src, targets in sorted(graph.items()):
        a = src.split(".")[0]
        for dst in sorted(targets):
            b = dst.split(".")[0]
            if a == b:
                continue
            if (a, b) in FORBIDDEN:
                out.append(f"{src} -> {dst} (forbidden: {a} must not use {b})")
            elif LAYER_OF[b] > LAYER_OF[a]:
                out.append(f"{src} -> {dst} (upward: {a} is below {b})")
            elif LAYER_OF[b] == LAYER_OF[a]:
                out.append(f"{src} -> {dst} (sideways: {a} and {b} are siblings)")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_every_top_level_package_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "notebooks"}
    assert packages <= set(LAYER_OF), f"packages without a layer: {sorted(packages - set(LAYER_OF))}"


def test_imports_run_downward_only():
    problems = layer_violations(import_graph())
    assert not problems, "imports that break the layering:\n  " + "\n  ".join(problems)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_what_they_forbid():
    graph = {"server_app.preflight": {"client_app.job", "workloads.config"},
             "client_app.job": {"protocol.arrays", "strategies.arrays"}, "strategies.arrays": set(), "workloads.config": set(), "protocol.arrays": set(),
             "workloads.data": {"workloads.node_data", "estimators.memory"},
             "workloads.node_data": {"workloads.data"}, "estimators.memory": set()}
    assert layer_violations(graph) == [
        "client_app.job -> strategies.arrays (forbidden: client_app must not use strategies)",
        "server_app.preflight -> client_app.job (sideways: server_app and client_app are siblings)",
        "workloads.data -> estimators.memory (upward: workloads is below estimators)",
    ]
    assert cycles(graph) == [["workloads.data", "workloads.node_data"]]


MAX_FUNCTION_LINES = 60


def test_functions_are_short():
    """Every function of the product and the studies fits on a screen (tests and notebooks aside)."""
    long = []
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(sorted(long))
