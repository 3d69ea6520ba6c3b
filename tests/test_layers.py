"""The package's layers (docs/design.md): each module imports only from its own layer or the layers under it, no
module imports another's underscore names, the integrations import the public API (plus the two interfaces that
exist for them), and ``import distclip`` loads no tool."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distclip"
# Lowest first: a module may import from its own layer and the ones before it.
LAYERS = ["distclip._clip", "distclip._functional", "distclip._service", "distclip.integrations", "distclip._tools"]
# What an integration may import besides the public API and the other integrations.
FOR_INTEGRATIONS = {"distclip._clip.arguments", "distclip._clip.modules"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _layer(module: str) -> int | None:
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None  # the package's root (distclip, __main__, shutdown): above or beside the layers


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` for every import of a distclip module in ``path`` (lazy ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "distclip"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "distclip":
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


CASES = [(name, path) for name, path in sorted(_modules().items())]


@pytest.mark.parametrize("name,path", CASES, ids=[name for name, _ in CASES])
def test_imports_go_down_the_layers_and_never_to_underscore_names(name, path):
    modules = _modules()
    layer = _layer(name)
    for target, names, line in _imports(path):
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} {names or ''}"
        private = [n for n in names if n.startswith("_") and f"{target}.{n}" not in modules]
        assert not private, f"{where}: an underscore name of another module"
        targets = [f"{target}.{n}" if f"{target}.{n}" in modules else target for n in names] or [target]
        for t in targets:
            if layer is None or _layer(t) is None:
                continue  # the root imports every layer; every layer may import the public root
            assert _layer(t) <= layer, f"{where}: a higher layer"
            if LAYERS[layer] == "distclip.integrations" and _layer(t) != layer:
                assert t in FOR_INTEGRATIONS, f"{where}: an integration imports the public API, not {t}"


def test_the_clip_stages_call_torch_distributed_only_in_the_reduction():
    for path in (PACKAGE / "_clip").glob("*.py"):
        if path.name == "reduction.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n == "torch.distributed" for n in names), f"{path.name}:{node.lineno}"


def test_import_distclip_loads_no_tool():
    code = "import distclip, sys; print(sorted(m for m in sys.modules if m.startswith('distclip')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    modules = eval(loaded.stdout)
    assert modules and not [m for m in modules if m.startswith(("distclip._tools", "distclip.integrations"))], modules


@pytest.mark.parametrize("name,path", CASES, ids=[name for name, _ in CASES])
def test_every_module_says_what_it_owns(name, path):
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring and len(docstring.splitlines()[0]) > 20, f"{name}: no module docstring saying what it owns"
