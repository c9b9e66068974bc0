"""The package's folders are its architecture: imports point down the layers, never up, and no cycles.

Every `import` / `from ... import` in src/leanformer (function-level ones too: a lazy import is still a
dependency) is read with `ast`. Each module belongs to a room (its first package below leanformer, or
the top-level module); a room may import rooms of a lower layer, or modules of its own room.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "leanformer"

# Higher number = higher layer. Rooms on one layer must not import each other.
LAYERS: dict[str, int] = {
    "__main__": 10,  # `python -m leanformer`: the command line
    "cli": 9,
    "serve": 8,
    "measure": 7,
    "export": 6,
    "train": 6,
    "encoders": 5,
    "distributed": 5,
    "loading": 4,
    "hub": 4,
    "engine": 3,
    "compress": 2,
    "models": 1,
    "formats": 1,
    "kernels": 0,
    "outputs": 2,
    "errors": -1,
}
# formats and models share a layer: neither imports the other (files → dicts; dicts → modules is loading's job).
# outputs (where leanformer may write; it recognises a save by its safetensors header) sits above formats.
# The public API package `leanformer` (__init__) re-exports from every room; only the CLI, the top, uses it.
MAY_USE_PUBLIC_API = {"cli"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, source: str | None = None) -> set[str]:
    """leanformer modules that `path` imports, resolved to the most specific module that exists."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "leanformer"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "leanformer":
                continue
            for alias in node.names:  # `from leanformer import kernels` imports the module leanformer.kernels
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "leanformer"


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_room_has_a_layer():
    rooms = {_room(m) for m in _graph()} - {"leanformer"}
    assert rooms <= set(LAYERS), f"new room(s) {sorted(rooms - set(LAYERS))}: give them a layer in LAYERS"


def test_imports_point_down():
    upward = []
    for module, targets in _graph().items():
        room = _room(module)
        for target in targets:
            other = _room(target)
            if room == "leanformer" or other == room:
                continue  # the public API (__init__) sits on top; a room's own modules see each other
            if other == "leanformer" and room in MAY_USE_PUBLIC_API:
                continue
            if other == "leanformer":
                upward.append(
                    f"{module} imports the public API package `leanformer` (import the module itself)"
                )
            elif LAYERS[other] >= LAYERS[room]:
                upward.append(
                    f"{module} ({room}, layer {LAYERS[room]}) -> {target} ({other}, layer {LAYERS[other]})"
                )
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_no_cycles_between_modules():
    graph = _graph()
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph:
                continue
            # a module importing its own package's __init__ (or the reverse) is the normal package shape
            if node.startswith(nxt + ".") or nxt.startswith(node + "."):
                continue
            if seen.get(nxt) == 1:
                cycles.append(
                    " -> ".join(path[path.index(nxt) :] + [nxt]) if nxt in path else f"{node} -> {nxt}"
                )
            elif nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for module in graph:
        if module not in seen:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_upward_and_relative_imports():
    """The guard itself works: a lazy upward import inside a function, and relative forms, are found."""
    fake = PACKAGE / "models" / "probe.py"  # read as if it were there; nothing is written
    source = "from .. import kernels\nfrom ..errors import LeanformerError\n"
    source += "def f():\n    from leanformer.serve.app import serve\n    return serve\n"
    imports = _imports(fake, source)
    assert imports == {"leanformer.kernels", "leanformer.errors", "leanformer.serve.app"}
    assert LAYERS[_room("leanformer.serve.app")] > LAYERS[_room("leanformer.models.probe")]
