"""GPU benchmark of the fused forward (engine/gpu/forward.py) against the cuBLAS floor.

    .venv/bin/python -m benchmarks.bench_gpu --random-weights          # base size, random weights
    .venv/bin/python -m benchmarks.bench_gpu --weights model.h5        # an extracted HDF5 file

For each case (batch x seq_length: 1x128, 32x128, 128x128, 32x512 by default) and each precision
(float32, tf32, float16, bfloat16) it times, with cupy.cuda.Event pairs, medians over --repeats runs:
- "fused": the whole encoder forward (embeddings, L blocks, pooler; inputs already on the GPU),
  eager launches, and with --graphs also one CUDA graph launch;
- "floor": the same cuBLAS products alone (GpuForward.products_only: same shapes and storage),
and the model's product FLOPs (2*m*n*k summed over every product, the talking-heads mixing not
included) divided by each time: achieved TFLOP/s. float32 also times the plain CuPy path
(gpu_path="plain") for reference. Writes benchmarks/results/gpu_<device>.json and .png.

Without CuPy or a CUDA device it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import numpy as np

DEFAULT_CASES = "1x128,32x128,128x128,32x512"
DEFAULT_PRECISIONS = "float32,tf32,float16,bfloat16"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def need_gpu():
    """CuPy with a CUDA device, or exit 2 with the reason."""
    try:
        import cupy
    except ImportError as e:
        print(f"bench_gpu: needs CuPy and a CUDA GPU, and CuPy is not installed ({e}): "
              "pip install -e '.[gpu]' on a machine with an NVIDIA GPU", file=sys.stderr)
        sys.exit(2)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001
        print(f"bench_gpu: no usable CUDA device ({e})", file=sys.stderr)
        sys.exit(2)
    if count < 1:
        print("bench_gpu: CuPy sees no CUDA device", file=sys.stderr)
        sys.exit(2)
    return cupy


def product_flops(config, B, S):
    """FLOPs of the model's matrix products for one forward pass (2 per multiply-add)."""
    H, N, D, I, L = config.hidden_size, config.num_heads, config.head_size, config.intermediate_size, config.num_layers
    BS = B * S
    per_block = (2 * BS * H * 3 * H          # q, k, v
                 + 2 * B * N * S * S * D     # q·k
                 + 2 * B * N * S * S * D     # p·v
                 + 2 * BS * H * H            # attention output
                 + 2 * BS * H * 2 * I        # intermediate and gate
                 + 2 * BS * I * H)           # feed-forward output
    return L * per_block + 2 * B * H * H     # + pooler


def time_ms(cupy, fn, repeats, warmup):
    """Median (and all) of `repeats` timings of fn() in ms, with CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times), times


def build_encoder(args):
    import engine
    from tests.random_weights import random_tensors
    from weights.format import ModelConfig
    if args.weights:
        import weights
        loaded = weights.load(args.weights)
        return engine.Encoder(loaded.config, loaded.tensors, backend="cupy", gpu_path="plain"), args.weights
    config = ModelConfig(num_layers=12, hidden_size=768, num_heads=12, head_size=64, intermediate_size=3072,
                         vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)
    return (engine.Encoder(config, random_tensors(config, seed=0), backend="cupy", gpu_path="plain"),
            "random weights of base size (seed 0)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="an extracted HDF5 weights file (weights/format.py)")
    src.add_argument("--random-weights", action="store_true", help="random tensors of the base model's shapes")
    p.add_argument("--cases", default=DEFAULT_CASES, help=f"BxS list (default {DEFAULT_CASES})")
    p.add_argument("--precisions", default=DEFAULT_PRECISIONS, help=f"default {DEFAULT_PRECISIONS}")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--graphs", action="store_true", help="also time the forward as one CUDA graph launch")
    p.add_argument("--no-plain", action="store_true", help="skip the plain CuPy path (float32)")
    p.add_argument("--out", default=None, help="output path without extension (default benchmarks/results/gpu_<device>)")
    args = p.parse_args(argv)
    cupy = need_gpu()

    from engine.gpu import forward as gpu
    from engine.gpu.kernels import check_precision
    cases = [tuple(int(v) for v in c.lower().split("x")) for c in args.cases.split(",")]
    precisions = [v.strip() for v in args.precisions.split(",")]
    for prec in precisions:
        check_precision(prec)
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    device_name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    enc, source = build_encoder(args)
    cfg = enc.config
    print(f"device: {device_name}; model: {source}; L={cfg.num_layers} H={cfg.hidden_size} N={cfg.num_heads} "
          f"I={cfg.intermediate_size}", flush=True)

    rng = np.random.default_rng(0)
    rows = []
    for prec in precisions:
        fwd = gpu.GpuForward(enc, precision=prec, cuda_graphs=args.graphs)
        for B, S in cases:
            ids = cupy.asarray(rng.integers(1000, cfg.vocab_size, (B, S)).astype(np.int32))
            mask = cupy.ones((B, S), np.int32)
            types = cupy.zeros((B, S), np.int32)
            flops = product_flops(cfg, B, S)
            fwd.cuda_graphs = False
            fused_ms, fused_all = time_ms(cupy, lambda: fwd.encode(ids, mask, types), args.repeats, args.warmup)
            ws = fwd._workspace(B, S)
            floor_ms, floor_all = time_ms(cupy, lambda: fwd.products_only(ws), args.repeats, args.warmup)
            row = dict(batch=B, seq_length=S, precision=prec, product_flops=flops,
                       fused_ms=fused_ms, floor_ms=floor_ms, fused_over_floor=fused_ms / floor_ms,
                       fused_tflops=flops / fused_ms / 1e9, floor_tflops=flops / floor_ms / 1e9,
                       fused_ms_all=fused_all, floor_ms_all=floor_all)
            if args.graphs:
                fwd.cuda_graphs = True
                for _ in range(2):          # first call eager, second captures
                    fwd.encode(ids, mask, types)
                captured = isinstance(fwd._graphs.get((B, S)), tuple)
                graph_ms, graph_all = time_ms(cupy, lambda: fwd.encode(ids, mask, types), args.repeats, args.warmup)
                row.update(graph_captured=captured, graph_ms=graph_ms, graph_tflops=flops / graph_ms / 1e9,
                           graph_ms_all=graph_all)
            if prec == "float32" and not args.no_plain:
                plain_ms, plain_all = time_ms(cupy, lambda: enc.encode(ids, mask, types), max(5, args.repeats // 3),
                                              min(2, args.warmup))
                row.update(plain_ms=plain_ms, plain_tflops=flops / plain_ms / 1e9, plain_ms_all=plain_all)
            rows.append(row)
            extra = "".join(f"  {k[:-3]} {row[k]:8.3f} ms" for k in ("graph_ms", "plain_ms") if k in row)
            print(f"{prec:>9} {B:4d}x{S:<4d} fused {fused_ms:8.3f} ms ({row['fused_tflops']:6.1f} TFLOP/s)  "
                  f"floor {floor_ms:8.3f} ms ({row['floor_tflops']:6.1f} TFLOP/s)  ratio {row['fused_over_floor']:5.2f}"
                  + extra, flush=True)
        del fwd
        cupy.get_default_memory_pool().free_all_blocks()

    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    out = args.out or os.path.join(RESULTS, f"gpu_{slug}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = dict(device=device_name, cupy=cupy.__version__, cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                python=platform.python_version(), model=source, repeats=args.repeats, warmup=args.warmup,
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                flops_note="products only (2*m*n*k), talking-heads mixing and elementwise work not counted",
                timing_note="median of cupy.cuda.Event timings; inputs already on the GPU; outputs stay on the GPU")
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {out}.json")
    try:
        plot(rows, cases, precisions, device_name, out + ".png")
        print(f"wrote {out}.png")
    except ImportError as e:
        print(f"no PNG: matplotlib missing ({e})")


def plot(rows, cases, precisions, device_name, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 4), squeeze=False)
    for ax, (B, S) in zip(axes[0], cases):
        sel = [r for r in rows if (r["batch"], r["seq_length"]) == (B, S)]
        x = np.arange(len(sel))
        ax.bar(x - 0.2, [r["fused_tflops"] for r in sel], 0.4, label="fused forward")
        ax.bar(x + 0.2, [r["floor_tflops"] for r in sel], 0.4, label="cuBLAS products alone")
        if any("graph_tflops" in r for r in sel):
            ax.plot(x - 0.2, [r.get("graph_tflops", np.nan) for r in sel], "k^", label="CUDA graph")
        ax.set_xticks(x, [r["precision"] for r in sel])
        ax.set_title(f"{B}x{S}")
        ax.set_ylabel("product TFLOP/s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"talking-heads GEGLU BERT base, {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
