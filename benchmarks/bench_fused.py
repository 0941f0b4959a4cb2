"""The element-wise stages of the fast path, each way we could run them, on base-size shapes:
the comparison behind engine/fast/fused.py.

    .venv/bin/python -m benchmarks.bench_fused [--rows 1024] [--reps 20]

Stages (T rows, H=768, I=3072, as one 8x128 batch of the base model):
- add + layer norm: out = LN(a + bias + residual), [T,H]
- GEGLU: out = gelu_tanh(h + bi) * (g + bg), [T,2I] -> [T,I]
- softmax: one sequence's masked softmax over its [N,S,S] logits, S = T/8 (one of the 8 sequences of
  an 8xS batch; the fast path runs attention one sequence per thread), the last eighth of keys masked
Ways:
- numpy: the fast path's NumPy code (the setting fused=False): in place, cache-sized row blocks, the
  fast path's threads (engine.fast.threads.default_threads())
- numba: the fused kernels (engine/fast/fused.py) on the same threads (the default)
- numexpr: one numexpr.evaluate per expression (its own threads), when numexpr is importable; it is
  not a dependency: `pip install numexpr` into the venv to include it
- readable: engine/core/kernels.py (one NumPy expression, single-threaded, temporaries)
Medians of --reps calls, milliseconds; writes benchmarks/results/fused_<T>rows_<host>.json. A benchmark,
never a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from benchmarks.bench_backward import REPO, machine, write_result


def _time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: .venv/bin/python -m benchmarks.bench_fused --rows 4096")
    parser.add_argument("--rows", type=int, default=1024, help="T, the token rows (default 1024: 8x128)")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per way (default 20)")
    args = parser.parse_args(argv)
    sys.path.insert(0, REPO)
    from engine.core import kernels as K
    from engine.fast import elementwise, fused
    from engine.fast.threads import default_threads
    T, H, I = args.rows, 768, 3072
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    threads, eps = default_threads(), np.float32(1e-12)
    work = {}

    def buffer(name, shape):   # reused scratch, as the fast path's workspace
        if work.get(name) is None or work[name].shape != shape:
            work[name] = np.empty(shape, np.float32)
        return work[name]

    a, bias, residual, gamma, beta = f32(T, H), f32(H), f32(T, H), f32(H), f32(H)
    hg, bi, bg = f32(T, 2 * I), f32(I), f32(I)
    out_h, out_i = np.empty((T, H), np.float32), np.empty((T, I), np.float32)
    S = max(1, T // 8)
    logits, adder = f32(12, S, S) * 4, np.where(np.arange(S) >= S - S // 8, np.float32(-1e9), np.float32(0))
    results = {"layer norm": {}, "geglu": {}, "softmax": {}}

    ways = {"numpy": False, "numba": True} if fused.enabled() else {"numpy": False}
    for way, use_fused in ways.items():
        results["layer norm"][way] = _time(lambda: elementwise.add_layer_norm(
            a.copy(), bias, residual, gamma, beta, eps, out_h, threads, use_fused, buffer), args.reps)
        results["geglu"][way] = _time(lambda: elementwise.geglu(hg.copy(), bi, bg, out_i, threads, use_fused, buffer),
                                      args.reps)
        results["softmax"][way] = _time(lambda: elementwise.masked_softmax_in_place(logits.copy(), adder, use_fused),
                                        args.reps)
    # the copies the calls above make (the stages work in place) are timed alone and subtracted
    copy_h, copy_hg, copy_s = (_time(lambda x=x: x.copy(), args.reps) for x in (a, hg, logits))
    for way in list(results["layer norm"]):
        results["layer norm"][way] -= copy_h
        results["geglu"][way] -= copy_hg
        results["softmax"][way] -= copy_s
    try:
        import numexpr as ne
        h, g = hg[:, :I], hg[:, I:]
        consts = {"half": np.float32(0.5), "one": np.float32(1), "k": np.float32(K.SQRT_2_OVER_PI),
                  "c": np.float32(K.GELU_TANH_COEFF), "eps": np.float32(1e-12)}   # float32: numexpr stays float32
        results["geglu"]["numexpr"] = _time(lambda: ne.evaluate(
            "half * (h + bi) * (one + tanh(k * ((h + bi) + c * (h + bi) ** 3))) * (g + bg)",
            local_dict={"h": h, "bi": bi, "g": g, "bg": bg, **consts}, out=out_i), args.reps)

        def ln_numexpr():
            x = ne.evaluate("a + bias + residual", local_dict={"a": a, "bias": bias, "residual": residual})
            mean = x.mean(axis=-1, keepdims=True)
            var = ne.evaluate("(x - mean) ** 2", local_dict={"x": x, "mean": mean}).mean(axis=-1, keepdims=True)
            ne.evaluate("(x - mean) / sqrt(var + eps) * gamma + beta", out=out_h,
                        local_dict={"x": x, "mean": mean, "var": var, "gamma": gamma, "beta": beta, **consts})
        results["layer norm"]["numexpr"] = _time(ln_numexpr, args.reps)
        numexpr_version = f"{ne.__version__}, {ne.get_num_threads()} threads"
    except ImportError:
        numexpr_version = "not installed"
    results["layer norm"]["readable"] = _time(lambda: K.layer_norm((a + bias) + residual, gamma, beta, 1e-12), args.reps)
    results["geglu"]["readable"] = _time(lambda: K.gelu_tanh(hg[:, :I] + bi) * (hg[:, I:] + bg), args.reps)
    results["softmax"]["readable"] = _time(lambda: K.masked_softmax(logits, adder), args.reps)
    for stage, ways in results.items():
        print(f"{stage} [{T} rows]: " + ", ".join(f"{w} {ms:.2f} ms" for w, ms in ways.items()))
    info = machine()
    info["numexpr"] = numexpr_version
    write_result(f"fused_{T}rows", {"machine": info, "rows": T, "hidden": H, "intermediate": I, "reps": args.reps,
                           "softmax_logits": [12, S, S], "median_ms": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
