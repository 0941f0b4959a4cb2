"""Builds reference SavedModels the way TF Hub's talkheads_ggelu_bert_en_base/2 and its standard
BERTs (bert_en_uncased_L-*_H-*_A-*, the small BERTs) were exported.

The real weights cannot be downloaded here, so the ground truth is rebuilt from Model Garden's own
classes (`tf-models-official`), one per family (FAMILIES):
- talking_heads (the default): `EncoderScaffold` whose hidden layers are
  `TransformerScaffold(attention_cls=TalkingHeadsAttention, feedforward_cls=GatedFeedforward)`;
- bert: `BertEncoder` (`TransformerEncoderBlock`s: multi-head attention, a dense feed-forward),
  what `encoders.build_encoder` makes of a "bert" EncoderConfig;
with the `.mlm` sub-object from `BertPretrainerV2`, saved by `official/nlp/tools/export_tfhub_lib.py`'s
`export_model` itself (dict outputs, the `default` alias, the `vocab.txt` asset, `do_lower_case`).
The GELU is Model Garden's "gelu", the tanh approximation the Hub's models use (activation
gelu_tanh), or Keras' exact one (gelu_erf), in the blocks and the MLM transform alike.

Every variable is randomized with realistic scales: default initializers leave biases at zero,
layer-norm gammas at one and talking-heads mixing near zero, which would hide bugs.

    python -m engine.tf.reference --output DIR --config {tiny,small,base} [--family {talking_heads,bert}]
        [--activation {gelu_tanh,gelu_erf}] [--seed N] [--layers L --hidden H ...]

It lives in engine/tf/ with everything else that imports TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from weights.vocab import default_vocab_path
from engine.tools import cache

REFERENCE_FORMAT_VERSION = 1  # bump when the randomization or the export changes


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """Sizes of a reference model; letters as in the README legend."""
    layers: int = 12          # L
    hidden: int = 768         # H
    heads: int = 12           # N (head size D = H / N)
    intermediate: int = 3072  # I
    vocab: int = 30522        # V
    positions: int = 512      # max sequence length
    type_vocab: int = 2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"reference config: {field.name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"reference config: hidden ({self.hidden}) must be a multiple of heads ({self.heads})")


CONFIGS = {
    "tiny": ReferenceConfig(layers=2, hidden=64, heads=4, intermediate=256),
    "small": ReferenceConfig(layers=3, hidden=48, heads=4, intermediate=192, positions=64),
    "base": ReferenceConfig(),
}


def _progress(message: str) -> None:
    print(f"reference: {message}", file=sys.stderr, flush=True)


FAMILIES = ("talking_heads", "bert")
ACTIVATIONS = ("gelu_tanh", "gelu_erf")
DEFAULT_FAMILY, DEFAULT_ACTIVATION = FAMILIES[0], ACTIVATIONS[0]
# The hidden_activation strings Model Garden's tf_utils.get_activation resolves: its own "gelu" is the
# tanh approximation; "gelu_erf" is Keras' exact gelu, named so by activation_names() below.
MODEL_GARDEN_ACTIVATIONS = {"gelu_tanh": "gelu", "gelu_erf": "gelu_erf"}


def encoder_config(cfg: ReferenceConfig, activation: str = DEFAULT_ACTIVATION):
    """Model Garden's EncoderConfig of a reference model's sizes (the Hub model's other settings);
    the "bert" type builds BertEncoder, or EncoderScaffold under talking_heads_gin_bindings()."""
    from official.nlp.configs import encoders
    return encoders.EncoderConfig(
        type="bert",
        bert=encoders.BertEncoderConfig(
            vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_layers=cfg.layers,
            num_attention_heads=cfg.heads, hidden_activation=MODEL_GARDEN_ACTIVATIONS[activation],
            intermediate_size=cfg.intermediate, dropout_rate=0.1, attention_dropout_rate=0.1,
            max_position_embeddings=cfg.positions, type_vocab_size=cfg.type_vocab,
            initializer_range=0.02, return_all_encoder_outputs=True))


@contextlib.contextmanager
def talking_heads_gin_bindings():
    """The gin bindings that turn `encoders.build_encoder` into the talking-heads GEGLU encoder."""
    import gin
    from official.nlp.modeling import layers, networks  # noqa: F401  (registers the configurables)
    gin.clear_config()
    gin.parse_config("""
        build_encoder.encoder_cls = @EncoderScaffold
        EncoderScaffold.hidden_cls = @TransformerScaffold
        TransformerScaffold.attention_cls = @TalkingHeadsAttention
        TransformerScaffold.feedforward_cls = @GatedFeedforward
    """)
    try:
        yield
    finally:
        gin.clear_config()


@contextlib.contextmanager
def activation_names():
    """Keras' exact gelu under the name "gelu_erf", for the activation strings of an EncoderConfig:
    Model Garden's own "gelu" is the tanh approximation, and a config names its activation by a
    string. Keras serializes the function as "gelu", so the SavedModel's metadata records the exact
    GELU as Keras' own (weights.tf_names.ACTIVATIONS)."""
    import tf_keras
    with tf_keras.utils.custom_object_scope({"gelu_erf": tf_keras.activations.gelu}):
        yield


@contextlib.contextmanager
def family_scope(family: str = DEFAULT_FAMILY):
    """What `encoders.build_encoder` needs to build a family's encoder: the talking-heads gin
    bindings, or none (gin cleared: the "bert" type's own BertEncoder); and activation_names()."""
    if family not in FAMILIES:
        raise ValueError(f"reference: family {family!r}: choose one of {', '.join(FAMILIES)}")
    if family == "talking_heads":
        with talking_heads_gin_bindings(), activation_names():
            yield
        return
    import gin
    gin.clear_config()
    with activation_names():
        yield


CONDITIONINGS = ("random", "trained")


@dataclasses.dataclass(frozen=True)
class _TrainedLike:
    """The conditioning of trained weights, which float32 noise feels most (conditioning="trained"):

    - sharp pre-softmax talking-heads mixing: W_pre = 2.5 I + N(0, 0.8), so the mixed logits are
      several times the raw ones and the softmax is peaked (a standard BERT has no mixing: the
      rest applies);
    - LayerNorm gammas spread around 1 (log-normal, sigma 0.4) and betas away from 0 (N(0, 0.3));
    - a few outlier hidden dimensions, the same in every LayerNorm as in trained BERTs: gamma
      x 4 to 8 and beta +-2 to 4 there, so the residual stream carries values of 10 and more;
    - larger embeddings (word and type std 0.5, positions 0.2).
    """
    outlier_dims: tuple

    @classmethod
    def for_seed(cls, seed: int, hidden: int) -> "_TrainedLike":
        rng = np.random.default_rng([seed, 7919])        # its own stream: the variables' stream is unchanged
        return cls(tuple(int(d) for d in rng.choice(hidden, size=min(3, hidden), replace=False)))

    def value(self, leaf: str, shape: tuple, rng: np.random.Generator):
        """The trained-like value of one variable, or None where the random rule applies."""
        if leaf.endswith("/gamma"):
            g = rng.lognormal(0.0, 0.4, shape)
            g[list(self.outlier_dims)] *= rng.uniform(4.0, 8.0, len(self.outlier_dims))
            return g
        if leaf.endswith("/beta"):
            b = rng.normal(0.0, 0.3, shape)
            b[list(self.outlier_dims)] = rng.choice([-1.0, 1.0], len(self.outlier_dims)) * rng.uniform(
                2.0, 4.0, len(self.outlier_dims))
            return b
        if leaf.endswith("pre_softmax_weight"):
            return 2.5 * np.eye(shape[0]) + rng.normal(0.0, 0.8, shape)
        if leaf.endswith("position_embedding/embeddings"):
            return rng.normal(0.0, 0.2, shape)
        if leaf.endswith("/embeddings"):
            return rng.normal(0.0, 0.5, shape)
        return None


def _realistic_value(name: str, shape: tuple, rng: np.random.Generator, trained: _TrainedLike | None = None):
    """A random value for one variable, at the scale a trained BERT has for that role.

    Dense kernels get std 1/sqrt(fan_in), so activations stay O(1) through every block and the
    attention logits are peaked enough for masking and mixing bugs to show. `trained`: the
    trained-like conditioning above overrides the rule for the variables it names.
    """
    leaf = name.split(":")[0]
    if trained is not None:
        value = trained.value(leaf, shape, rng)
        if value is not None:
            return value
    if leaf.endswith("/gamma"):
        return rng.uniform(0.6, 1.4, shape)
    if leaf.endswith("/beta"):
        return rng.normal(0.0, 0.1, shape)
    if leaf.endswith("_softmax_weight"):  # talking-heads [N,N]: near identity, heads really mix
        return np.eye(shape[0]) + rng.normal(0.0, 0.3, shape)
    if leaf.endswith("output_bias/bias"):
        return rng.normal(-1.0, 0.5, shape)
    if leaf.endswith("/bias"):
        return rng.normal(0.0, 0.1, shape)
    if leaf.endswith("position_embedding/embeddings"):
        return rng.normal(0.0, 0.02, shape)
    if leaf.endswith("/embeddings"):
        return rng.normal(0.0, 0.05, shape)
    if leaf.endswith("/kernel"):
        # attention_output kernels are [N,D,H]: fan-in is N*D; every other kernel has it first.
        fan_in = int(np.prod(shape[:2])) if len(shape) == 3 and "attention_output" in leaf else shape[0]
        return rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
    raise ValueError(f"reference: no randomization rule for variable {name!r} {shape}")


def randomize(variables, seed: int, conditioning: str = "random", hidden: int | None = None) -> None:
    """Assigns every float variable a realistic random value, deterministically per seed;
    conditioning "trained" gives the trained-like conditioning of _TrainedLike (needs `hidden`)."""
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"reference: conditioning {conditioning!r}: choose one of {', '.join(CONDITIONINGS)}")
    trained = _TrainedLike.for_seed(seed, hidden) if conditioning == "trained" else None
    rng = np.random.default_rng(seed)
    for var in variables:
        shape = tuple(var.shape)
        var.assign(_realistic_value(var.name, shape, rng, trained).astype(np.float32))


def build(out_dir: str, cfg: ReferenceConfig, seed: int = 0, vocab_file: str | None = None,
          conditioning: str = "random", with_mlm: bool = True, family: str = DEFAULT_FAMILY,
          activation: str = DEFAULT_ACTIVATION) -> None:
    """Builds the SavedModel at `out_dir` (which must not exist) with Model Garden's export code."""
    import tensorflow as tf
    import tf_keras
    from official.nlp.tools import export_tfhub_lib

    tf.get_logger().setLevel("ERROR")  # Keras' "skipping serialization of unbuilt layer" noise

    vocab_file = vocab_file or default_vocab_path()
    with open(vocab_file, encoding="utf-8") as f:
        vocab_lines = sum(1 for _ in f)
    if vocab_lines != cfg.vocab:
        raise ValueError(f"reference: vocab {vocab_file} has {vocab_lines} lines, config wants vocab={cfg.vocab}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"reference: activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
    start = time.time()
    config = encoder_config(cfg, activation)
    with family_scope(family), tempfile.TemporaryDirectory(prefix="reference-ckpt-") as tmp:
        _progress(f"building the {family} family, {activation}, {cfg} with seed {seed}, {conditioning} conditioning")
        tf_keras.backend.clear_session()
        tf.random.set_seed(seed)
        _, pretrainer = export_tfhub_lib._create_model(encoder_config=config, with_mlm=True)
        randomize(pretrainer.variables, seed, conditioning, hidden=cfg.hidden)
        n_params = sum(int(np.prod(v.shape)) for v in pretrainer.variables)
        _progress(f"randomized {len(pretrainer.variables)} variables, {n_params:,} parameters")
        checkpoint = tf.train.Checkpoint(**pretrainer.checkpoint_items).save(os.path.join(tmp, "ckpt"))
        del pretrainer
        tf_keras.backend.clear_session()
        _progress("exporting with export_tfhub_lib.export_model")
        export_tfhub_lib.export_model(   # with_mlm=False: the encoder restored alone, no .mlm
            out_dir, encoder_config=config, model_checkpoint_path=checkpoint,
            with_mlm=with_mlm, vocab_file=vocab_file, do_lower_case=True)
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "seed": seed, "conditioning": conditioning, "with_mlm": with_mlm,
                   "family": family, "activation": activation, "format_version": REFERENCE_FORMAT_VERSION,
                   "tensorflow": tf.__version__}, f, indent=1)
    _progress(f"built in {time.time() - start:.1f}s")


def build_atomic(out_dir: str, cfg: ReferenceConfig, seed: int = 0, force: bool = False, conditioning: str = "random",
                 family: str = DEFAULT_FAMILY, activation: str = DEFAULT_ACTIVATION) -> str:
    """Builds into a temporary sibling folder, then renames it into place: never a half model."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        build(os.path.join(tmp, "model"), cfg, seed, conditioning=conditioning, family=family, activation=activation)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(os.path.join(tmp, "model"), out_dir)
        _progress(f"wrote {out_dir}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def cached(config: str | ReferenceConfig = "tiny", seed: int = 0, conditioning: str = "random",
           with_mlm: bool = True, family: str = DEFAULT_FAMILY, activation: str = DEFAULT_ACTIVATION) -> str:
    """Returns the path of a reference SavedModel, building it once per config, seed, conditioning,
    with_mlm (False: an encoder-only SavedModel, no `.mlm`), family and activation."""
    import tensorflow as tf
    cfg = CONFIGS[config] if isinstance(config, str) else config
    parts = [dataclasses.asdict(cfg), seed, conditioning, with_mlm, REFERENCE_FORMAT_VERSION, tf.__version__]
    kind = ""
    if (family, activation) != (DEFAULT_FAMILY, DEFAULT_ACTIVATION):  # the default's keys name no family
        parts.append([family, activation])
        kind = f"{family}-{activation}-"
    key = json.dumps(parts, sort_keys=True)
    name = "{}{}-{}{}-seed{}-{}".format(kind, config if isinstance(config, str) else "custom", conditioning,
                                        "" if with_mlm else "-encoder", seed, hashlib.sha256(key.encode()).hexdigest()[:12])
    return cache.cached_folder("reference", name, "reference.json",
                               lambda out: build(out, cfg, seed, conditioning=conditioning, with_mlm=with_mlm,
                                                 family=family, activation=activation))


_LOADED = {}


def load_savedmodel(path: str):
    """`tf.saved_model.load(path)`, once per process and path (do not train what it returns: the
    reference training step, engine.tf.training, loads its own copy)."""
    import tensorflow as tf
    if path not in _LOADED:
        _LOADED[path] = tf.saved_model.load(path)
    return _LOADED[path]


def run_savedmodel(path: str, inputs: dict, mlm: bool = True) -> dict:
    """TensorFlow's outputs for Hub-style inputs: `model.mlm(inputs)` (or `model(inputs)`), as NumPy.

    The SavedModel is loaded once per process and path (load_savedmodel).
    """
    import tensorflow as tf
    model = load_savedmodel(path)
    tensors = {k: tf.constant(np.asarray(v, np.int32)) for k, v in inputs.items()
               if mlm or k != "masked_lm_positions"}
    out = model.mlm(tensors) if mlm else model(tensors)
    return {k: ([t.numpy() for t in v] if isinstance(v, (list, tuple)) else v.numpy()) for k, v in out.items()}


def main(argv=None, prog: str = "python -m engine.tf.reference") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a randomized talking-heads GEGLU BERT (or standard BERT) SavedModel with Model "
                    "Garden's export code.",
        epilog=f"examples:\n  {prog} --output /tmp/ref --config base --conditioning trained --seed 1\n"
               f"  {prog} --output /tmp/bert --config base --family bert")
    parser.add_argument("--output", required=True, dest="out_dir", metavar="DIR",
                        help="the SavedModel folder to create (refused if it exists, unless --force)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny",
                        help="starting sizes: tiny (L=2 H=64 N=4 I=256), small (L=3 H=48 N=4 I=192, 64 positions) or "
                             "base (L=12 H=768 N=12 I=3072)")
    parser.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY,
                        help="talking_heads: EncoderScaffold of TransformerScaffold(TalkingHeadsAttention, "
                             "GatedFeedforward), as talkheads_ggelu_bert_en_base (default); bert: BertEncoder, "
                             "as bert_en_uncased_L-12_H-768_A-12 and the small BERTs")
    parser.add_argument("--activation", choices=ACTIVATIONS, default=DEFAULT_ACTIVATION,
                        help="the GELU of the feed-forward and the MLM transform: gelu_tanh, Model Garden's gelu "
                             "(the tanh approximation, as the Hub's models; default) or gelu_erf (Keras' exact gelu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random value (default 0)")
    parser.add_argument("--conditioning", choices=CONDITIONINGS, default="random",
                        help="random: every variable at a realistic scale; trained: also the conditioning of "
                             "trained weights (sharp pre-softmax mixing, LayerNorm gammas and betas away from "
                             "1 and 0, outlier hidden dimensions, larger embeddings)")
    for field in dataclasses.fields(ReferenceConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, dest=field.name,
                            help=f"override {field.name}")
    parser.add_argument("--force", action="store_true", help="replace an existing --output folder")
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ReferenceConfig)
                 if getattr(args, f.name) is not None}
    parent = os.path.dirname(os.path.abspath(args.out_dir))
    if not os.path.isdir(parent):
        print(f"error: --output {args.out_dir}: the folder {parent} does not exist", file=sys.stderr)
        return 2
    if os.path.lexists(args.out_dir) and not args.force:
        print(f"error: --output {args.out_dir}: exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        cfg = dataclasses.replace(CONFIGS[args.config], **overrides)
        build_atomic(args.out_dir, cfg, args.seed, force=args.force, conditioning=args.conditioning,
                     family=args.family, activation=args.activation)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- The preprocessing SavedModel (bert_en_uncased_preprocess/3) ------------------------------------

PREPROCESSING_FORMAT_VERSION = 1  # bump when build_preprocessing changes


def build_preprocessing(out_dir: str, vocab_file: str | None = None) -> str:
    """Exports the preprocessing SavedModel the way `bert_en_uncased_preprocess/3` was exported:
    Model Garden's `export_tfhub_lib.export_preprocessing` with the uncased vocab, lower casing,
    no offsets and default seq_length 128. Load it with `tf.saved_model.load` and call it, or its
    `.tokenize` and `.bert_pack_inputs`. `out_dir` must not exist. Returns `out_dir`."""
    import tensorflow as tf
    import tensorflow_text
    from official.nlp.tools import export_tfhub_lib

    tf.get_logger().setLevel("ERROR")
    vocab_file = vocab_file or default_vocab_path()
    start = time.time()
    _progress(f"exporting the preprocessing model with vocab {vocab_file}")
    export_tfhub_lib.export_preprocessing(
        out_dir, vocab_file=vocab_file, do_lower_case=True, tokenize_with_offsets=False,
        default_seq_length=128)
    with open(vocab_file, "rb") as f:
        vocab_sha256 = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(out_dir, "preprocessing.json"), "w") as f:
        json.dump({"vocab_sha256": vocab_sha256, "do_lower_case": True, "default_seq_length": 128,
                   "format_version": PREPROCESSING_FORMAT_VERSION, "tensorflow": tf.__version__,
                   "tensorflow_text": tensorflow_text.__version__}, f, indent=1)
    _progress(f"exported in {time.time() - start:.1f}s")
    return out_dir


def cached_preprocessing(vocab_file: str | None = None) -> str:
    """Returns the path of the preprocessing SavedModel for `vocab_file` (default: the real uncased
    vocab), building it once under engine.tools.cache.cache_dir() (locked, then renamed into place)."""
    import tensorflow as tf
    import tensorflow_text
    vocab_file = vocab_file or default_vocab_path()
    with open(vocab_file, "rb") as f:
        vocab_sha256 = hashlib.sha256(f.read()).hexdigest()
    key = json.dumps([vocab_sha256, PREPROCESSING_FORMAT_VERSION, tf.__version__, tensorflow_text.__version__])
    name = "preprocess-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache.cached_folder("reference", name, "preprocessing.json", lambda out: build_preprocessing(out, vocab_file))
