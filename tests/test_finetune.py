"""The finetune and predict commands (engine/train/finetune.py): data errors name the file, row
and column; a run writes a weights file every command reads, with its head; a run stopped and
resumed gives bit-identical weights; a non-finite loss stops the run naming the step; a checkpoint
write killed midway leaves the previous checkpoint whole."""

import json
import os

import h5py
import numpy as np
import pytest

import engine
import weights
from engine.cli.main import main as cli
from engine.train import data, finetune, run

TEXTS = [("the cat sat on the mat", "animal"), ("a dog barked at the mailman", "animal"),
         ("stocks fell sharply on monday", "money"), ("the bank raised interest rates", "money"),
         ("birds sing in the morning", "animal"), ("the market rallied after the report", "money"),
         ("my cat sleeps all day", "animal"), ("bond yields climbed again", "money")]


def _csv(path, rows=TEXTS, header="text,label"):
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + "\n")
        for text, label in rows:
            f.write(f"{text},{label}\n")
    return str(path)


@pytest.mark.parametrize("content,needle", [
    ("", "empty file"),
    ("words,label\nhello,1\n", "no 'text' column"),
    ("text\nhello\n", "no 'label' column"),
    ("text,label\nhello,1\nbye\n", "row 2: no 'label'"),
    ("text,label\nhello,1,extra\n", r"row 1 \(line 2\): more fields"),
])
def test_data_errors_name_the_file_row_and_column(tmp_path, content, needle):
    path = tmp_path / "train.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(data.DataError, match=needle) as info:
        data.read_examples(str(path))
    assert str(path) in str(info.value)


def test_text_lines_for_pretrain(tmp_path):
    """pretrain's --input/--eval reader: stripped non-empty lines; bad bytes and empty files named."""
    good = tmp_path / "good.txt"
    good.write_text("\ufeffthe cat\n\n  sat  \n", encoding="utf-8")
    assert data.read_text_lines(str(good)) == ["the cat", "sat"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(data.DataError, match=r"--eval .*bad.txt: line 2 is not valid UTF-8 \(byte 0xe9"):
        data.read_text_lines(str(bad), "--eval")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"--input .*blank.txt: no text"):
        data.read_text_lines(str(blank))
    with pytest.raises(data.DataError, match=r"--input .*missing.txt: cannot read \(No such file"):
        data.read_text_lines(str(tmp_path / "missing.txt"))


def test_more_data_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 2}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl: line 2 is not valid UTF-8"):
        data.read_examples(str(bad))
    js = tmp_path / "x.jsonl"
    js.write_text('{"text": "ok", "label": 1}\n{"text": 3, "label": 1}\n')
    with pytest.raises(data.DataError, match=r"line 2, column 'text': expected a string"):
        data.read_examples(str(js))
    with pytest.raises(data.DataError, match="unknown file type .txt"):
        data.read_examples(str(tmp_path / "x.txt"))
    train = data.read_examples(_csv(tmp_path / "t.csv"))
    dev = data.read_examples(_csv(tmp_path / "d.csv", [("hello", "sports")]))
    with pytest.raises(data.DataError, match=r"d.csv: row 1, column 'label': 'sports' does not occur"):
        data.label_ids(dev, data.label_names(train), str(tmp_path / "d.csv"))
    assert data.label_names(data.read_examples(_csv(tmp_path / "n.csv", [("a", "10"), ("b", "9")]))) == ["9", "10"]


def test_finetune_writes_a_file_every_command_reads(tmp_path, tiny_h5, capsys):
    train = _csv(tmp_path / "train.csv")
    out = str(tmp_path / "tuned.h5")
    rc = cli(["finetune", "--weights", tiny_h5, "--train", train, "--eval", train, "--output", out,
              "--epochs", "2", "--batch-size", "4", "--learning-rate", "1e-3"])
    assert rc == 0
    loaded = weights.load(out)
    assert loaded.head["labels"] == ["animal", "money"] and loaded.head["kernel"].shape == (64, 2)
    enc = engine.load(out, fast=True)                                    # the encoder, as every command reads it
    assert enc(engine.Preprocessor(enc.vocab)(["hello"]))["pooled_output"].shape == (1, 64)
    log = [json.loads(line) for line in open(out + ".log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["epoch"] for r in log if "accuracy" in r] == [1, 2]
    assert not os.path.exists(out + ".ckpt.h5")
    pred = str(tmp_path / "pred.jsonl")
    assert cli(["predict", "--weights", out, "--input", train, "--output", pred]) == 0
    rows = [json.loads(line) for line in open(pred)]
    assert len(rows) == len(TEXTS) and set(rows[0]["probabilities"]) == {"animal", "money"}
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-6
    assert [(r["row"], r["text"]) for r in rows] == [(i, t) for i, (t, _) in enumerate(TEXTS, 1)]   # rows say which
    assert cli(["predict", "--weights", out, "--input", train, "--output", pred]) == 2             # exists
    assert capsys.readouterr().err.splitlines()[-1] == f"error: --output {pred}: exists; pass --force to replace it"
    assert cli(["predict", "--weights", tiny_h5, "--input", train, "--output", pred, "--force"]) == 2   # no head
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: --weights {tiny_h5}: has no classifier head (/head): "
                                               "use a file written by finetune")
    # the plot shows the training loss per step and the eval metrics per epoch
    series = run.plot_log(out + ".log.jsonl", str(tmp_path / "plot.png"))
    assert series["training loss"][0] == [1, 2, 3, 4]
    assert series["eval accuracy"][0] == series["eval mcc"][0] == [2, 4]        # the steps where each epoch ended
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.exists(out + ".loss.png")


def _weights_after(tmp_path, name, tiny_h5, train, **kwargs):
    out = str(tmp_path / name)
    finetune.finetune(tiny_h5, train, out, epochs=2, batch_size=3, learning_rate=1e-3, dropout=0.1, seed=3,
                      checkpoint_every=2, live=False, **kwargs)
    return weights.load(out)


def test_stopped_and_resumed_equals_straight_bit_for_bit(tmp_path, tiny_h5):
    """6 steps straight (dropout on: its generator's state is checkpointed too) against 4 steps, a stop,
    and --resume; the stop falls inside an epoch (3 steps per epoch)."""
    train = _csv(tmp_path / "train.csv")
    straight = _weights_after(tmp_path, "a.h5", tiny_h5, train)
    out = str(tmp_path / "b.h5")
    stopped = finetune.finetune(tiny_h5, train, out, epochs=2, batch_size=3, learning_rate=1e-3, dropout=0.1, seed=3,
                                checkpoint_every=2, max_steps=4, live=False)
    assert stopped["stopped_at_step"] == 4 and os.path.exists(out + ".ckpt.h5")
    with pytest.raises(FileExistsError, match="--resume"):
        finetune.finetune(tiny_h5, train, out, epochs=2, batch_size=3, live=False)
    resumed = _weights_after(tmp_path, "b.h5", tiny_h5, train, resume=True)
    start = weights.load(tiny_h5)
    trained = [p for p in straight.tensors if not p.startswith("mlm/")]    # fine-tuning leaves the MLM head
    moved = [p for p in trained if not np.array_equal(straight.tensors[p], start.tensors[p])]
    assert moved == trained, sorted(set(trained) - set(moved))             # every trained weight moved...
    for path, a in straight.tensors.items():
        np.testing.assert_array_equal(a, resumed.tensors[path], err_msg=path)   # ...and the same way twice
    np.testing.assert_array_equal(straight.head["kernel"], resumed.head["kernel"])


def test_a_non_finite_loss_stops_naming_the_step(tmp_path, tiny_h5):
    train = _csv(tmp_path / "train.csv")
    with pytest.raises(finetune.TrainingError, match=r"step \d+: the loss is (nan|inf)"):
        finetune.finetune(tiny_h5, train, str(tmp_path / "x.h5"), epochs=50, batch_size=4, learning_rate=1e30,
                          warmup_fraction=0.0, live=False)
    assert not os.path.exists(tmp_path / "x.h5")


def test_a_checkpoint_write_killed_midway_keeps_the_previous_one(tmp_path, tiny_h5, monkeypatch):
    train = _csv(tmp_path / "train.csv")
    out = str(tmp_path / "c.h5")
    finetune.finetune(tiny_h5, train, out, epochs=2, batch_size=3, max_steps=2, checkpoint_every=1, live=False)
    before = h5py.File(out + ".ckpt.h5", "r").attrs["iterations"]
    original = h5py.File.create_dataset
    calls = {"n": 0}

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)
    monkeypatch.setattr(h5py.File, "create_dataset", dying, raising=False)
    monkeypatch.setattr(h5py.Group, "create_dataset", dying)
    with pytest.raises(KeyboardInterrupt):
        finetune.finetune(tiny_h5, train, out, epochs=2, batch_size=3, resume=True, checkpoint_every=1, live=False)
    monkeypatch.undo()
    with h5py.File(out + ".ckpt.h5", "r") as f:
        assert f.attrs["iterations"] == before
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


# ---------------------------------------------------------------------------- pretrain

def test_bert_masking_follows_create_pretraining_data():
    from engine.train.pretrain import mask_batch
    rng = np.random.default_rng(0)
    B, S, V = 64, 128, 1000
    ids = rng.integers(10, V, (B, S)).astype(np.int32)
    mask = np.ones((B, S), np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    mask[1, 50:] = 0
    ids[1, 50:] = 0
    out = mask_batch(ids, mask, np.random.default_rng(1), V, mask_id=103, special_ids={0, 101, 102})
    assert out["masked_lm_positions"].shape == (B, 20)                     # at most 20 per 128
    w = out["masked_lm_weights"]
    assert w[0].sum() == 19 and w[1].sum() == round(48 * 0.15)            # 15% of the real, non-special tokens
    chosen = out["masked_lm_positions"][w > 0]
    rows = np.nonzero(w > 0)[0]
    assert not np.any(np.isin(ids[rows, chosen], [0, 101, 102])) and np.all(mask[rows, chosen] == 1)
    np.testing.assert_array_equal(out["masked_lm_ids"][w > 0], ids[rows, chosen])
    replaced = out["input_word_ids"][rows, chosen]
    share_mask = np.mean(replaced == 103)
    share_kept = np.mean(replaced == ids[rows, chosen])
    assert 0.75 < share_mask < 0.85 and 0.06 < share_kept < 0.14, (share_mask, share_kept)
    untouched = np.ones_like(mask, bool)
    untouched[rows, chosen] = False
    np.testing.assert_array_equal(out["input_word_ids"][untouched], ids[untouched])


def test_pretrain_writes_a_weights_file_and_resumes_bit_for_bit(tmp_path, tiny_h5):
    from engine.train import pretrain
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t for t, _ in TEXTS * 2) + "\n", encoding="utf-8")
    kwargs = dict(steps=6, batch_size=4, learning_rate=1e-3, seed=2, checkpoint_every=2, live=False)
    a = pretrain.pretrain(tiny_h5, str(corpus), str(tmp_path / "a.h5"), eval_path=str(corpus), **kwargs)
    assert a["steps"] == 6 and a["eval_loss_after"] < a["eval_loss_before"]
    pretrain.pretrain(tiny_h5, str(corpus), str(tmp_path / "b.h5"), max_steps=3, **kwargs)
    pretrain.pretrain(tiny_h5, str(corpus), str(tmp_path / "b.h5"), resume=True, **kwargs)
    wa, wb = weights.load(str(tmp_path / "a.h5")), weights.load(str(tmp_path / "b.h5"))
    assert wa.config.has_mlm
    for path, x in wa.tensors.items():
        np.testing.assert_array_equal(x, wb.tensors[path], err_msg=path)
    assert engine.load(str(tmp_path / "a.h5")).mlm({**engine.Preprocessor(wa.vocab)(["a [MASK] day"]),
                                                    "masked_lm_positions": [[2]]})["mlm_logits"].shape[-1] == 30522


def test_export_savedmodel_round_trips_and_verify_passes(tmp_path, tiny_h5):
    """The weights file back to a SavedModel with Model Garden's classes: extracting it gives the same
    bits, and verify (TF running the export vs the engine on the file) PASSes."""
    from engine.tf import export
    out = str(tmp_path / "exported")
    assert cli(["export-savedmodel", "--weights", tiny_h5, "--output", out]) == 0
    assert export.check_roundtrip(tiny_h5, out) == []
    assert cli(["verify", "--savedmodel", out, "--weights", tiny_h5, "--batch", "2", "--seq-length", "16"]) == 0
