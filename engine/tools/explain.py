"""The explain page: what the heads do on one text, as one self-contained HTML file.

    data = explain_data(enc, prep, "the cat sat on the mat")     # every number the page shows
    html = render_page(data)                                     # scripts, styles and data inline

The numbers come from the engine's trace (engine.core.trace) and the model's weights, never from
a second implementation of the model. Per layer l and head n, over the text's S tokens:

    unmixed     softmax(scaled_scores[n] + mask)     [S,T]  what a standard BERT head would attend
    after W_pre probs[n] = softmax over t of sum_m W_pre[m,n] scaled_scores[m] + mask     [S,T]
    after W_post mixed_probs[n] = sum_m W_post[m,n] probs[m]                               [S,T]

The unmixed view is the engine's own masked softmax kernel on the trace's scaled_scores: the
attention the heads would have without talking-heads mixing, for reference. Beside them: W_pre and
W_post [N,N] with their distance from the identity, the gate branch of each GEGLU (its distribution
and how much of the GELU branch it closes), the size of the residual stream and of each block's two
updates, and with an MLM head the top predictions at each [MASK] (at every token when the text has
none). Every array is written with the shortest decimal that reads back as the same float32.
"""

from __future__ import annotations

import json
import os

import numpy as np

from engine.core import kernels as K
from engine.tools.fill_mask import mask_ids

GATE_CLOSED = 0.1        # |gate| below this counts as closed: the unit passes under a tenth of its GELU
GATE_BINS = 41           # histogram bins of the gate values, symmetric around 0
TOP_PREDICTIONS = 5
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explain_page.html")


class ExplainError(ValueError):
    """The text or the model cannot be explained (no vocab, too long, no tokens)."""


def model_inputs(enc, prep, text_a: str, text_b: str | None = None):
    """(inputs [1,S] packed exactly to the text's length, the token strings). Refused beyond the
    model's positions, naming the length."""
    segments = [mask_ids(prep, text_a)]              # a literal [MASK] becomes the mask id (fill_mask's rule)
    if text_b is not None:
        segments.append(mask_ids(prep, text_b))
    for which, segment in zip(("text", "second segment"), segments):
        if not segment:
            raise ExplainError(f"the {which} has no tokens: it is empty or all whitespace")
    needed = sum(len(s) for s in segments) + 1 + len(segments)          # [CLS] and a [SEP] per segment
    positions = enc.config.max_position_embeddings
    if needed > positions:
        raise ExplainError(f"the text needs {needed} tokens with [CLS] and [SEP]; the model has "
                           f"{positions} positions: shorten it")
    inputs = prep.bert_pack_inputs([[s] for s in segments], seq_length=needed)
    tokens = [prep.vocab_tokens[i] for i in inputs["input_word_ids"][0]]
    return inputs, tokens


def float32_list(array) -> list:
    """A float32 array as nested lists of Python floats, each the shortest decimal that reads back
    as the same float32 (the page's numbers are the trace's, not a rounding of them)."""
    a = np.asarray(array, np.float32)
    if a.ndim == 0:
        return float(np.format_float_positional(a, unique=True, trim="-"))
    return [float32_list(x) for x in a] if a.ndim > 1 else \
        [float(np.format_float_positional(x, unique=True, trim="-")) for x in a]


def rms(x) -> float:
    """Root mean square over every element, in float64."""
    x = np.asarray(x, np.float64)
    return float(np.sqrt(np.mean(x * x)))


def identity_distance(weight) -> float:
    """||W - I||_F / ||I||_F: 0 for no mixing at all, about 1 when W is as far from I as I is from 0."""
    w = np.asarray(weight, np.float64)
    return float(np.linalg.norm(w - np.eye(w.shape[0])) / np.sqrt(w.shape[0]))


def gate_summary(gate, gelu) -> dict:
    """The gate branch's distribution and what it does. gate, gelu: [S,I] of one block.
    closed: the fraction of units with |gate| < GATE_CLOSED; scale: ||gelu * gate|| / ||gelu||."""
    g = np.asarray(gate, np.float64)
    h = np.asarray(gelu, np.float64)
    edge = max(float(np.abs(g).max()), GATE_CLOSED)
    counts, bounds = np.histogram(g, bins=GATE_BINS, range=(-edge, edge))
    return {"counts": counts.tolist(), "low": -edge, "high": edge,
            "closed": float(np.mean(np.abs(g) < GATE_CLOSED)),
            "scale": float(np.linalg.norm(h * g) / max(np.linalg.norm(h), 1e-30))}


def top_predictions(logits, vocab, rows) -> list:
    """[(position, [(token, probability) x TOP_PREDICTIONS])] at the given positions, from the
    trace's mlm logits [P,V] (P = every position) through the engine's softmax kernel."""
    probs = K.softmax(np.asarray(logits, np.float64))
    out = []
    for s in rows:
        best = np.argsort(-probs[s])[:TOP_PREDICTIONS]
        out.append({"position": int(s), "candidates": [[vocab[i], float(probs[s, i])] for i in best]})
    return out


def explain_data(enc, prep, text_a: str, text_b: str | None = None) -> dict:
    """Every number the page shows, for one text (and an optional second segment)."""
    if not enc.vocab:
        raise ExplainError("the weights file holds no vocab: the page needs one to name the tokens")
    inputs, tokens = model_inputs(enc, prep, text_a, text_b)
    trace = enc.trace(inputs)
    cfg = enc.config
    weights = enc.to_numpy(enc.parameters())
    mask_adder = K.attention_mask_adder(inputs["input_mask"], np.float32, cfg.attention_mask_constant)
    layers = []
    for i in range(cfg.num_layers):
        p = f"layers/{i}/"
        unmixed = K.masked_softmax(trace[p + "scaled_scores"], mask_adder)[0]         # [N,S,T]
        pre = weights.get(p + "attention/pre_softmax_weight")
        post = weights.get(p + "attention/post_softmax_weight")
        block_input = trace["embeddings/layer_norm"] if i == 0 else trace[f"layers/{i - 1}/feedforward_layer_norm"]
        layers.append({
            # a standard BERT block mixes nothing: its three stages are the same attention
            "attention": {"unmixed": float32_list(unmixed), "after_pre": float32_list(trace[p + "probs"][0]),
                          "after_post": float32_list(trace[p + ("mixed_probs" if post is not None else "probs")][0])},
            "mixing": None if pre is None else {
                "pre": float32_list(pre), "post": float32_list(post),
                "pre_distance": identity_distance(pre), "post_distance": identity_distance(post)},
            "gate": (gate_summary(trace[p + "gate_branch"][0], trace[p + "gelu_branch"][0])
                     if p + "gate_branch" in trace else None),                  # a dense feed-forward: none
            "residual": {"input": rms(block_input[0]), "attention_update": rms(trace[p + "attention_output"][0]),
                         "feedforward_update": rms(trace[p + "feedforward_output"][0])},
        })
    predictions = None
    if cfg.has_mlm:
        ids = inputs["input_word_ids"][0]
        masked = [int(s) for s in np.flatnonzero(ids == prep.mask_id)] if prep.mask_id is not None else []
        rows = masked or list(range(len(tokens)))
        predictions = {"at_masks": bool(masked), "rows": top_predictions(trace["mlm/logits"][0], enc.vocab, rows)}
    return {"text_a": text_a, "text_b": text_b, "tokens": tokens,
            "segments": inputs["input_type_ids"][0].tolist(),
            "config": {"layers": cfg.num_layers, "heads": cfg.num_heads, "hidden": cfg.hidden_size,
                       "intermediate": cfg.intermediate_size},
            "gate_closed": GATE_CLOSED, "layers": layers, "predictions": predictions}


def render_page(data: dict) -> str:
    """The HTML page: the template with the data inline as JSON (no network, nothing fetched)."""
    with open(TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=True).replace("</", "<\\/")
    title = data["text_a"] if data.get("text_b") is None else f"{data['text_a']} | {data['text_b']}"
    title = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return template.replace("__TITLE__", title[:80]).replace("__DATA__", payload)


def page_data(html: str) -> dict:
    """The data a page carries (what render_page put in): for tests and for reading a page back."""
    start = html.index('<script type="application/json" id="data">') + len('<script type="application/json" id="data">')
    return json.loads(html[start:html.index("</script>", start)].replace("<\\/", "</"))
