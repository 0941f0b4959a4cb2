"""Fine-tuning a classifier on pooled_output, the bert_glue tutorial's recipe, and prediction.

    result = finetune("model.h5", "train.csv", "tuned.h5", eval_path="dev.csv", epochs=3)
    rows = predict("tuned.h5", "test.csv")     # [{"row": 1, "text": ..., "label": ..., "probabilities": {...}}]

Recipe (the defaults): Dropout(0.1) + Dense(C) on pooled_output, dropout 0.1 in the encoder,
sparse categorical cross-entropy from logits, Model Garden's AdamW (engine/train/optimizer.py) with
learning rate 2e-5, 10% linear warm-up then linear decay to 0, 3 epochs, batch 32, every weight
trained. Texts are packed `[CLS] a [SEP] (b [SEP])` to seq_length: by default what the longest
example needs, capped at the model's positions; longer texts are truncated (round-robin, as
TF-Text) and counted in a warning.

Checkpoints: OUT.ckpt.h5 beside the output, written atomically every `checkpoint_every` steps and
at the end of each epoch: weights, head, optimizer moments and step, the dropout generator's state
and the data position. `resume=True` continues from it; N steps straight and N/2 + resume + N/2
give bit-identical weights (tests/test_finetune.py). The final OUT.h5 is a weights file every
command reads (the encoder), with the head and the label names (`predict` reads those). A log line
per step, and one per epoch with the eval metrics, go to OUT.log.jsonl; OUT.loss.png plots the
training loss and the eval metrics per epoch when matplotlib is installed (engine/train/run.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

import weights
from engine.api import Encoder
from engine.core import kernels as K
from engine.text.preprocess import Preprocessor
from engine.tools.progress import Progress
from engine.train import data as data_mod
from engine.train.optimizer import LinearSchedule
from engine.train.run import (RunError, TrainingError, check_ranges, load_checkpoint, plot_log, prepare_run,
                              save_checkpoint)
from engine.train.trainer import ClassifierHead, Trainer
from weights import write as weights_write


@dataclasses.dataclass
class Encoded:
    inputs: dict          # input_word_ids, input_mask, input_type_ids [N,S]
    labels: np.ndarray    # [N] int32 (or None)
    truncated: int        # how many examples were cut


def encode_examples(prep: Preprocessor, examples, seq_length: int | None, max_positions: int) -> Encoded:
    """Packs every example; seq_length default: the longest need, capped at max_positions."""
    a = prep.tokenize_flat([e.text for e in examples])
    pairs = any(e.text_b for e in examples)
    b = prep.tokenize_flat([e.text_b or "" for e in examples]) if pairs else None
    need = [len(x) + 2 + ((len(y) + 1) if pairs else 0) for x, y in zip(a, b if pairs else a)]
    if seq_length is None:
        seq_length = min(max(need), max_positions)
    if seq_length > max_positions:
        raise RunError(f"--seq-length {seq_length} exceeds the model's {max_positions} positions")
    packed = prep.bert_pack_inputs([a, b] if pairs else [a], seq_length=seq_length)
    return Encoded(packed, None, sum(n > seq_length for n in need))


def _metrics(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro-F1 and Matthews' correlation (multi-class, Gorodkin's R_K)."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(num_classes), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros(num_classes), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_classes), where=precision + recall > 0)
    n, correct = confusion.sum(), tp.sum()
    t, p = confusion.sum(1).astype(float), confusion.sum(0).astype(float)
    denominator = math.sqrt((n * n - (p * p).sum()) * (n * n - (t * t).sum()))
    mcc = (correct * n - (t * p).sum()) / denominator if denominator else 0.0
    present = confusion.sum(1) > 0
    return {"accuracy": float(correct / n), "macro_f1": float(f1[present].mean()), "mcc": float(mcc)}


def _probabilities(enc, head: ClassifierHead, inputs: dict, batch_size: int) -> np.ndarray:
    out = []
    N = inputs["input_word_ids"].shape[0]
    for start in range(0, N, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in inputs.items()}
        pooled = enc(batch, outputs=("pooled_output",))["pooled_output"]
        logits = np.asarray(K.dense(pooled, head.kernel, head.bias), np.float64)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        out.append(e / e.sum(-1, keepdims=True))
    return np.concatenate(out)


def finetune(weights_path: str, train_path: str, output: str, *, eval_path: str | None = None, epochs: int = 3,
             learning_rate: float = 2e-5, batch_size: int = 32, seq_length: int | None = None,
             warmup_fraction: float = 0.1, seed: int = 0, dropout: float = 0.1, resume: bool = False,
             force: bool = False, checkpoint_every: int = 100, max_steps: int | None = None,
             stream=None, live: bool | None = None, readable: bool = False,
             malloc_tuning: bool = False) -> dict:
    """Fine-tunes every weight and a new head; writes `output`. Returns the summary (and per-epoch
    eval metrics). max_steps stops early (the checkpoint is kept, for resume). readable: the tape's
    readable element-wise kernels instead of the fused ones. malloc_tuning: the Settings field (the
    command line, which owns its process, turns it on)."""
    stream = stream if stream is not None else sys.stderr
    checkpoint, log_path = prepare_run(output, resume, force, learning_rate=learning_rate,
                                       warmup_fraction=warmup_fraction, dropout=dropout, epochs=epochs,
                                       batch_size=batch_size, checkpoint_every=checkpoint_every, max_steps=max_steps,
                                       seq_length=seq_length)
    loaded = weights.load(weights_path)
    if loaded.vocab is None:
        raise RunError(f"--weights {weights_path}: has no vocab; fine-tuning needs one to read text")
    train = data_mod.read_examples(train_path)
    names = data_mod.label_names(train)
    if len(names) < 2:
        raise data_mod.DataError(f"{train_path}: one label only ({names[0]!r}): nothing to classify")
    train_ids = np.array(data_mod.label_ids(train, names, train_path), np.int32)
    evaluation = None
    if eval_path:
        ev = data_mod.read_examples(eval_path)
        evaluation = (ev, np.array(data_mod.label_ids(ev, names, eval_path), np.int32))
    enc = Encoder(loaded.config, loaded.tensors, vocab=loaded.vocab, malloc_tuning=malloc_tuning)
    positions = loaded.config.max_position_embeddings
    prep = Preprocessor.from_weights(loaded, default_seq_length=min(128, positions))
    encoded = encode_examples(prep, train, seq_length, positions)
    S = encoded.inputs["input_word_ids"].shape[1]
    if encoded.truncated:
        print(f"warning: {encoded.truncated} of {len(train)} training texts are longer than {S} tokens and were "
              f"truncated", file=stream)
    eval_inputs = encode_examples(prep, evaluation[0], S, positions).inputs if evaluation else None
    N = len(train)
    steps_per_epoch = math.ceil(N / batch_size)
    total_steps = epochs * steps_per_epoch
    schedule = LinearSchedule(learning_rate, total_steps, int(warmup_fraction * total_steps))
    head = ClassifierHead.init(loaded.config.hidden_size, len(names), seed=seed)
    trainer = Trainer(enc, loaded.sources, schedule, head=head, dropout=dropout or None, head_dropout=dropout,
                      seed=seed, readable=readable)
    state = {"epoch": 0, "batch": 0, "epochs_done": []}
    if resume and os.path.exists(checkpoint):
        state = load_checkpoint(checkpoint, trainer)
        print(f"resuming from {checkpoint}: step {trainer.optimizer.iterations} of {total_steps}", file=stream)
    elif not resume and os.path.exists(log_path):
        os.unlink(log_path)
    start_time, samples, steps_run = time.perf_counter(), 0, 0
    with open(log_path, "a") as log, Progress(total_steps, "finetune", stream=stream, bytes_unit=False,
                                              live=live) as bar:
        bar.update(trainer.optimizer.iterations)
        while state["epoch"] < epochs:
            order = np.random.default_rng([seed, state["epoch"]]).permutation(N)   # the epoch's shuffle
            while state["batch"] < steps_per_epoch:
                if max_steps is not None and steps_run >= max_steps:
                    save_checkpoint(checkpoint, trainer, state)
                    return {"stopped_at_step": trainer.optimizer.iterations, "checkpoint": checkpoint}
                rows = order[state["batch"] * batch_size:(state["batch"] + 1) * batch_size]
                batch = {k: v[rows] for k, v in encoded.inputs.items()}
                batch["labels"] = train_ids[rows]
                info = trainer.step(batch)
                if not math.isfinite(info["loss"]):
                    raise TrainingError(f"step {trainer.optimizer.iterations + 1}: the loss is {info['loss']}; stopped. "
                                        f"The last good checkpoint is {checkpoint}")
                state["batch"] += 1
                steps_run += 1
                samples += len(rows)
                rate = samples / (time.perf_counter() - start_time)
                log.write(json.dumps({"step": trainer.optimizer.iterations, "epoch": state["epoch"] + 1,
                                      "loss": info["loss"], "learning_rate": info["learning_rate"],
                                      "samples_per_s": rate}) + "\n")
                log.flush()
                bar.update(1, f"loss {info['loss']:.4f} lr {info['learning_rate']:.2e} {rate:.1f} samples/s")
                if trainer.optimizer.iterations % checkpoint_every == 0:
                    save_checkpoint(checkpoint, trainer, state)
            record = {"epoch": state["epoch"] + 1}
            if eval_inputs is not None:
                probs = _probabilities(enc, head, eval_inputs, batch_size)
                record.update(_metrics(probs.argmax(-1), evaluation[1], len(names)))
                print(f"epoch {record['epoch']}: eval accuracy {record['accuracy']:.4f}, macro-F1 "
                      f"{record['macro_f1']:.4f}, MCC {record['mcc']:.4f}", file=stream)
                log.write(json.dumps({"step": trainer.optimizer.iterations, **record}) + "\n")
            state["epochs_done"].append(record)
            state["epoch"] += 1
            state["batch"] = 0
            save_checkpoint(checkpoint, trainer, state)
    tensors = {p: np.asarray(a, np.float32) for p, a in enc.parameters().items()}
    weights_write.write_weights(output, loaded.config, tensors, sources=loaded.sources, vocab=loaded.vocab,
                                vocab_source=loaded.provenance.get("vocab_source", ""),
                                provenance={**{k: v for k, v in loaded.provenance.items()},
                                            "finetuned_from": os.path.abspath(weights_path),
                                            "finetune_train": os.path.abspath(train_path)},
                                force=force, head={"kernel": head.kernel, "bias": head.bias, "labels": names})
    os.unlink(checkpoint)
    plot_log(log_path, output + ".loss.png")
    seconds = time.perf_counter() - start_time
    return {"output": output, "examples": N, "steps": trainer.optimizer.iterations, "seq_length": S,
            "seconds": seconds, "samples_per_s": samples / seconds if seconds else 0.0,
            "epochs": state["epochs_done"], "labels": names, "truncated": encoded.truncated}


def predict(weights_path: str, input_path: str, batch_size: int = 32, seq_length: int | None = None,
            stream=None) -> list[dict]:
    """For each row of input_path, in order: {"row": its 1-based data row (the line for JSONL), "text"
    (and "text_b"), "label": the most probable class, "probabilities": {label: p}}."""
    stream = stream if stream is not None else sys.stderr
    check_ranges(batch_size=batch_size, seq_length=seq_length)
    loaded = weights.load(weights_path)
    if loaded.head is None:
        raise RunError(f"--weights {weights_path}: has no classifier head (/head): use a file written by finetune")
    examples = data_mod.read_examples(input_path, need_label=False)
    enc = Encoder(loaded.config, loaded.tensors, vocab=loaded.vocab, fast=True)
    prep = Preprocessor.from_weights(loaded, default_seq_length=min(128, loaded.config.max_position_embeddings))
    encoded = encode_examples(prep, examples, seq_length, loaded.config.max_position_embeddings)
    if encoded.truncated:
        print(f"warning: {encoded.truncated} of {len(examples)} texts were truncated to "
              f"{encoded.inputs['input_word_ids'].shape[1]} tokens", file=stream)
    head = ClassifierHead(loaded.head["kernel"], loaded.head["bias"])
    probs = _probabilities(enc, head, encoded.inputs, batch_size)
    labels = loaded.head["labels"]
    rows = []
    for example, p in zip(examples, probs, strict=True):
        row = {"row": example.row, "text": example.text}
        if example.text_b is not None:
            row["text_b"] = example.text_b
        row.update(label=labels[int(p.argmax())], probabilities={lbl: float(x) for lbl, x in zip(labels, p)})
        rows.append(row)
    return rows
