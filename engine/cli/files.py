"""The commands that turn one model file into another: export-savedmodel, export-onnx, extract
(engine/tf, weights/export_onnx.py) and reference (engine/tf/reference.py, its own parser)."""

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


def cmd_reference(args) -> int:
    _tensorflow()
    from engine.tf import reference
    return reference.main(args.builder_args, prog="python -m engine reference")
