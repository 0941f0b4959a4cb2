"""The layout is the architecture: imports run one way (docs/make_package_graph.py states the layers),
TensorFlow stays in engine/tf/, and no folder grows past 12 modules. Read from the source with ast,
and checked at run time for TensorFlow."""

from __future__ import annotations

import importlib.util
import os
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


def test_every_module_has_a_layer():
    folders = {G.folder_of(m) for m in G.modules()}
    assert folders <= set(G.LAYERS), folders - set(G.LAYERS)
    print(f"{len(G.modules())} modules in {len(folders)} folders")


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


def test_the_checker_sees_a_planted_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a core module that imports the fast path is reported."""
    planted = tmp_path / "engine" / "core"
    planted.mkdir(parents=True)
    for package in ("engine", "weights"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    dst = tmp_path / os.path.relpath(os.path.join(folder, f), ROOT)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_text(open(os.path.join(folder, f), encoding="utf-8").read())
    (planted / "model.py").write_text((planted / "model.py").read_text() + "\nfrom engine.fast import forward\n")
    monkeypatch.setattr(G, "ROOT", str(tmp_path))
    up = [(m, n) for m, n, f, _, _ in G.edges()
          if f and f != G.folder_of(m) and G.LAYERS[f][0] >= G.LAYERS[G.folder_of(m)][0]]
    assert ("engine.core.model", "engine.fast.forward") in up


@pytest.mark.parametrize("code", [
    "import engine, engine.tools.stream, engine.tools.compare, engine.tools.tracefile, engine.cli.main",
    "import engine.fast.forward, engine.gpu.forward, engine.text.corpus, weights",
])
def test_importing_the_engine_never_loads_tensorflow(code):
    check = code + "; import sys; bad = [m for m in sys.modules if m.split('.')[0] in " \
        + repr(G.TENSORFLOW_MODULES) + "]; print(bad); sys.exit(1 if bad else 0)"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
