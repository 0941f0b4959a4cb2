"""Regenerates the figures of docs/walkthrough.md from a trace of real text.

    .venv/bin/python docs/make_figures.py                    # the tiny reference model (built/extracted once)
    .venv/bin/python docs/make_figures.py --weights model.h5 --block 1 --heads 0 1 2 3

Writes docs/attention_mixing.png, docs/score_mixing.png and docs/mixing_weights.png (matplotlib,
Agg backend, small PNGs). The reference models have random weights at realistic scales, so the
pictures show what the mixing does to the distributions, not linguistic patterns.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog."


def _default_weights() -> str:
    from engine.tf import extract, reference
    return extract.cached_extraction(reference.cached("tiny", seed=0))


def _labels(enc, ids):
    return [enc.vocab[i] if enc.vocab else str(i) for i in ids]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="an extracted HDF5 file (default: the tiny reference model)")
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--block", type=int, default=1)
    parser.add_argument("--heads", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", default=HERE)
    args = parser.parse_args(argv)

    import engine
    from engine.text.preprocess import Preprocessor
    enc = engine.load(args.weights or _default_weights())
    prep = Preprocessor.from_weights(enc)
    inputs = prep([args.text], seq_length=128)
    n = int(inputs["input_mask"][0].sum())
    inputs = {k: v[:, :n] for k, v in inputs.items()}           # no padding: the real tokens only
    t = enc.trace(inputs)
    tokens = _labels(enc, inputs["input_word_ids"][0])
    b = f"layers/{args.block}/"
    heads = [h for h in args.heads if h < enc.config.num_heads]

    # 1. Probabilities before and after the post-softmax mix.
    probs, mixed = t[b + "probs"][0], t[b + "mixed_probs"][0]            # [N,S,T]
    lim = float(np.abs(mixed[heads]).max())
    top = float(probs[heads].max())
    fig, axes = plt.subplots(2, len(heads), figsize=(2.3 * len(heads) + 0.8, 5.0), squeeze=False)
    for j, h in enumerate(heads):
        a = axes[0, j].imshow(probs[h], cmap="viridis", vmin=0, vmax=top)
        axes[0, j].set_title(f"head {h}: softmax", fontsize=8)
        m = axes[1, j].imshow(mixed[h], cmap="RdBu_r", vmin=-lim, vmax=lim)
        sums = mixed[h].sum(-1)
        axes[1, j].set_title(f"head {h}: after W_post\nrow sums {sums.min():.2f}..{sums.max():.2f}, "
                             f"min {mixed[h].min():.2f}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks(range(n))
        ax.set_xticklabels(tokens, rotation=90, fontsize=5)
        ax.set_yticks(range(n))
        ax.set_yticklabels(tokens, fontsize=5)
    fig.colorbar(a, ax=axes[0].tolist(), shrink=0.8)
    fig.colorbar(m, ax=axes[1].tolist(), shrink=0.8)
    fig.suptitle(f"block {args.block}: attention probabilities before (top) and after (bottom) the "
                 f"post-softmax head mixing", fontsize=9)
    path1 = os.path.join(args.out, "attention_mixing.png")
    fig.savefig(path1, dpi=110)
    plt.close(fig)

    # 2. One query row: logits before/after the pre-softmax mix, for every head.
    row = min(2, n - 1)
    scaled, mixed_s = t[b + "scaled_scores"][0, :, row], t[b + "mixed_scores"][0, :, row]   # [N,T]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, data, title in ((axes[0], scaled, "q·k/sqrt(D)"), (axes[1], mixed_s, "after W_pre")):
        for h in range(data.shape[0]):
            ax.plot(range(n), data[h], marker="o", ms=2, lw=1, label=f"head {h}")
        ax.set_title(f"query '{tokens[row]}': {title}", fontsize=9)
        ax.set_xticks(range(n))
        ax.set_xticklabels(tokens, rotation=90, fontsize=6)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path2 = os.path.join(args.out, "score_mixing.png")
    fig.savefig(path2, dpi=100)
    plt.close(fig)

    # 3. The two [N,N] mixing matrices of the block.
    w = enc.blocks[args.block].attention
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.0))
    for ax, mat, title in ((axes[0], w.pre_softmax_weight, "W_pre (logits)"),
                           (axes[1], w.post_softmax_weight, "W_post (probabilities)")):
        mat = np.asarray(engine.to_numpy(mat))
        lim = float(np.abs(mat).max())
        im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"block {args.block} {title}", fontsize=9)
        ax.set_xlabel("output head m", fontsize=8)
        ax.set_ylabel("input head n", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    path3 = os.path.join(args.out, "mixing_weights.png")
    fig.savefig(path3, dpi=100)
    plt.close(fig)
    for p in (path1, path2, path3):
        print(f"wrote {p} ({os.path.getsize(p) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
