"""The command line's parser: one sub-command per job, each option with its help, each command with
an example. The commands themselves are in engine/cli/{checks,text,training,files}.py."""

from __future__ import annotations

import argparse

from engine.cli import checks, files, text, training
from weights.format import FAMILY_CHOICES

DESCRIPTION = "Reference engine for BERT with talking-heads attention and gated GELU: `python -m engine`."

EXAMPLES = {
    "verify": "example:\n  python -m engine verify --savedmodel talkheads --weights talkheads.h5 --batch 8 --seq-length 128",
    "trace": "example:\n  python -m engine trace --weights talkheads.h5 \"The quick brown fox.\" --output trace.h5",
    "compare": "example:\n  python -m engine compare ours.h5 theirs.h5 --map theirs_to_ours.json --rtol 1e-5",
    "encode": "examples:\n  python -m engine encode --weights talkheads.h5 --input corpus.txt --output embeddings.npy\n"
              "  python -m engine encode --weights talkheads.h5 \"hello world\" --output one.jsonl --sequence\n"
              "  python -m engine encode --weights minilm.h5 --input corpus.txt --output sentences.npy "
              "--pooling mean --normalize\n"
              "  python -m engine encode --weights talkheads.h5 --input a.txt b.txt --output embeddings/ "
              "--cluster local:2",
    "fill-mask": "example:\n  python -m engine fill-mask --weights talkheads.h5 \"the [MASK] sat on the mat\" --top-k 5",
    "explain": "example:\n  python -m engine explain --weights talkheads.h5 \"the cat sat on the [MASK]\" "
               "--text-b \"it was tired\" --output page.html",
    "extract": "example:\n  python -m engine extract talkheads/ --output talkheads.h5",
    "import-hf": "example:\n  python -m engine import-hf all-MiniLM-L6-v2/ --output minilm.h5",
    "finetune": "example:\n  python -m engine finetune --weights talkheads.h5 --train train.csv --eval dev.csv "
                "--output tuned.h5 --epochs 3",
    "pretrain": "example:\n  python -m engine pretrain --weights talkheads.h5 --input corpus.txt --output continued.h5 "
                "--steps 1000",
    "export-savedmodel": "example:\n  python -m engine export-savedmodel --weights tuned.h5 --output exported/",
    "export-onnx": "example:\n  python -m engine export-onnx --weights model.h5 --output model.onnx\n"
                   "  python -m engine export-onnx --weights model.h5 --mlm --output model_mlm.onnx",
    "predict": "example:\n  python -m engine predict --weights tuned.h5 --input test.csv --output predictions.jsonl",
}


def command(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def model_arguments(p, weights_help: str = "the extracted HDF5 weights file (python -m engine extract)",
                     readable: bool = True) -> None:
    p.add_argument("--weights", required=True, help=weights_help)
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="the array backend (default: $TALKHEADS_BACKEND, else numpy)")
    if readable:
        p.add_argument("--readable", action="store_true",
                       help="run the readable path (engine/core) instead of the fast one: the same numbers "
                            "within float32 noise, slower")


def training_options(p, learning_rate: float, unit: str, dropout_in: str, seeded: str, checkpoints_also: str) -> None:
    """The options finetune and pretrain share (engine/train), with each command's defaults and words."""
    p.add_argument("--learning-rate", type=float, default=learning_rate, help=f"peak learning rate (default {learning_rate:g})")
    p.add_argument("--batch-size", type=int, default=32, help=f"{unit}s per step (default 32)")
    p.add_argument("--seq-length", type=int, default=None,
                   help=f"tokens per {unit} (default: what the longest needs, capped at the model's positions; "
                        "longer texts are truncated with a warning)")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="share of the steps spent warming up (default 0.1)")
    p.add_argument("--dropout", type=float, default=0.1, help=f"dropout rate {dropout_in} (default 0.1; 0: off)")
    p.add_argument("--seed", type=int, default=0, help=f"seed of {seeded} (default 0)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.ckpt.h5")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help=f"steps between checkpoints (default 100{checkpoints_also})")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps of this run, checkpointed (continue with --resume)")
    p.add_argument("--readable", action="store_true",
                   help="run the readable kernels (engine/core) instead of the fused element-wise and threaded "
                        "attention ones (engine/fast/tape_kernels.py): the same results within float32 noise, slower")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit codes: 0 ok, 1 verify or compare found a difference, 2 error (bad "
                                            "input, files or options), 3 a bug, 130 interrupted.\n"
                                            "example:\n  python -m engine verify")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command")

    p = command(sub, "verify", "the engine vs TensorFlow on the same SavedModel, with the engine's float64 run "
                                "as the truth: the noise verdict per output")
    p.add_argument("--savedmodel", help="SavedModel directory (default: the tiny reference model, built once)")
    p.add_argument("--family", choices=["talking_heads", "bert"], default="talking_heads",
                   help="without --savedmodel: the tiny reference model's family, talking_heads (EncoderScaffold, "
                        "the default) or bert (BertEncoder, as the Hub's standard BERTs)")
    p.add_argument("--weights", help="extracted HDF5 (default: extract the SavedModel once, cached)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="the engine's array backend (default: $TALKHEADS_BACKEND, else numpy)")
    p.add_argument("--readable", action="store_true",
                   help="judge the readable path (engine/core) instead of the fast one")
    p.add_argument("--batch", type=int, default=8,
                   help="rows per input set (default 8: pooled_output has one token per row)")
    p.add_argument("--seq-length", type=int, default=128,
                   help="sequence length, capped at the model's positions (default 128)")
    p.add_argument("--rtol", type=float, default=None,
                   help="a plain fixed tolerance instead of the noise verdict: max|engine - TF| <= RTOL x max|TF| "
                        "per output (no float64 run)")
    p.add_argument("--pooled-rtol", type=float, default=None,
                   help="with --rtol: the tolerance of pooled_output (default: RTOL)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and MLM positions (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--trace", action="store_true",
                   help="compare every intermediate with TensorFlow's step by step; print the first divergence")
    p.set_defaults(func=checks.cmd_verify)

    p = command(sub, "trace", "every intermediate tensor, in order, to an HDF5 file (engine/core/trace.py)")
    p.add_argument("texts", nargs="*", help="texts to trace (or --input, or --ids)")
    model_arguments(p, readable=False)
    p.add_argument("--ids", help="JSON ids instead of text: [[101, ...], ...] or {\"input_word_ids\": ...}, "
                                 "inline or a file")
    p.add_argument("--input", help="a UTF-8 text file, one text per line")
    p.add_argument("--output", help="the trace file to write (.h5; required; the size is estimated first)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--seq-length", type=int, default=None,
                   help="pack the texts to this length (default: what the longest needs, capped at the "
                        "model's positions)")
    p.set_defaults(func=checks.cmd_trace)

    p = command(sub, "compare", "two trace files: the first divergence in A's order, and a table (a fixed "
                                 "tolerance: trace files carry no float64 truth)")
    p.add_argument("a", help="the reference trace (ours)")
    p.add_argument("b", help="the trace to check (e.g. written by another port)")
    p.add_argument("--rtol", type=float, default=1e-5, help="max|A-B| <= RTOL x max|A| per intermediate (default 1e-5)")
    p.add_argument("--pooled-rtol", type=float, default=None, help="the tolerance of pooled_output (default: --rtol)")
    p.add_argument("--map", help="JSON {their_name: our_name | {name, transpose}} for B's dataset names")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=checks.cmd_compare)

    p = command(sub, "encode", "text to sentence (or sequence) embeddings, streamed, resumable "
                               "(engine/tools/stream.py)")
    p.add_argument("texts", nargs="*", help="texts to encode (or --input)")
    model_arguments(p)
    p.add_argument("--input", nargs="+", action="extend", metavar="FILE",
                   help="a UTF-8 text file, one text per line (read lazily: any size); with --cluster several, "
                        "encoded in the order given")
    p.add_argument("--output", required=True, help="the file to write: .npy, .h5 or .jsonl (rows in input order); "
                                                   "with --cluster a folder of shards")
    p.add_argument("--sequence", action="store_true",
                   help="write sequence_output [rows, S, H] instead of sentence embeddings [rows, H]; padded "
                        "positions hold zeros")
    p.add_argument("--pooling", choices=list(FAMILY_CHOICES["pooling"]), default=None,
                   help="pooled_output, the [CLS] row of sequence_output, or the mean over the real tokens (default: "
                        "the file's pooling, \"pooled\" unless import-hf read a sentence-transformers model)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide each embedding by its L2 norm (default: the file's normalize)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="truncate texts to this many tokens with [CLS] and [SEP] (default: the file's max_seq_length "
                        "when it has one, else the model's positions; truncated texts are counted in a warning); "
                        "with --sequence also the row width (default: what the longest text needs)")
    p.add_argument("--max-tokens", type=int, default=2048,
                   help="token budget per batch: real tokens on the fast path, rows x padded length on the "
                        "readable one (default 2048: as fast as larger batches on the base model, and "
                        "half the memory of 8192; a longer single text runs alone)")
    p.add_argument("--batch-size", type=int, default=None, help="at most this many rows per batch (default: no cap)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last committed batch")
    p.add_argument("--force", action="store_true", help="replace an existing output (or partial run)")
    p.add_argument("--cluster", metavar="local[:N] | tcp://HOST:PORT", default=None,
                   help="encode on Dask distributed: a LocalCluster of N worker processes (default: the CPUs / "
                        "--threads-per-worker) or the scheduler at an address; --output is then a folder of .npy "
                        "shards and a manifest (engine.read_embeddings reads it; docs/commands.md). Every worker "
                        "must read --input and --weights at the same paths. Needs the cluster extra (dask)")
    p.add_argument("--partition-lines", type=int, default=1000,
                   help="with --cluster: lines per partition, the unit of work, of retry and of output shard "
                        "(default 1000)")
    p.add_argument("--threads-per-worker", type=int, default=1,
                   help="with --cluster: the model's threads in each worker; a worker encodes one partition at "
                        "a time (default 1)")
    p.set_defaults(func=text.cmd_encode)

    p = command(sub, "fill-mask", "the top-k tokens and their probabilities for each [MASK] of a text")
    p.add_argument("text", help="a text with one or more [MASK]")
    model_arguments(p, "an extracted HDF5 weights file with the MLM head")
    p.add_argument("--top-k", type=int, default=5,
                   help="candidates per [MASK] (default 5; at most the vocabulary's size)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="pack the text to this length (default: what it needs, capped at the model's positions)")
    p.set_defaults(func=text.cmd_fill_mask)

    p = command(sub, "explain", "one self-contained HTML page for one text: each head's attention before and "
                                 "after the talking-heads mixing, W_pre and W_post, the GEGLU gate, the residual "
                                 "stream, MLM predictions (engine/tools/explain.py)")
    p.add_argument("text", help="the text (a literal [MASK] is the mask token; the model's MLM head predicts it)")
    model_arguments(p, readable=False)
    p.add_argument("--text-b", default=None, help="a second segment, packed after the first as a pair")
    p.add_argument("--output", required=True, help="the .html page to write (written atomically; it loads "
                                                    "nothing from the network)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=text.cmd_explain)

    p = command(sub, "finetune", "fine-tune every weight and a classifier on pooled_output (Model Garden's "
                                  "AdamW, the bert_glue recipe); no TensorFlow needed")
    p.add_argument("--weights", required=True, help="the HDF5 weights file to start from")
    p.add_argument("--train", required=True, help="CSV, TSV or JSONL with columns text, optional text_b, label")
    p.add_argument("--eval", default=None, help="the same format: accuracy, macro-F1 and MCC after each epoch")
    p.add_argument("--output", required=True, help="the .h5 to write: the encoder, the head and the label names "
                                                   "(checkpoint OUT.ckpt.h5, log OUT.log.jsonl and OUT.loss.png beside it)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training data (default 3)")
    training_options(p, learning_rate=2e-5, unit="example",
                      dropout_in="in the encoder and the head", seeded="the head's initialization, the shuffles and dropout",
                      checkpoints_also="; also at every epoch's end")
    p.set_defaults(func=training.cmd_finetune)

    p = command(sub, "predict", "class probabilities for each row, with a file written by finetune")
    p.add_argument("--weights", required=True, help="an .h5 written by finetune (with its head)")
    p.add_argument("--input", required=True, help="CSV, TSV or JSONL with a text column (and text_b for pairs)")
    p.add_argument("--output", required=True,
                   help="JSONL to write: one {row, text, label, probabilities} object per input row, in order")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch (default 32)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="tokens per row (default: what the longest needs, capped at the model's positions)")
    p.set_defaults(func=training.cmd_predict)

    p = command(sub, "pretrain", "continued MLM training on plain text with BERT's masking; no TensorFlow needed")
    p.add_argument("--weights", required=True, help="the HDF5 weights file to start from (with the MLM head)")
    p.add_argument("--input", required=True, help="UTF-8 text, one example per non-empty line")
    p.add_argument("--eval", default=None, help="held-out text (one example per line): its MLM loss before and after")
    p.add_argument("--output", required=True, help="the .h5 to write (checkpoint, log and plot beside it)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    training_options(p, learning_rate=1e-4, unit="line", dropout_in="in the encoder",
                      seeded="the shuffles, the masks and dropout", checkpoints_also="")
    p.set_defaults(func=training.cmd_pretrain)

    p = command(sub, "export-savedmodel", "a weights file back to a TF Hub SavedModel, with Model Garden's "
                                           "classes (needs TensorFlow)")
    p.add_argument("--weights", required=True, help="the HDF5 weights file (extracted or trained)")
    p.add_argument("--output", required=True, help="the SavedModel folder to write (its parent must exist)")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.set_defaults(func=files.cmd_export_savedmodel)

    p = command(sub, "export-onnx", "a weights file to an ONNX graph (opset 17, dynamic batch and sequence axes; "
                                      "no TensorFlow needed), for ONNX Runtime and other ONNX runtimes")
    p.add_argument("--weights", required=True, help="the HDF5 weights file (extracted or trained)")
    p.add_argument("--output", required=True, help="the .onnx file to write (written atomically)")
    p.add_argument("--mlm", action="store_true",
                   help="also take masked_lm_positions and return mlm_logits (needs a file with the MLM head)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=files.cmd_export_onnx)

    p = command(sub, "extract", "a SavedModel to one HDF5 weights file (needs TensorFlow)")
    p.add_argument("savedmodel", help="the SavedModel folder (with saved_model.pb)")
    p.add_argument("--output", required=True, help="the .h5 file to write (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=files.cmd_extract)

    p = command(sub, "import-hf", "a Hugging Face BERT folder (config.json, model.safetensors or pytorch_model.bin, "
                                   "vocab.txt; sentence-transformers settings too) to one HDF5 weights file; no torch")
    p.add_argument("model_dir", help="the folder, as save_pretrained (or sentence-transformers' save) writes it")
    p.add_argument("--output", required=True, help="the .h5 file to write (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=files.cmd_import_hf)

    # Every argument, --help included, goes to the builder's own parser (engine.tf.reference.main).
    p = sub.add_parser("reference", help="build a randomized reference SavedModel (needs TensorFlow); "
                                         "`reference --help` lists its options", add_help=False)
    p.set_defaults(func=files.cmd_reference)
    return parser
