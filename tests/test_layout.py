"""The layout is the architecture: imports run one way (docs/make_package_graph.py states the layers),
TensorFlow stays in engine/tf/, no folder grows past 12 modules, no module past 500 lines (a command
module past 300), and no module imports another's private name. Read from the source with ast, and
checked at run time for TensorFlow."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _graph():
    spec = importlib.util.spec_from_file_location("make_package_graph", os.path.join(ROOT, "docs", "make_package_graph.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


G = _graph()


def _unlisted_folders() -> set:
    return {G.folder_of(m) for m in G.modules()} - set(G.LAYERS)


def test_every_module_has_a_layer():
    assert not _unlisted_folders(), f"folders with no layer in docs/make_package_graph.py: {_unlisted_folders()}"
    print(f"{len(G.modules())} modules in {len({G.folder_of(m) for m in G.modules()})} folders")


def test_imports_run_down_only():
    bad = []
    for module, name, folder, _, line in G.edges():
        own = G.folder_of(module)
        if folder and folder != own and G.LAYERS[folder][0] >= G.LAYERS[own][0]:
            bad.append(f"{module}:{line} imports {name} ({folder}, rank {G.LAYERS[folder][0]} >= {G.LAYERS[own][0]})")
    assert not bad, "\n".join(bad)


def test_tensorflow_only_in_its_folder_and_the_folder_only_lazily_from_the_cli():
    bad = []
    for module, name, folder, at_top, line in G.edges():
        own = G.folder_of(module)
        if own == G.TENSORFLOW_FOLDER:
            continue
        if any(name == t or name.startswith(t + ".") for t in G.TENSORFLOW_MODULES):
            bad.append(f"{module}:{line} imports {name}")
        if folder == G.TENSORFLOW_FOLDER and (own != "engine.cli" or at_top):
            bad.append(f"{module}:{line} imports {name} ({'module level' if at_top else 'not the command line'})")
    assert not bad, "\n".join(bad)


def test_no_folder_past_twelve_modules():
    counts = {}
    for m in G.modules():
        counts[G.folder_of(m)] = counts.get(G.folder_of(m), 0) + 1
    print(counts)
    assert max(counts.values()) <= G.MAX_MODULES_PER_FOLDER, counts


MAX_MODULE_LINES = 500
MAX_COMMAND_MODULE_LINES = 300


def _sources(packages=("engine", "weights", "benchmarks")) -> list[str]:
    """Every .py file of these folders (by default the engine, weights and benchmarks packages)."""
    out = []
    for package in packages:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            out += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return out


def _line_count(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def test_no_module_past_its_line_limit():
    """Every module of the project, tests and docs scripts included."""
    every = _sources(("engine", "weights", "benchmarks", "tests", "docs", "scripts"))
    too_long = {}
    for path in every:
        limit = MAX_COMMAND_MODULE_LINES if os.sep + os.path.join("engine", "cli") + os.sep in path else MAX_MODULE_LINES
        if _line_count(path) > limit:
            too_long[os.path.relpath(path, ROOT)] = (_line_count(path), limit)
    print(f"largest: {max((_line_count(p), os.path.relpath(p, ROOT)) for p in every)}")
    assert not too_long, f"modules past their limit (lines, limit): {too_long}"


def private_imports(path: str) -> list[str]:
    """`from ours import _name` and `ours_module._name` in one file, as "file:line: name"."""
    import ast
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    ours = ("engine", "weights", "benchmarks", "tests")
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ours:
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path}:{node.lineno}: {node.module}.{alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules |= {alias.asname or alias.name.split(".")[0] for alias in node.names
                        if alias.name.split(".")[0] in ours}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_modules(tmp_path):
    found = [line for path in _sources() for line in private_imports(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)
    planted = tmp_path / "planted.py"
    planted.write_text("from engine.core import kernels\nfrom engine.api import _check_fast\nkernels._x\n")
    assert len(private_imports(str(planted))) == 2, "the checker misses a planted private import"


def _copy_of_the_tree(tmp_path, monkeypatch):
    """The engine and weights sources copied under tmp_path, which the checker then reads."""
    for package in ("engine", "weights"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    dst = tmp_path / os.path.relpath(os.path.join(folder, f), ROOT)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_text(open(os.path.join(folder, f), encoding="utf-8").read())
    monkeypatch.setattr(G, "ROOT", str(tmp_path))
    return tmp_path


def test_the_checker_sees_a_planted_folder(tmp_path, monkeypatch):
    """The rule can fail: a new folder, nested or not, that LAYERS does not list has no layer."""
    tree = _copy_of_the_tree(tmp_path, monkeypatch)
    for folder in ("engine/plugins", "engine/fast/sub"):
        (tree / folder).mkdir()
        (tree / folder / "__init__.py").write_text("")
        (tree / folder / "thing.py").write_text("import numpy\n")
    assert _unlisted_folders() == {"engine.plugins", "engine.fast.sub"}


def test_the_checker_sees_a_planted_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a core module that imports the fast path is reported."""
    planted = _copy_of_the_tree(tmp_path, monkeypatch) / "engine" / "core"
    (planted / "model.py").write_text((planted / "model.py").read_text() + "\nfrom engine.fast import forward\n")
    up = [(m, n) for m, n, f, _, _ in G.edges()
          if f and f != G.folder_of(m) and G.LAYERS[f][0] >= G.LAYERS[G.folder_of(m)][0]]
    assert ("engine.core.model", "engine.fast.forward") in up


SETS_LEGACY_KERAS = re.compile(r'^\s*os\.environ\.setdefault\("TF_USE_LEGACY_KERAS"', re.M)


def test_tensorflow_is_configured_in_one_place():
    """TF_USE_LEGACY_KERAS gets its default in engine/tf/__init__.py (run before any engine.tf module),
    and for what imports tensorflow directly, in tests/conftest.py and benchmarks/__init__.py; nowhere else."""
    places = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            path = os.path.join(folder, f)
            if f.endswith(".py") and SETS_LEGACY_KERAS.search(open(path, encoding="utf-8").read()):
                places.append(os.path.relpath(path, ROOT))
    assert sorted(places) == ["benchmarks/__init__.py", "engine/tf/__init__.py", "tests/conftest.py"], places


@pytest.mark.parametrize("code", [
    "import engine, engine.tools.stream, engine.tools.compare, engine.tools.tracefile, engine.cli.main",
    "import engine.fast.forward, engine.gpu.forward, engine.text.corpus, weights",
])
def test_importing_the_engine_never_loads_tensorflow(code):
    check = code + "; import sys; bad = [m for m in sys.modules if m.split('.')[0] in " \
        + repr(G.TENSORFLOW_MODULES) + "]; print(bad); sys.exit(1 if bad else 0)"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
