"""The lower layers import nothing from above them, not even inside functions (where a cycle hides)."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hedgehog"

# module -> the hedgehog modules it may import (its own layer and those below)
BELOW = {"state": set(), "errors": set(), "atomic": set(), "cachedir": set()}
BELOW["feature_maps"] = {"ops", "errors"}
BELOW["losses"] = {"ops", "errors"}
BELOW["metrics"] = {"ops", "errors"}
BELOW["heads"] = set()
BELOW["interface"] = set()
BELOW["attention_paths"] = {"ops", "feature_maps", "heads", "state"}
BELOW["attention"] = {"ops", "feature_maps", "losses", "state", "errors", "heads", "interface", "attention_paths"}
BELOW["generation"] = {"attention", "state", "errors"} | BELOW["attention"]
# the model layer, bottom up: config, on-disk formats, the converted class, conversion, Auto classes, loading
BELOW["modelcard"] = {"atomic"}
BELOW["hf_config"] = set()
BELOW["formats"] = {"atomic", "attention", "errors", "hf_config", "modelcard"} | BELOW["attention"]
BELOW["modelclass"] = {"formats"} | BELOW["formats"]
BELOW["convert"] = {"attention", "generation", "modelclass"} | BELOW["generation"] | BELOW["modelclass"]
BELOW["hf"] = {"assets", "convert", "errors", "formats", "hf_config", "modelclass"} | BELOW["convert"]
BELOW["checkpoint"] = {"assets", "hf"} | BELOW["hf"]
BELOW["train/engine"] = {"errors"}  # the training engine knows devices and processes, not models or jobs
BELOW["ops/backends"] = set()
# the op layer takes tensors: it imports only itself and the leaf that says where the kernel is built
for _op in ("ops/__init__", "ops/masks", "ops/softmax", "ops/linear_attention", "ops/hybrid", "ops/recurrent", "ops/cpu_kernel"):
    BELOW[_op] = {"cachedir"}


def _imports(path: Path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hedgehog"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("hedgehog"))
    return {n.split(".")[1] for n in names if "." in n}


@pytest.mark.parametrize("module", sorted(BELOW))
def test_module_imports_only_from_below(module):
    found = _imports(SRC / f"{module}.py") - {module.split("/")[0]}
    assert found <= BELOW[module], f"hedgehog.{module} imports {sorted(found - BELOW[module])} from above it"



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
