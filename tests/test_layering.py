"""The layering of DESIGN.md, checked on the import graph of src/patchlm (every import, function-local ones too):
no import cycle between modules, and no layer importing a layer above it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "patchlm"

# layer of each top-level part of the package; a module may import its own layer's parts or lower ones, except
# that methods may not import each other's internals beyond the allowances below.
LAYERS = {
    "core": ["__init__", "patch", "errors", "paths", "typed"],
    "inputs": ["models", "data"],
    "engine": ["train", "evaluate"],
    "methods": ["adapters", "merge", "depth", "federated", "moe", "quant", "route", "select", "qnewton", "report"],
    "cli": ["cli", "__main__"],  # `python -m patchlm` (torchrun) runs the CLI
}
ORDER = list(LAYERS)
PART_LAYER = {part: layer for layer, parts in LAYERS.items() for part in parts}
# method -> methods whose public API it may use (a merge or a federated round works on adapter patches)
METHOD_USES = {"merge": {"adapters"}, "federated": {"adapters"}, "route": {"adapters"}, "depth": set(),
               "adapters": set()}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for n in names:
                if n in modules and n != mod:
                    graph[mod].add(n)
    return graph


def _part(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycle_between_modules():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n):], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layers_import_only_downwards():
    bad = []
    for mod, deps in _graph().items():
        src_part = _part(mod)
        if src_part not in PART_LAYER:
            bad.append(f"{mod}: part {src_part!r} has no layer in DESIGN.md's picture (add it to LAYERS)")
            continue
        src_layer = ORDER.index(PART_LAYER[src_part])
        for d in deps:
            dst_part = _part(d)
            if dst_part == "__init__" or dst_part == src_part:
                continue
            dst_layer = ORDER.index(PART_LAYER[dst_part])
            if dst_layer > src_layer:
                bad.append(f"{mod} ({PART_LAYER[src_part]}) imports {d} ({PART_LAYER[dst_part]})")
            elif dst_layer == src_layer == ORDER.index("methods") and dst_part not in METHOD_USES.get(src_part, set()):
                bad.append(f"{mod} (method {src_part}) imports another method's module {d}")
    assert not bad, "layering violations:\n" + "\n".join(sorted(bad))


def test_no_pickle_loader_anywhere_in_the_package():
    """No code path reaches a pickle loader: torch.load, pickle.load(s) and their kin appear nowhere in src or
    bench."""
    pattern = re.compile(r"\btorch\.load\(|\bpickle\.loads?\(|\bimport pickle\b|\bfrom pickle import\b|"
                         r"\bcloudpickle\b|\bdill\b|\bjoblib\.load\(|\ballow_pickle\s*=\s*True|"
                         r"\bweights_only\s*=\s*False|\btorch\.jit\.load\(|\bread_pickle\(|\bshelve\b|"
                         r"\bmarshal\.loads?\(")
    bench = SRC.parents[1] / "bench"  # its .cache (ignored: caches, side venvs such as mergekit's) is not ours
    files = [*SRC.rglob("*.py"), *(p for p in bench.rglob("*.py") if (bench / ".cache") not in p.parents)]
    assert len(files) > 50
    hits = [f"{p}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "pickle loaders:\n" + "\n".join(hits)
