"""The lower layers import nothing from above them, not even inside functions (where a cycle hides)."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hedgehog"

# The layers, bottom up: a module may import from its own folder and the folders below it, never above (docs/DESIGN.md).
LAYERS = ["errors", "utils", "ops", "modules", "layers", "data", "models", "eval", "train", "jobs", "bench", "cli",
          "__init__", "__main__"]


def _layer(module: str) -> int:
    """``hedgehog.ops.masks`` -> the rank of ``ops``; a module outside every layer folder is an error."""
    top = module.split(".")[1] if "." in module else "__init__"
    assert top in LAYERS, f"{module} is in no layer folder: add it to docs/DESIGN.md and LAYERS"
    return LAYERS.index(top)


def test_every_module_sits_in_a_layer_and_imports_only_from_its_layer_or_below():
    graph = _module_graph()
    up = sorted(f"{m} imports {t}" for m, ts in graph.items() for t in ts if _layer(t) > _layer(m))
    assert not up, "imports from above: " + "; ".join(up)


def test_the_layer_check_sees_an_upward_import():
    assert _layer("hedgehog.jobs.pipeline") > _layer("hedgehog.eval.fidelity") > _layer("hedgehog.ops.masks")
    assert _layer("hedgehog") == LAYERS.index("__init__")
    with pytest.raises(AssertionError, match="no layer folder"):
        _layer("hedgehog.misc.thing")


def _module_graph():
    """hedgehog module -> the hedgehog modules it imports anywhere in its file (function bodies included).
    ``from hedgehog.ops import cpu_kernel`` is an edge to the submodule, not to the package."""
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hedgehog"):
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                targets += subs + ([node.module] if len(subs) < len(node.names) else [])
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.startswith("hedgehog")]
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t not in (m, "hedgehog"):
                    graph[m].add(t)
    return graph


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return set(out)


def test_no_import_cycles():
    assert _cycles(_module_graph()) == set()


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}
