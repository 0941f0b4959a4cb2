"""The peer: Hugging Face transformers and sentence-transformers on PyTorch (CPU), other people's code
to check the engine against. Standalone: run by the peer's own venv (bash scripts/setup_peer.sh),
never importing this project's `engine` or `weights`, only torch, transformers, sentence_transformers
and numpy.

    .venv-peer/bin/python benchmarks/hf_peer.py REQUEST.npz|REQUEST.json RESULT.npz
    .venv-peer/bin/python benchmarks/hf_peer.py --time --model FOLDER [--texts FILE] [--n 64] [--reps 5] [--threads 1] [--save OUT.npy]

The request (an .npz of arrays and 0-d/1-d string arrays, or a JSON object with lists):
    model            the model folder (config.json + weights; a sentence-transformers folder for that kind)
    kind             "bert" (BertModel) | "bert_mlm" (BertForMaskedLM) | "sentence_transformers" | "tokenizer"
    input_word_ids, input_mask, input_type_ids   [B,S] ints (for bert / bert_mlm; when absent, the
                     tokenizer's ids for `texts` are used, input_type_ids defaulting to zeros)
    masked_lm_positions  [B,P] ints (bert_mlm; absent: the logits at every position, [B,S,V])
    texts            strings: tokenized with AutoTokenizer(model), and encoded by sentence_transformers
    seq_length       pad/truncate the tokenizer's ids to this length (absent: to the longest text)
    dtype            "float32" (default) | "float64" (the model's .double())
    threads          torch.set_num_threads (default 1)
    attn_implementation  "eager" (default: the textbook math) | "sdpa"
    batch_size       sentence_transformers' encode batch size (default 32)

The result .npz: for bert, sequence_output [B,S,H] (last_hidden_state), pooled_output [B,H]
(pooler_output; absent when the checkpoint has no pooler), encoder_outputs [L,B,S,H]
(hidden_states[1:]), embedding_output [B,S,H] (hidden_states[0]); for bert_mlm, mlm_logits [B,P,V]
(or [B,S,V]) and sequence_output (hidden_states[-1]); for sentence_transformers, embeddings [B,E];
with texts, tokenizer_input_word_ids / tokenizer_input_mask / tokenizer_input_type_ids [B,S]; the
inputs that were run (input_word_ids, ...); and `info`, a JSON string (versions, dtype, threads,
missing/unexpected checkpoint keys, the tokenizer's tokens, seconds). Eval mode, torch.no_grad, and
HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 so nothing reaches a hub.
"""

from __future__ import annotations

import os

# Before any Hugging Face import: never reach a hub, no telemetry, no tokenizer thread pool warnings.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

KINDS = ("bert", "bert_mlm", "sentence_transformers", "tokenizer")
INPUT_KEYS = ("input_word_ids", "input_mask", "input_type_ids")


class RequestError(ValueError):
    pass


def read_request(path: str) -> dict:
    if path.endswith(".json"):
        with open(path) as f:
            raw = json.load(f)
        req = {}
        for k, v in raw.items():
            if k in INPUT_KEYS or k == "masked_lm_positions":
                v = np.asarray(v, dtype=np.int64)
            req[k] = v
        return req
    with np.load(path, allow_pickle=False) as z:
        req = {}
        for k in z.files:
            a = z[k]
            if a.dtype.kind == "U":
                req[k] = a.tolist()  # 0-d: a str; 1-d: a list of str
            elif a.ndim == 0:
                req[k] = a.item()
            else:
                req[k] = a
        return req


def tokenize(folder: str, texts: list, seq_length) -> tuple[dict, list]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    kw = dict(padding="max_length", truncation=True, max_length=int(seq_length)) if seq_length else dict(padding=True)
    enc = tok(list(texts), return_tensors="np", return_token_type_ids=True, **kw)
    ids = {"tokenizer_input_word_ids": enc["input_ids"].astype(np.int32),
           "tokenizer_input_mask": enc["attention_mask"].astype(np.int32),
           "tokenizer_input_type_ids": enc["token_type_ids"].astype(np.int32)}
    tokens = [tok.convert_ids_to_tokens(row[m == 1].tolist()) for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    return ids, tokens


def run(req: dict) -> tuple[dict, dict]:
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()

    folder = req.get("model")
    kind = req.get("kind")
    if not folder or not os.path.isdir(folder):
        raise RequestError(f"request: 'model' must be a model folder, got {folder!r}")
    if kind not in KINDS:
        raise RequestError(f"request: 'kind' must be one of {KINDS}, got {kind!r}")
    dtype = req.get("dtype", "float32")
    if dtype not in ("float32", "float64"):
        raise RequestError(f"request: 'dtype' must be float32 or float64, got {dtype!r}")
    threads = int(req.get("threads", 1))
    torch.set_num_threads(threads)
    texts = req.get("texts")
    if isinstance(texts, str):
        texts = [texts]
    out, info = {}, {"torch": torch.__version__, "transformers": transformers.__version__, "kind": kind,
                     "dtype": dtype, "threads": torch.get_num_threads(), "model": folder}
    t0 = time.perf_counter()

    if texts is not None:
        ids, tokens = tokenize(folder, texts, req.get("seq_length"))
        out.update(ids)
        info["tokens"] = tokens
    if kind == "tokenizer":
        if texts is None:
            raise RequestError("request: kind 'tokenizer' needs 'texts'")
    elif kind == "sentence_transformers":
        if texts is None:
            raise RequestError("request: kind 'sentence_transformers' needs 'texts'")
        import sentence_transformers
        from sentence_transformers import SentenceTransformer
        info["sentence_transformers"] = sentence_transformers.__version__
        model = SentenceTransformer(folder, device="cpu", local_files_only=True)
        if dtype == "float64":
            model = model.double()
        model.eval()
        info["st_modules"] = [type(m).__name__ for m in model]
        info["st_max_seq_length"] = model.max_seq_length
        with torch.no_grad():
            emb = model.encode(list(texts), batch_size=int(req.get("batch_size", 32)), convert_to_tensor=True,
                               show_progress_bar=False)
        out["embeddings"] = emb.cpu().numpy()
    else:
        inputs = {k: req[k] for k in INPUT_KEYS if k in req}
        if "input_word_ids" not in inputs:
            if texts is None:
                raise RequestError(f"request: kind {kind!r} needs input_word_ids (or texts)")
            inputs = {k: out["tokenizer_" + k] for k in INPUT_KEYS}
        ids = torch.as_tensor(np.asarray(inputs["input_word_ids"], np.int64))
        mask = torch.as_tensor(np.asarray(inputs.get("input_mask", np.ones(ids.shape, np.int64)), np.int64))
        types = torch.as_tensor(np.asarray(inputs.get("input_type_ids", np.zeros(ids.shape, np.int64)), np.int64))
        for k, v in (("input_word_ids", ids), ("input_mask", mask), ("input_type_ids", types)):
            out[k] = v.numpy().astype(np.int32)
        from transformers import BertForMaskedLM, BertModel
        cls = BertModel if kind == "bert" else BertForMaskedLM
        model, loading = cls.from_pretrained(folder, output_loading_info=True, local_files_only=True,
                                             attn_implementation=req.get("attn_implementation", "eager"))
        info["missing_keys"] = sorted(loading.get("missing_keys", []))
        info["unexpected_keys"] = sorted(loading.get("unexpected_keys", []))
        if dtype == "float64":
            model = model.double()
        model.eval()
        info["param_dtype"] = str(next(model.parameters()).dtype)
        with torch.no_grad():
            res = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True,
                        return_dict=True)
        hidden = [h.numpy() for h in res.hidden_states]
        if kind == "bert":
            out["sequence_output"] = res.last_hidden_state.numpy()
            if res.pooler_output is not None:
                out["pooled_output"] = res.pooler_output.numpy()
        else:
            out["sequence_output"] = hidden[-1]
            logits = res.logits
            if "masked_lm_positions" in req:
                pos = torch.as_tensor(np.asarray(req["masked_lm_positions"], np.int64))
                logits = torch.gather(logits, 1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))
            out["mlm_logits"] = logits.numpy()
        out["embedding_output"] = hidden[0]
        out["encoder_outputs"] = np.stack(hidden[1:])
    info["seconds"] = time.perf_counter() - t0
    return out, info


def timing(args) -> int:
    import torch
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(args.threads)
    if args.texts:
        with open(args.texts, encoding="utf-8") as f:
            base = [line.rstrip("\n") for line in f if line.strip()]
    else:
        base = ["The quick brown fox jumps over the lazy dog.",
                "A sentence embedding maps a text to one vector.",
                "Parity tests compare two implementations of the same model on the same inputs.",
                "hello world"]
    texts = [base[i % len(base)] for i in range(args.n)]
    model = SentenceTransformer(args.model, device="cpu", local_files_only=True)
    model.eval()
    with torch.no_grad():
        model.encode(texts[:args.batch_size], batch_size=args.batch_size, show_progress_bar=False)  # warm-up
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            vectors = model.encode(texts, batch_size=args.batch_size, show_progress_bar=False)
            times.append(time.perf_counter() - t0)
    if args.save:
        np.save(args.save, np.asarray(vectors, np.float32))
    import sentence_transformers
    import transformers
    print(json.dumps({"peer": "sentence_transformers", "model": args.model, "n": args.n, "reps": args.reps,
                      "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                      "median_s": statistics.median(times), "times_s": times,
                      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                   "sentence_transformers": sentence_transformers.__version__}}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("request", nargs="?", help="the request, .npz or .json")
    parser.add_argument("result", nargs="?", help="the result .npz to write")
    parser.add_argument("--time", action="store_true", help="time sentence-transformers' encode of N texts")
    parser.add_argument("--model", help="--time: the sentence-transformers model folder")
    parser.add_argument("--texts", help="--time: a file of texts, one a line (default: four sentences cycled)")
    parser.add_argument("--n", type=int, default=64, help="--time: texts per encode (default 64)")
    parser.add_argument("--reps", type=int, default=5, help="--time: timed repetitions (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="--time: encode batch size (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="--time: torch threads (default 1)")
    parser.add_argument("--save", help="--time: write the last repetition's embeddings to this .npy")
    args = parser.parse_args(argv)
    if args.time:
        if not args.model:
            parser.error("--time needs --model")
        return timing(args)
    if not args.request or not args.result:
        parser.error("give REQUEST and RESULT (or --time)")
    try:
        out, info = run(read_request(args.request))
    except RequestError as e:
        print(f"hf_peer: {e}", file=sys.stderr)
        return 2
    tmp = args.result + ".tmp.npz"
    np.savez(tmp, info=np.array(json.dumps(info)), **out)
    os.replace(tmp, args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
