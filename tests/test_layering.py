"""DESIGN.md's import rules, held for every file of the five packages: imports point one way,
launch -> cluster -> workers -> model -> collectives; only cluster/ imports ray; only collectives/
imports torch.distributed.

The check reads the source with `ast` (nothing is imported), so it sees lazy imports inside
functions, relative imports and `importlib.import_module("...")` / `__import__("...")` with a
literal name. A failure names each file and line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("launch", "cluster", "workers", "model", "collectives")  # each may import only those after it
DYNAMIC_IMPORTS = ("import_module", "__import__")


def imported_names(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, absolute dotted module name) of every import in `tree`; package: the dotted package
    the file sits in ("workers", "model.kernels"), against which relative imports resolve."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                base = ".".join(p for p in (anchor, node.module) if p)
            if node.module is None:  # `from . import x`, `from .. import cluster`: the names are modules
                found += [(node.lineno, ".".join(p for p in (base, alias.name) if p)) for alias in node.names]
            else:
                found.append((node.lineno, base))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in DYNAMIC_IMPORTS:
                found.append((node.lineno, node.args[0].value))
    return found


def violations(relative: str, source: str) -> list[str]:
    """The rule breaks of one file, given its path relative to the repository root."""
    parts = Path(relative).with_suffix("").parts
    layer, package = parts[0], ".".join(parts[:-1])
    tree = ast.parse(source, filename=relative)
    out = []
    for line, module in imported_names(tree, package):
        top = module.split(".")[0]
        where = f"{relative}:{line}: imports {module}"
        if top in LAYERS and LAYERS.index(top) < LAYERS.index(layer):
            out.append(f"{where} ({layer}/ sits below {top}/: imports point {' -> '.join(LAYERS)})")
        if top == "ray" and layer != "cluster":
            out.append(f"{where} (only cluster/ imports ray)")
        if (module == "torch.distributed" or module.startswith("torch.distributed.")) and layer != "collectives":
            out.append(f"{where} (only collectives/ imports torch.distributed)")
    return out


def test_every_package_file_imports_only_downward():
    files = {layer: sorted((ROOT / layer).rglob("*.py")) for layer in LAYERS}
    assert all(len(paths) >= 3 for paths in files.values()), {k: len(v) for k, v in files.items()}
    broken = []
    for paths in files.values():
        for path in paths:
            relative = path.relative_to(ROOT).as_posix()
            broken += violations(relative, path.read_text(encoding="utf-8"))
    assert not broken, "imports against DESIGN.md's layering:\n" + "\n".join(broken)


@pytest.mark.parametrize("relative, source, bad_lines", [
    ("workers/emulate.py", "import torch\nfrom cluster.hardware import NodeSpec\n", [2]),
    ("workers/run_config.py", "def f():\n    from cluster.hardware import node_spec\n", [2]),
    ("workers/sub/x.py", "from ... import cluster\nfrom ...launch import cli\nfrom . import y\n", [1, 2]),
    ("model/llama4.py", "import workers.engine\nimport launch\nfrom collectives.trace import T\n", [1, 2]),
    ("collectives/a.py", "import importlib\nm = importlib.import_module('model.config')\nn = __import__('ray')\n",
     [2, 3]),
    ("model/kernels/k.py", "import ray\nimport torch.distributed as dist\nfrom torch.distributed import ProcessGroup\n",
     [1, 2, 3]),
    ("cluster/node.py", "import ray\nfrom workers.worker import Worker\nimport launch.cli\n", [3]),
    ("launch/cli.py", "from cluster.node import build_node\nimport ray\n", [2]),
    ("collectives/torch_dist.py", "import torch.distributed as dist\nfrom collectives import trace\n", []),
])
def test_the_check_names_each_forbidden_import(relative, source, bad_lines):
    """The checker itself: each kind of forbidden import is caught at its line, allowed ones are not."""
    found = violations(relative, source)
    assert [int(v.split(":")[1]) for v in found] == bad_lines, found
    assert all(v.startswith(relative + ":") for v in found)
