"""The training examples of benchmarks/results/training_examples.md, on text no one here wrote: the Python Language Reference topics
that CPython ships (pydoc_data.topics).

    .venv/bin/python docs/make_training_examples.py [--out /tmp/training-examples]

1. Fine-tuning: a three-class task, "which page of the reference is this paragraph from?"
   (compound statements / special method names / the debugger), paragraphs of 40-600 characters,
   80% train, 20% dev (every fifth paragraph), with `python -m engine finetune` on the tiny
   reference model (L=2, H=64, random weights: it learns from the words, not from pretraining;
   the small trained-like model, with its sharp mixing and outlier dimensions, stays at the
   majority class in this budget). Prints dev accuracy per epoch against the majority class.
2. Continued MLM training: `python -m engine pretrain` on the prose of the same pages, the held-out
   MLM loss (every fifth paragraph, fixed masks) before and after.

Writes the data, the models and the logs under --out, and benchmarks/results/training_examples.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TOPICS = ("compound", "specialnames", "debugger")


def paragraphs(topic: str) -> list[str]:
    import pydoc_data.topics
    out = []
    for para in re.split(r"\n\s*\n", pydoc_data.topics.topics[topic]):
        text = " ".join(para.split())
        if 40 <= len(text) <= 600 and sum(c.isalpha() or c == " " for c in text) > 0.85 * len(text):
            out.append(text)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Runs the fine-tuning and continued-MLM examples of benchmarks/results/training_examples.md.")
    parser.add_argument("--out", default="/tmp/training-examples", help="folder for data, models and logs")
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs (default 6)")
    parser.add_argument("--pretrain-steps", type=int, default=200, help="continued MLM steps (default 200)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1")
    h5 = subprocess.run([sys.executable, "-c", "from engine.tf import reference, extract; print(extract.cached_extraction("
                         "reference.cached('tiny', seed=0, conditioning='random'), progress=False))"],
                        cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    rows = [(text, topic) for topic in TOPICS for text in paragraphs(topic)]
    train = [r for i, r in enumerate(rows) if i % 5]
    dev = [r for i, r in enumerate(rows) if i % 5 == 0]
    for name, part in (("train", train), ("dev", dev)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for text, topic in part:
                f.write(json.dumps({"text": text, "label": topic}) + "\n")
    majority = max(sum(1 for _, t in dev if t == topic) for topic in TOPICS) / len(dev)
    tuned = os.path.join(args.out, "tuned.h5")
    cmd = [sys.executable, "-m", "engine", "finetune", "--weights", h5, "--train", os.path.join(args.out, "train.jsonl"),
           "--eval", os.path.join(args.out, "dev.jsonl"), "--output", tuned, "--epochs", str(args.epochs),
           "--learning-rate", "1e-3", "--batch-size", "16", "--force"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    log = [json.loads(line) for line in open(tuned + ".log.jsonl")]
    epochs = [r for r in log if "accuracy" in r]
    # continued MLM on the same pages' prose, held-out every fifth paragraph
    with open(os.path.join(args.out, "corpus.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(t for i, (t, _) in enumerate(rows) if i % 5) + "\n")
    with open(os.path.join(args.out, "held_out.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(t for i, (t, _) in enumerate(rows) if i % 5 == 0) + "\n")
    continued = os.path.join(args.out, "continued.h5")
    cmd = [sys.executable, "-m", "engine", "pretrain", "--weights", h5, "--input", os.path.join(args.out, "corpus.txt"),
           "--eval", os.path.join(args.out, "held_out.txt"), "--output", continued, "--steps", str(args.pretrain_steps),
           "--learning-rate", "5e-4", "--batch-size", "16", "--force"]
    print("$", " ".join(cmd[1:]), flush=True)
    out = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    summary = out.stderr.strip().splitlines()[-1]
    print(summary)
    held = re.search(r"held-out MLM loss ([0-9.]+) -> ([0-9.]+)", summary)
    result = {"finetune": {"train": len(train), "dev": len(dev), "majority_class_accuracy": majority,
                           "epochs": epochs, "model": "tiny reference (L=2, H=64), random weights"},
              "pretrain": {"steps": args.pretrain_steps, "held_out_loss_before": float(held.group(1)),
                           "held_out_loss_after": float(held.group(2))}}
    print(json.dumps(result, indent=1))
    with open(os.path.join(REPO, "benchmarks", "results", "training_examples.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
