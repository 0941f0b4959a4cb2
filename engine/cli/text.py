"""The commands that run text through a model: encode (engine/tools/stream.py), fill-mask
(engine/tools/fill_mask.py) and explain (engine/tools/explain.py)."""

from __future__ import annotations

import os
import time

from engine.cli.common import (EXIT_OK, CliError, input_file, load_model, output_path, preprocessor, say,
                               seq_length)


def embedding_kind(args, config) -> tuple[str, bool]:
    """(what encode writes, whether it is L2-normalized): --sequence, else --pooling and --normalize,
    each defaulting to the file's config (engine/tools/stream.py names the outputs)."""
    from engine.tools.stream import OUTPUT_NAMES
    if args.sequence:
        return "sequence_output", False
    pooling = args.pooling or getattr(config, "pooling", "pooled")
    normalize = getattr(config, "normalize", False) if args.normalize is None else args.normalize
    return OUTPUT_NAMES[pooling], bool(normalize)


def cmd_encode(args) -> int:
    """Streams the texts (or --input, read lazily) through the encoder in token-budget batches;
    resumable. The design (lengths, batches, commits, --resume, --force) is in engine/tools/stream.py."""
    from engine.tools import stream
    from engine.tools.progress import Progress
    if not args.input and not args.texts:
        raise CliError("no text given: pass TEXT arguments or --input FILE")
    if args.resume and args.force:
        raise CliError("--resume and --force exclude each other")
    if args.sequence and (args.pooling or args.normalize):
        raise CliError("--pooling and --normalize make sentence embeddings; --sequence writes every token's vector")
    if args.cluster:
        from engine.cli.cluster import cmd_encode_cluster
        return cmd_encode_cluster(args)
    if args.input and len(args.input) > 1:
        raise CliError("--input: several files need --cluster (without it encode reads one file)")
    args.input = args.input[0] if args.input else None
    t0 = time.perf_counter()
    # checksums too: a corpus-sized run should not start on silently corrupted weights (flipped bits)
    enc = load_model(args, verify_checksums=True)
    prep = preprocessor(enc)
    key, normalize = embedding_kind(args, enc.config)
    source = args.input if args.input else list(args.texts)
    total = os.path.getsize(args.input) if args.input and os.path.isfile(args.input) else len(args.texts)
    with Progress(total, "encode", bytes_unit=bool(args.input)) as bar:
        def advance(fraction, rows, tokens):
            if fraction is not None:
                bar.update(fraction * bar.total - bar.done, f"{rows} texts, {tokens} tokens")
        summary = stream.encode(enc, prep, source, args.output, key=key, seq_length=args.seq_length,
                                max_tokens=args.max_tokens, max_rows=args.batch_size, resume=args.resume,
                                force=args.force, progress=say, bar=advance, normalize=normalize)
    seconds = time.perf_counter() - t0
    done_now = summary["rows"] - summary["resumed_from"]
    path = "readable" if enc.fast_forward is None else "fast"
    resumed = (f" ({summary['resumed_from']} of them before the resume, {done_now} in this run)"
               if summary["resumed_from"] else "")
    say(f"encode: wrote {tuple(summary['shape'])} {key}{', L2-normalized' if normalize else ''} to {args.output}: "
        f"{summary['rows']} texts{resumed}, "
        f"{summary.get('tokens', 0)} tokens, {summary['batches']} batches in {seconds:.1f}s "
        f"({done_now / max(seconds, 1e-9):.1f} texts/s, model loading included; {path} path)")
    return EXIT_OK


def cmd_fill_mask(args) -> int:
    from engine.tools.fill_mask import fill_mask
    enc = load_model(args)
    prep = preprocessor(enc)
    length = None if args.seq_length is None else seq_length(args, enc, 0)
    result = fill_mask(enc, prep, args.text, args.top_k, length)
    if result.truncated:
        say(f"fill-mask: warning: the text needs {result.tokens} tokens with [CLS] and [SEP]; the last "
            f"{result.truncated} were cut to fit {result.seq_length} (--seq-length sets the length, at most the "
            f"model's {enc.config.max_position_embeddings} positions)")
    for n, candidates in enumerate(result.candidates):
        print(f"[MASK] #{n + 1}:")
        for token, prob in candidates:
            print(f"  {token:<20} {prob:.4f}")
    return EXIT_OK


def cmd_explain(args) -> int:
    """One self-contained HTML page for one text (and an optional second segment), from the engine's
    trace on the readable path: what engine/tools/explain.py shows, written atomically."""
    import engine
    from engine.tools import explain
    from weights.write import atomic_output
    output_path(args.output, "--output", args.force)
    enc = engine.load(input_file(args.weights, "--weights"), backend=args.backend)
    data = explain.explain_data(enc, preprocessor(enc), args.text, args.text_b)
    html = explain.render_page(data)
    with atomic_output(args.output, force=args.force) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(html)
    cfg = enc.config
    predicted = ""
    if data["predictions"] and data["predictions"]["at_masks"]:
        best = ", ".join(f"{row['candidates'][0][0]} ({row['candidates'][0][1]:.2f})"
                         for row in data["predictions"]["rows"])
        predicted = f"; best at each [MASK]: {best}"
    say(f"explain: wrote {args.output} ({os.path.getsize(args.output) / 1024:.0f} KiB): {len(data['tokens'])} "
        f"tokens through {cfg.num_layers} layers x {cfg.num_heads} heads{predicted}; open it in a browser "
        f"(it loads nothing from the network)")
    return EXIT_OK
