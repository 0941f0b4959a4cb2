"""The figure of docs/walkthrough.md section 6: the backward pass through talking-heads attention.

    .venv/bin/python docs/make_backward_figure.py [--block 1]

The tiny reference model, "The quick brown fox jumps over the lazy dog." with "fox" replaced by
[MASK], the MLM loss (cross-entropy of the true token at that position). The engine's tape gives
the gradient of every weight and, through `tape.gradient(..., record=...)`, the gradient with
respect to each intermediate. Three panels for one block: the gradient of W_pre, the gradient of
W_post, and per head the RMS of the gradient arriving at the mixed logits (output head m, after the
softmax's backward) and leaving toward the unmixed logits (input head n, after W_pre^T).
Writes docs/backward_mixing.png. Needs no TensorFlow (the model is built once by the test suite or
`python -m engine reference`).
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SENTENCE = "The quick brown fox jumps over the lazy dog."
MASKED_WORD = "fox"


def tiny_h5() -> str:
    """The tiny reference model's HDF5 (built and extracted in a child process, cached)."""
    import subprocess
    code = ("from engine.tf import reference, extract; "
            "print(extract.cached_extraction(reference.cached('tiny', seed=0, conditioning='random'), progress=False))")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(HERE), env=env, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def gradients(h5: str, block: int):
    import engine
    enc = engine.load(h5, dtype="float64")
    prep = engine.Preprocessor(enc.vocab)
    inputs = prep([SENTENCE], seq_length=16)
    tokens = [enc.vocab[i] for i in inputs["input_word_ids"][0]]
    position = tokens.index(MASKED_WORD)
    true_id = int(inputs["input_word_ids"][0, position])
    inputs["input_word_ids"][0, position] = enc.vocab.index("[MASK]")
    inputs["masked_lm_positions"] = np.array([[position]], np.int32)
    recorded = {}
    with enc.tape(inputs) as tape:
        logits = tape.outputs["mlm_logits"]                                     # [1,1,V]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        dlogits = probs.copy()
        dlogits[0, 0, true_id] -= 1.0                                            # d(-log p_true)/dlogits
        grads = tape.gradient({"mlm_logits": dlogits}, record=lambda n, v: recorded.__setitem__(n, v))
    loss = -float(np.log(probs[0, 0, true_id]))
    w_pre = enc.blocks[block].attention.pre_softmax_weight
    return dict(loss=loss, tokens=tokens, position=position, w_pre=w_pre,
                d_pre=grads[f"layers/{block}/attention/pre_softmax_weight"],
                d_post=grads[f"layers/{block}/attention/post_softmax_weight"],
                d_mixed=recorded[f"layers/{block}/masked_scores"], d_unmixed=recorded[f"layers/{block}/scaled_scores"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Draws docs/backward_mixing.png.")
    parser.add_argument("--block", type=int, default=1, help="the block to show (default 1)")
    parser.add_argument("--output", default=os.path.join(HERE, "backward_mixing.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    g = gradients(tiny_h5(), args.block)
    N = g["w_pre"].shape[0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in ((axes[0], "d_pre", "dL/dW_pre"), (axes[1], "d_post", "dL/dW_post")):
        m = g[key]
        lim = float(np.abs(m).max())
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"{title}, block {args.block}")
        ax.set_xlabel("output head m")
        ax.set_ylabel("input head n")
        ax.set_xticks(range(N))
        ax.set_yticks(range(N))
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    rms = lambda a: np.sqrt(np.mean(a[0] ** 2, axis=(1, 2)))  # noqa: E731  [B,N,S,T] -> [N] (row 0)
    x = np.arange(N)
    axes[2].bar(x - 0.2, rms(g["d_mixed"]), 0.4, label="at the mixed logits (head m)")
    axes[2].bar(x + 0.2, rms(g["d_unmixed"]), 0.4, label="at the unmixed logits (head n)")
    axes[2].set_xticks(x)
    axes[2].set_xlabel("head")
    axes[2].set_ylabel("RMS of the gradient over (s, t)")
    axes[2].set_title("the gradient, before and after W_pre^T")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"MLM loss {g['loss']:.2f} for '{MASKED_WORD}' in \"{SENTENCE}\" (tiny reference model)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
