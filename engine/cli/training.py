"""The training commands: finetune, predict (engine/train/finetune.py) and pretrain
(engine/train/pretrain.py). A run's own checks (ranges, the output, the checkpoint) are
engine/train/run.py's; the files are checked here first, so that nothing loads before a typo is found."""

from __future__ import annotations

import json

from engine.cli.common import EXIT_OK, input_file, output_path, say

TRAINING_OPTIONS = ("learning_rate", "batch_size", "seq_length", "warmup_fraction", "dropout", "seed", "resume",
                    "force", "checkpoint_every", "max_steps", "readable")


def training_arguments(args) -> dict:
    """The values of the options finetune and pretrain share, as keyword arguments of both."""
    # the command owns its process: glibc may keep freed blocks for the tape (Settings.malloc_tuning)
    return {**{name: getattr(args, name) for name in TRAINING_OPTIONS}, "malloc_tuning": True}


def _stopped(result: dict) -> bool:
    """A training run stopped by --max-steps: says how to go on."""
    if "stopped_at_step" not in result:
        return False
    say(f"stopped at step {result['stopped_at_step']} (--max-steps); continue with --resume ({result['checkpoint']})")
    return True


def _files(args, **inputs) -> None:
    """Each given input file must exist ({option name: path}, None for an option not given); the
    output's folder must exist and an existing output needs --force (a leftover checkpoint needs
    --resume: engine/train/run.py says so)."""
    for option, path in inputs.items():
        if path is not None:
            input_file(path, "--" + option)
    output_path(args.output, "--output", args.force)


def cmd_finetune(args) -> int:
    from engine.train import finetune
    _files(args, weights=args.weights, train=args.train, eval=args.eval)
    result = finetune.finetune(args.weights, args.train, args.output, eval_path=args.eval, epochs=args.epochs,
                               **training_arguments(args))
    if _stopped(result):
        return EXIT_OK
    say(f"finetune: {result['examples']} examples, {result['steps']} steps, seq_length {result['seq_length']}, "
        f"{result['seconds']:.1f} s, {result['samples_per_s']:.1f} samples/s; wrote {result['output']} "
        f"(labels {result['labels']}; log and plot beside it)")
    return EXIT_OK


def cmd_pretrain(args) -> int:
    from engine.train import pretrain
    _files(args, weights=args.weights, input=args.input, eval=args.eval)
    result = pretrain.pretrain(args.weights, args.input, args.output, steps=args.steps, eval_path=args.eval,
                               **training_arguments(args))
    if _stopped(result):
        return EXIT_OK
    held = (f"; held-out MLM loss {result['eval_loss_before']:.4f} -> {result['eval_loss_after']:.4f}"
            if result["eval_loss_before"] is not None else "")
    say(f"pretrain: {result['lines']} lines, {result['steps']} steps, seq_length {result['seq_length']}, "
        f"{result['seconds']:.1f} s, {result['samples_per_s']:.1f} samples/s{held}; wrote {result['output']}")
    return EXIT_OK


def cmd_predict(args) -> int:
    from engine.train import finetune
    from weights.write import atomic_output
    _files(args, weights=args.weights, input=args.input)
    rows = finetune.predict(args.weights, args.input, batch_size=args.batch_size, seq_length=args.seq_length)
    with atomic_output(args.output, force=args.force) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    say(f"predict: {len(rows)} rows to {args.output}")
    return EXIT_OK
