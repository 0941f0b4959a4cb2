"""The commands that turn one model file into another: export-savedmodel, export-onnx, extract
(engine/tf, weights/export_onnx.py), import-hf (weights/hf_import.py) and reference
(engine/tf/reference.py, its own parser)."""

from __future__ import annotations

import os

from engine.cli.common import EXIT_OK, input_file, output_path, say


def _tensorflow() -> None:
    from engine.tf.verify import import_tensorflow_quietly
    import_tensorflow_quietly()


def cmd_export_savedmodel(args) -> int:
    input_file(args.weights, "--weights")
    output_path(args.output, "--output", args.force, folder_output=True)
    _tensorflow()
    from engine.tf import export
    out = export.export_savedmodel(args.weights, args.output, force=args.force)
    say(f"export-savedmodel: wrote {out}")
    return EXIT_OK


def cmd_export_onnx(args) -> int:
    from weights.export_onnx import export_onnx
    input_file(args.weights, "--weights")
    output_path(args.output, "--output", args.force)
    out = export_onnx(args.weights, args.output, mlm=args.mlm, force=args.force)
    size = os.path.getsize(out) / 2**20
    say(f"export-onnx: wrote {out} ({size:.0f} MiB, opset 17, {'encoder + MLM head' if args.mlm else 'encoder'}; "
        "onnx checker passed)")
    return EXIT_OK


def cmd_extract(args) -> int:
    output_path(args.output, "--output", args.force)
    _tensorflow()
    from engine.tf import extract
    return extract.main([args.savedmodel, "--output", args.output] + (["--force"] if args.force else []))


def cmd_import_hf(args) -> int:
    """Reads and checks the whole folder, then writes the file atomically, with progress."""
    from engine.tools.progress import Progress
    from weights import hf_import
    output_path(args.output, "--output", args.force)
    say(f"import-hf: reading {os.path.abspath(args.model_dir)}")
    model = hf_import.read_hf_folder(args.model_dir)
    c, p = model.config, model.provenance
    for warning in filter(None, p["import_warnings"].split("\n")):
        say(f"import-hf: warning: {warning}")
    say(f"import-hf: {p['weights_file']}: {len(model.tensors)} tensors, L={c.num_layers} H={c.hidden_size} "
        f"N={c.num_heads} I={c.intermediate_size} V={c.vocab_size} P={c.max_position_embeddings} "
        f"T={c.type_vocab_size} {c.family} mlm={c.has_mlm} do_lower_case={c.do_lower_case}; encode: {c.pooling} "
        f"pooling{', normalized' if c.normalize else ''}{f', {c.max_seq_length} tokens' if c.max_seq_length else ''}"
        + (f"; left out: {p['ignored_tensors']}" if p["ignored_tensors"] else ""))
    with Progress(sum(a.nbytes for a in model.tensors.values()), "import-hf: writing") as bar:
        out = hf_import.write_model(model, args.output, force=args.force, on_progress=bar.update)
    parameters = sum(int(a.size) for a in model.tensors.values())
    say(f"import-hf: wrote {out}: {len(model.tensors)} tensors, {parameters:,} parameters")
    return EXIT_OK


def cmd_reference(args) -> int:
    _tensorflow()
    from engine.tf import reference
    return reference.main(args.builder_args, prog="python -m engine reference")
