"""The sample explain page of docs/walkthrough.md section 7: docs/explain-sample.html.

    .venv/bin/python docs/make_explain_sample.py [--weights model.h5] [--text "..."] [--text-b "..."]

The small reference model with trained-like weights (L=3, H=48, N=4, 64 positions, the real vocab;
engine.tf.reference, conditioning "trained": sharp pre-softmax mixing, so the heads' maps change
visibly between the stages), one sentence pair with a [MASK], through `python -m engine explain`.
The weights are random at realistic scales, so the page shows what the mixing does to the
distributions, not linguistic patterns, and the MLM predictions are not English. The model is built
and extracted once, in a child process (it needs TensorFlow), and cached.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

TEXT = "the cat sat on the [MASK] because it was tired"
TEXT_B = "then it slept until the morning"
OUTPUT = os.path.join(HERE, "explain-sample.html")


def small_trained_h5() -> str:
    """The small trained-like reference model's HDF5 (built and extracted in a child process, cached)."""
    code = ("from engine.tf import reference, extract; "
            "print(extract.cached_extraction(reference.cached('small', seed=0, conditioning='trained'), progress=False))")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="an extracted HDF5 file (default: the small trained-like reference model)")
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--text-b", default=TEXT_B)
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args(argv)
    from engine.cli.main import main as cli_main
    return cli_main(["explain", "--weights", args.weights or small_trained_h5(), args.text, "--text-b", args.text_b,
                     "--output", args.output, "--force"])


if __name__ == "__main__":
    sys.exit(main())
