"""The README is a reference that stays true: every ```python block in it runs as pasted, each in a
fresh process, in a folder where `model.h5` is the tiny reference model (the main job's model: 512
positions, the real vocab); it stays within 400 lines; every relative link in it and in docs/ and
benchmarks/results/ names a file that exists; and no file of the project speaks of its own history.
"""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
MAX_README_LINES = 400


def _python_blocks(path: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python fenced block of a Markdown file."""
    blocks, code, start = [], None, 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if code is None and line.strip() == "```python":
                code, start = [], number
            elif code is not None and line.strip() == "```":
                blocks.append((start, "".join(code)))
                code = None
            elif code is not None:
                code.append(line)
    if code is not None:
        raise AssertionError(f"{path}: the ```python block at line {start} is never closed")
    return blocks


README_BLOCKS = _python_blocks(README)


def test_readme_has_python_blocks_and_fits_its_limit():
    with open(README, encoding="utf-8") as f:
        lines = f.read().count("\n")
    print(f"README.md: {lines} lines, {len(README_BLOCKS)} python blocks")
    assert len(README_BLOCKS) >= 2, "the README's Python API has no ```python blocks for this test to run"
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines, more than {MAX_README_LINES}"


@pytest.fixture(scope="module")
def model_folder(tiny_h5, tmp_path_factory):
    """A folder holding `model.h5`: the tiny reference model, as the README's snippets expect."""
    folder = tmp_path_factory.mktemp("readme")
    os.symlink(tiny_h5, folder / "model.h5")
    return folder


@pytest.mark.parametrize("line, code", README_BLOCKS, ids=[f"README.md:{line}" for line, _ in README_BLOCKS])
def test_readme_python_block_runs_as_pasted(line, code, model_folder):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALKHEADS_")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], cwd=model_folder, env=env, capture_output=True,
                            text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, (f"README.md:{line}: the block fails as pasted (exit {result.returncode}):\n"
                                    f"{result.stderr[-3000:]}")


def _markdown_files() -> list[str]:
    paths = [README]
    for folder in ("docs", os.path.join("benchmarks", "results")):
        root = os.path.join(REPO, folder)
        paths += [os.path.join(root, name) for name in sorted(os.listdir(root)) if name.endswith(".md")]
    return paths


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_name_existing_files(path):
    with open(path, encoding="utf-8") as f:
        targets = LINK.findall(f.read())
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    missing = [t for t in local if t and not os.path.exists(os.path.join(os.path.dirname(path), t))]
    print(f"{os.path.relpath(path, REPO)}: {len(local)} relative links")
    assert not missing, f"{os.path.relpath(path, REPO)}: links to missing files {missing}"


# The project speaks of itself as it is: no numbered issues, no sessions, no figures of code that is gone,
# in code, tests or docs.
HISTORY = re.compile(r"\biss" r"ue \d+|\bthe iss" r"ue\b|\b(earlier|last|previous|this) sess" r"ions?\b"
                     r"|\bthe sess" r"ion that\b|\bpre" r"dates?\b|\bbefore the f" r"ix\b|\bwas ign" r"ored\b",
                     re.IGNORECASE)
SOURCE_SUFFIXES = (".py", ".md", ".sh", ".cfg", ".toml", ".cu", ".txt", ".html")


def test_no_history_words_in_the_project():
    hits = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "node_modules")]
        for name in files:
            if not name.endswith(SOURCE_SUFFIXES):
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8", errors="replace") as f:
                for number, text in enumerate(f, 1):
                    if HISTORY.search(text):
                        hits.append(f"{os.path.relpath(path, REPO)}:{number}: {text.strip()[:100]}")
    print(f"history words: {len(hits)} lines")
    assert not hits, "history words in the project:\n" + "\n".join(hits)
