"""Continued MLM training on plain text, with BERT's masking (create_pretraining_data.py).

    result = pretrain("model.h5", "corpus.txt", "continued.h5", steps=1000)

Each non-empty line of the input is one example, packed `[CLS] tokens [SEP]` (truncated to
seq_length, default what the longest line needs capped at the model's positions). Masking, drawn
afresh for every epoch from (seed, epoch): 15% of the real tokens (at least 1, at most 20 per 128
positions), never [CLS], [SEP] or padding; of those, 80% become [MASK], 10% a random vocab token,
10% stay; the loss is Model Garden's masked_lm loss (engine/train/losses.py). The optimizer,
checkpoints (OUT.ckpt.h5, --resume), log and plot are a training run's (engine/train/run.py); the
log holds the held-out MLM loss before and after. The output is a weights file with the MLM head,
read by engine.load and every command.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

import weights
from engine.api import Encoder
from engine.text.preprocess import Preprocessor
from engine.tools.progress import Progress
from engine.train import losses
from engine.train.optimizer import LinearSchedule
from engine.train.data import read_text_lines
from engine.train.run import RunError, TrainingError, load_checkpoint, plot_log, prepare_run, save_checkpoint
from engine.train.trainer import Trainer
from weights import write as weights_write

MASKED_LM_PROB = 0.15
MAX_PREDICTIONS_PER_128 = 20


def mask_batch(ids: np.ndarray, mask: np.ndarray, rng: np.random.Generator, vocab_size: int, mask_id: int,
               special_ids: set[int]) -> dict:
    """BERT's masking of a packed batch [B,S] -> input ids with masks applied, and masked_lm_positions,
    masked_lm_ids, masked_lm_weights [B,P] (P = at most 20 per 128 positions; rows with fewer
    predictions are zero-padded with weight 0)."""
    B, S = ids.shape
    P = max(1, int(round(MAX_PREDICTIONS_PER_128 * S / 128)))
    out_ids = ids.copy()
    positions = np.zeros((B, P), np.int32)
    labels = np.zeros((B, P), np.int32)
    weights_ = np.zeros((B, P), np.float32)
    for b in range(B):
        candidates = [s for s in range(S) if mask[b, s] and int(ids[b, s]) not in special_ids]
        if not candidates:
            continue
        n = min(P, max(1, int(round(len(candidates) * MASKED_LM_PROB))))
        chosen = sorted(rng.permutation(candidates)[:n].tolist())
        for j, s in enumerate(chosen):
            r = rng.random()
            if r < 0.8:
                out_ids[b, s] = mask_id
            elif r < 0.9:
                out_ids[b, s] = int(rng.integers(0, vocab_size))
            positions[b, j], labels[b, j], weights_[b, j] = s, ids[b, s], 1.0
    return {"input_word_ids": out_ids, "masked_lm_positions": positions, "masked_lm_ids": labels,
            "masked_lm_weights": weights_}


def mlm_eval_loss(enc, packed: dict, seed: int, vocab_size: int, mask_id: int, special: set[int],
                  batch_size: int = 32) -> float:
    """The masked_lm loss over a held-out set, with masks fixed by `seed` (comparable across runs)."""
    rng = np.random.default_rng([seed, 10 ** 6])
    total, weight = 0.0, 0.0
    N = packed["input_word_ids"].shape[0]
    for start in range(0, N, batch_size):
        sl = slice(start, start + batch_size)
        masked = mask_batch(packed["input_word_ids"][sl], packed["input_mask"][sl], rng, vocab_size, mask_id, special)
        batch = {"input_word_ids": masked["input_word_ids"], "input_mask": packed["input_mask"][sl],
                 "input_type_ids": packed["input_type_ids"][sl], "masked_lm_positions": masked["masked_lm_positions"]}
        logits = enc.mlm(batch)["mlm_logits"]
        loss, _ = losses.mlm_loss(logits, masked["masked_lm_ids"], masked["masked_lm_weights"])
        w = float(masked["masked_lm_weights"].sum())
        total, weight = total + float(loss) * w, weight + w
    return total / weight if weight else 0.0


def pretrain(weights_path: str, input_path: str, output: str, *, steps: int = 1000, learning_rate: float = 1e-4,
             batch_size: int = 32, seq_length: int | None = None, warmup_fraction: float = 0.1, seed: int = 0,
             dropout: float = 0.1, resume: bool = False, force: bool = False, checkpoint_every: int = 100,
             max_steps: int | None = None, eval_path: str | None = None, stream=None, live: bool | None = None,
             readable: bool = False, malloc_tuning: bool = False) -> dict:
    stream = stream if stream is not None else sys.stderr
    checkpoint, log_path = prepare_run(output, resume, force, learning_rate=learning_rate,
                                       warmup_fraction=warmup_fraction, dropout=dropout, steps=steps,
                                       batch_size=batch_size, checkpoint_every=checkpoint_every, max_steps=max_steps,
                                       seq_length=seq_length)
    lines = read_text_lines(input_path, "--input")
    held_out_lines = read_text_lines(eval_path, "--eval") if eval_path else None
    loaded = weights.load(weights_path)
    if not loaded.config.has_mlm:
        raise RunError(f"--weights {weights_path}: encoder-only (no MLM head): continued MLM training needs one")
    if loaded.vocab is None:
        raise RunError(f"--weights {weights_path}: has no vocab; pretraining needs one to read text")
    vocab = loaded.vocab
    positions = loaded.config.max_position_embeddings
    prep = Preprocessor.from_weights(loaded, default_seq_length=min(128, positions))
    special = {vocab.index(t) for t in ("[CLS]", "[SEP]", "[PAD]") if t in vocab}
    mask_id = vocab.index("[MASK]")

    def pack(lines, S=None):
        tokens = prep.tokenize_flat(lines)
        need = max(len(t) for t in tokens) + 2
        S = S or min(need, positions)
        return prep.bert_pack_inputs([tokens], seq_length=S), sum(len(t) + 2 > S for t in tokens)
    if seq_length is not None and seq_length > positions:
        raise RunError(f"--seq-length {seq_length} exceeds the model's {positions} positions")
    packed, truncated = pack(lines, seq_length)
    S = packed["input_word_ids"].shape[1]
    if truncated:
        print(f"warning: {truncated} of {len(lines)} lines are longer than {S} tokens and were truncated", file=stream)
    held_out = pack(held_out_lines, S)[0] if held_out_lines else None
    enc = Encoder(loaded.config, loaded.tensors, vocab=vocab, malloc_tuning=malloc_tuning)
    trainer = Trainer(enc, loaded.sources, LinearSchedule(learning_rate, steps, int(warmup_fraction * steps)),
                      dropout=dropout or None, seed=seed, readable=readable)
    N = len(lines)
    per_epoch = math.ceil(N / batch_size)
    state = {"step_in_run": 0}
    if resume and os.path.exists(checkpoint):
        state = load_checkpoint(checkpoint, trainer)
        print(f"resuming from {checkpoint}: step {trainer.optimizer.iterations} of {steps}", file=stream)
    elif os.path.exists(log_path):
        os.unlink(log_path)
    eval_before = mlm_eval_loss(enc, held_out, seed, len(vocab), mask_id, special) if held_out is not None else None
    start, samples, run = time.perf_counter(), 0, 0
    order, order_epoch = None, None
    with open(log_path, "a") as log, Progress(steps, "pretrain", stream=stream, bytes_unit=False, live=live) as bar:
        if eval_before is not None and trainer.optimizer.iterations == 0:
            log.write(json.dumps({"step": 0, "eval_loss": eval_before}) + "\n")
        bar.update(trainer.optimizer.iterations)
        while trainer.optimizer.iterations < steps:
            if max_steps is not None and run >= max_steps:
                save_checkpoint(checkpoint, trainer, state)
                return {"stopped_at_step": trainer.optimizer.iterations, "checkpoint": checkpoint}
            step = trainer.optimizer.iterations
            epoch, index = divmod(step, per_epoch)
            if order_epoch != epoch:                                       # the epoch's shuffle, from (seed, epoch)
                order, order_epoch = np.random.default_rng([seed, epoch]).permutation(N), epoch
            rows = order[index * batch_size:(index + 1) * batch_size]
            mask_rng = np.random.default_rng([seed, epoch, index])
            masked = mask_batch(packed["input_word_ids"][rows], packed["input_mask"][rows], mask_rng, len(vocab),
                                mask_id, special)
            batch = {**masked, "input_mask": packed["input_mask"][rows], "input_type_ids": packed["input_type_ids"][rows]}
            info = trainer.step(batch)
            if not math.isfinite(info["loss"]):
                raise TrainingError(f"step {trainer.optimizer.iterations + 1}: the loss is {info['loss']}; stopped. "
                                    f"The last good checkpoint is {checkpoint}")
            run += 1
            samples += len(rows)
            rate = samples / (time.perf_counter() - start)
            log.write(json.dumps({"step": trainer.optimizer.iterations, "epoch": epoch + 1, "loss": info["loss"],
                                  "learning_rate": info["learning_rate"], "samples_per_s": rate}) + "\n")
            log.flush()
            bar.update(1, f"loss {info['loss']:.4f} lr {info['learning_rate']:.2e} {rate:.1f} samples/s")
            if trainer.optimizer.iterations % checkpoint_every == 0:
                save_checkpoint(checkpoint, trainer, state)
    eval_after = mlm_eval_loss(enc, held_out, seed, len(vocab), mask_id, special) if held_out is not None else None
    if eval_after is not None:
        with open(log_path, "a") as log:
            log.write(json.dumps({"step": trainer.optimizer.iterations, "eval_loss": eval_after}) + "\n")
    tensors = {p: np.asarray(a, np.float32) for p, a in enc.parameters().items()}
    weights_write.write_weights(output, loaded.config, tensors, sources=loaded.sources, vocab=vocab,
                                provenance={**loaded.provenance, "pretrained_from": os.path.abspath(weights_path),
                                            "pretrain_input": os.path.abspath(input_path)}, force=force)
    if os.path.exists(checkpoint):
        os.unlink(checkpoint)
    plot_log(log_path, output + ".loss.png")
    seconds = time.perf_counter() - start
    return {"output": output, "lines": N, "steps": trainer.optimizer.iterations, "seq_length": S, "seconds": seconds,
            "samples_per_s": samples / seconds if seconds else 0.0, "eval_loss_before": eval_before,
            "eval_loss_after": eval_after, "truncated": truncated}
