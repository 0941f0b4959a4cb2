"""The package graph: which folder imports which, read from the source with `ast`, drawn to
docs/package_graph.png. tests/test_layout.py checks the same rules on the same reading.

    .venv/bin/python docs/make_package_graph.py          # writes docs/package_graph.png, prints the edges

The architecture, bottom to top. A module may import its own folder and any folder of a lower
rank; never a folder of its own rank (siblings stay independent) or a higher one.
"""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# folder -> (rank, what it holds)
LAYERS = {
    "weights": (0, "HDF5 format, loader, writer, vocab, TF variable names (h5py); ONNX export (onnx); "
                   "Hugging Face import"),
    "engine.core": (1, "settings, kernels, backward, model, tape"),
    "engine.text": (1, "WordPiece preprocessor, corpus"),
    "engine.fast": (2, "fast CPU path, packed products, threads"),
    "engine.gpu": (2, "CuPy path, CUDA kernels"),
    "engine": (3, "public API: load, Encoder, read_embeddings (the shard format)"),
    "engine.tools": (4, "verdict, parity, stream, work files, fill-mask, explain, cache, real models"),
    "engine.cluster": (5, "encode on Dask: plan, workers, client"),
    "engine.train": (5, "losses, AdamW, trainer, data, runs"),
    "engine.tf": (6, "everything that imports TensorFlow"),
    "engine.cli": (7, "command line: parses and prints"),
    "engine.__main__": (8, "python -m engine"),
}
TENSORFLOW_FOLDER = "engine.tf"
TENSORFLOW_MODULES = ("tensorflow", "tf_keras", "tensorflow_text", "official", "keras", "tf2onnx")
MAX_MODULES_PER_FOLDER = 12


def modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the engine and weights packages under ROOT."""
    root = ROOT
    out = {}
    for package in ("engine", "weights"):
        for folder, _, files in os.walk(os.path.join(root, package)):
            for f in sorted(files):
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), root)[:-3].replace(os.sep, ".")
                    out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def folder_of(module: str) -> str:
    """The folder (layer) a module belongs to: the module itself when LAYERS names it (a package's
    __init__, engine.__main__), else its package, whether LAYERS names that or not (a folder LAYERS
    does not list has no rank: tests/test_layout.py fails on it)."""
    return module if module in LAYERS else module.rsplit(".", 1)[0]


def imports(path: str) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import statement of a file. `from a import b`
    counts as a.b when a.b is a module of ours, else as a."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    ours = modules()
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `try:` / `if TYPE_CHECKING:` blocks at module level count as module level
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in ours else node.module
                     for a in node.names]
        else:
            continue
        out += [(n, id(node) in top_level, node.lineno) for n in names]
    return out


def edges() -> list[tuple[str, str, str, bool, int]]:
    """(importing module, imported module, imported module's folder or '' if not ours, module level?, line)."""
    ours = modules()
    out = []
    for module, path in ours.items():
        for name, at_top, line in imports(path):
            target = name if name in ours else next((m for m in ours if name.startswith(m + ".")), "")
            out.append((module, name, folder_of(target) if target else "", at_top, line))
    return out


def folder_edges() -> set[tuple[str, str]]:
    return {(folder_of(m), f) for m, _, f, _, _ in edges() if f and f != folder_of(m)}


def draw(path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    ranks = sorted({r for r, _ in LAYERS.values()})
    pos = {}
    for r in ranks:
        row = [f for f, (rank, _) in LAYERS.items() if rank == r]
        for i, f in enumerate(row):
            pos[f] = ((i - (len(row) - 1) / 2) * 4.2, r * 1.6)
    fig, ax = plt.subplots(figsize=(10, 11))
    w, h = 3.6, 0.9
    for a, b in sorted(folder_edges()):
        (xa, ya), (xb, yb) = pos[a], pos[b]
        ax.annotate("", xy=(xb, yb + h / 2), xytext=(xa, ya - h / 2),
                    arrowprops=dict(arrowstyle="->", color="#555", lw=0.9, alpha=0.7,
                                    connectionstyle="arc3,rad=0.08"))
    counts = {}
    for m in modules():
        counts[folder_of(m)] = counts.get(folder_of(m), 0) + 1
    for f, (x, y) in pos.items():
        tf_folder = f == TENSORFLOW_FOLDER
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05",
                                    fc="#fde2c8" if tf_folder else "#dbe8f6", ec="#333"))
        label = f + ("/" if f not in ("engine", "engine.__main__") else "")
        ax.text(x, y + 0.15, label.replace(".", "/") if f != "engine" else "engine/__init__, api",
                ha="center", va="center", fontsize=10, weight="bold")
        ax.text(x, y - 0.2, f"{LAYERS[f][1]} ({counts.get(f, 0)} modules)", ha="center", va="center", fontsize=7.5)
    ax.set_xlim(-7, 7)
    ax.set_ylim(-1, max(ranks) * 1.6 + 1)
    ax.axis("off")
    ax.set_title("Package graph: arrows point from the importing folder to the imported one (always down).\n"
                 "Orange: the only folder that imports TensorFlow; only the command line imports it, lazily.",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    for a, b in sorted(folder_edges(), key=lambda e: (-LAYERS[e[0]][0], e)):
        print(f"{a:<16} -> {b}")
    out = os.path.join(ROOT, "docs", "package_graph.png")
    draw(out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
