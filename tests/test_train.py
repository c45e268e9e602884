"""sat train / sat eval: data formats, vocabulary, the regularizer, the feature cache, resume,
two processes, fine-tuning, and the metrics."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import EXAMPLES
from sat_cli.cli.main import cli
from sat_cli.errors import DataError, SatError
from sat_cli.evaluation.datasets import load_captions
from sat_cli.model.decoder import Decoder, DecoderConfig, attention_regularizer
from sat_cli.model.vocab import Vocab
from sat_cli.training import TrainConfig
from sat_cli.training.losses import caption_loss
from sat_cli.training.trainer import Trainer

CAPTIONS = {
    "chelsea": ["a cat lying on a red blanket", "a tabby cat resting", "the cat looks at the camera"],
    "coffee": ["a cup of coffee on a table", "a white cup with coffee", "coffee in a cup on a saucer"],
    "rocket": ["a rocket taking off", "a rocket launch with smoke", "the rocket lifts off the pad"],
    "astronaut": ["a woman in an orange suit", "an astronaut with a flag", "a smiling woman in a space suit"],
    "camera": ["a man with a camera", "a black and white photo of a man", "a man using a camera on a tripod"],
}


@pytest.fixture
def small_set(tmp_path):
    """Twelve photos (the examples, flipped and recoloured) with captions, as CSV with a split column."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = []
    for name, caps in CAPTIONS.items():
        src = next(EXAMPLES.glob(name + ".*"))
        im = Image.open(src).convert("RGB")
        variants = [im, im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        if name in ("chelsea", "coffee"):
            variants.append(im.rotate(8))
        for i, v in enumerate(variants):
            file = f"{name}_{i}.jpg"
            v.save(folder / file, quality=85)
            split = "val" if i == 1 and name in ("chelsea", "rocket") else "train"
            rows += [[file, c, split] for c in caps]
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split"])
        w.writerows(rows)
    return tmp_path / "caps.csv", folder


def tiny_config(small_set, tmp_path, **overrides):
    data, images = small_set
    base = dict(data=str(data), images=str(images), out=str(tmp_path / "run"), embed_dim=32, attention_dim=32,
                decoder_dim=48, dropout=0.3, epochs=2, batch_size=8, min_word_freq=1, lr=3e-3, meteor=False,
                cache_dir=str(tmp_path / "cache"), workers=0, quiet=True, val_max_len=12)
    base.update(overrides)
    return TrainConfig(**base)


# ------------------------------------------------------------------ data formats
def test_karpathy_json(tmp_path):
    data = {"images": [
        {"filepath": "sub", "filename": "a.png", "split": "train", "cocoid": 7,
         "sentences": [{"raw": "A Dog!", "tokens": ["a", "dog"]}]},
        {"filename": "b.png", "split": "restval", "sentences": [{"raw": "Two cats."}]},
        {"filename": "gone.png", "split": "val", "sentences": [{"raw": "x", "tokens": ["x"]}]},
    ]}
    (tmp_path / "sub").mkdir()
    shutil.copy(EXAMPLES / "coffee.png", tmp_path / "sub" / "a.png")
    shutil.copy(EXAMPLES / "coffee.png", tmp_path / "b.png")
    (tmp_path / "k.json").write_text(json.dumps(data))
    loaded = load_captions(tmp_path / "k.json")
    assert [(e.split, e.captions, e.image_id) for e in loaded.entries] == [
        ("train", [["a", "dog"]], 7), ("train", [["two", "cats"]], "b.png")]
    assert loaded.missing == [str(tmp_path / "gone.png")]


def test_coco_annotations(tmp_path):
    shutil.copy(EXAMPLES / "rocket.jpg", tmp_path / "000000000001.jpg")
    data = {"images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "missing.jpg"}],
            "annotations": [{"image_id": 1, "caption": "A rocket."}, {"image_id": 1, "caption": "Lift off"},
                            {"image_id": 2, "caption": "nothing"}]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(data))
    loaded = load_captions(tmp_path / "captions_val2017.json")
    assert len(loaded.entries) == 1 and loaded.entries[0].split == "val"
    assert loaded.entries[0].captions == [["a", "rocket"], ["lift", "off"]] and len(loaded.missing) == 1


def test_csv_with_and_without_header(tmp_path, small_set):
    loaded = load_captions(small_set[0], small_set[1])
    assert len(loaded.entries) == 12 and {e.split for e in loaded.entries} == {"train", "val"}
    assert all(len(e.captions) == 3 for e in loaded.entries)
    (tmp_path / "plain.csv").write_text("chelsea_0.jpg,a cat\nchelsea_0.jpg,another cat\nmissing.jpg,x\n")
    plain = load_captions(tmp_path / "plain.csv", small_set[1], val_fraction=0.0)
    assert [e.captions for e in plain.entries] == [[["a", "cat"], ["another", "cat"]]]
    assert plain.entries[0].split == "train" and len(plain.missing) == 1
    with pytest.raises(DataError, match="None of the"):
        load_captions(tmp_path / "plain.csv", tmp_path)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(DataError, match="not JSON"):
        load_captions(tmp_path / "bad.json")


def test_vocabulary():
    vocab = Vocab.build([["a", "dog"], ["a", "cat"], ["a", "dog", "runs"]], min_freq=2)
    assert vocab.itos == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]
    assert vocab.encode(["a", "cat", "dog", "x"], max_len=3) == [1, 4, 3, 5, 2]
    assert vocab.decode([4, 3, 5, 2, 4]) == ["a", "<unk>", "dog"]


# ------------------------------------------------------------------ model and loss
def test_attention_regularizer_by_hand():
    alphas = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [0.3, 0.7]]])  # (B=1, T=3, P=2)
    mask = torch.tensor([[True, True, False]])  # the third step is padding
    # coverage = (1.5, 0.5): (1 - 1.5)^2 + (1 - 0.5)^2 = 0.5
    assert float(attention_regularizer(alphas, mask)) == pytest.approx(0.5)
    assert float(attention_regularizer(torch.full((2, 4, 4), 0.25), torch.ones(2, 4, dtype=torch.bool))) == 0.0


def test_shrinking_batch_forward_matches_padded_forward():
    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(vocab_size=15, encoder_dim=8, embed_dim=8, attention_dim=8, decoder_dim=8,
                                dropout=0.0))
    feats = torch.randn(3, 5, 8)
    caps = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 10, 2, 0, 0], [1, 4, 2, 0, 0, 0]])
    lengths = [6, 4, 3]
    fast_logits, fast_alphas, _ = dec(feats, caps, lengths)  # only the 5 + 3 + 2 predicted positions
    full_logits, full_alphas, _ = dec(feats, caps)  # every position, padding included
    assert fast_logits.shape == (10, 15) and full_logits.shape == (15, 15)
    full_logits = full_logits.view(3, 5, 15)
    valid = torch.cat([full_logits[row, : n - 1] for row, n in enumerate(lengths)])
    torch.testing.assert_close(fast_logits, valid)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(fast_alphas[row, : n - 1], full_alphas[row, : n - 1])
        assert fast_alphas[row, n - 1 :].abs().sum() == 0
    # and the recurrence is the one beam search uses, step by step
    h, c, proj = dec.init_state(feats[:1])
    h, c = h.unsqueeze(1), c.unsqueeze(1)
    for t in range(5):
        step_logits, h, c, _ = dec.step(feats[:1], proj, caps[:1, t : t + 1], h, c)
        torch.testing.assert_close(step_logits[0, 0], full_logits[0, t])
    loss, ce = caption_loss(fast_logits, fast_alphas, caps, torch.tensor(lengths), 1.0, 0.0, 0)
    mask = caps[:, 1:] != 0
    expected = torch.nn.functional.cross_entropy(full_logits[mask], caps[:, 1:][mask])
    torch.testing.assert_close(ce, expected)
    assert float(loss) > float(ce)


# ------------------------------------------------------------------ hard attention
def one_hot_grid(B=2, P=6):
    """Features whose cells are distinct one-hot vectors, so a read cell can be recognised."""
    return torch.eye(P).unsqueeze(0).repeat(B, 1, 1)


def test_sampled_rows_read_one_cell_and_its_log_probability():
    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(vocab_size=10, encoder_dim=6, embed_dim=4, attention_dim=5, decoder_dim=7,
                                dropout=0.0, attention="hard"))
    feats = one_hot_grid()
    h, c, proj = dec.init_state(feats)
    inputs = []
    hook = dec.lstm.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    sample = torch.tensor([True, False])
    _, _, alpha, loc_logp = dec.advance(feats, proj, dec.embedding(torch.tensor([[1], [1]])),
                                        h.unsqueeze(1), c.unsqueeze(1), sample)
    hook.remove()
    gate = torch.sigmoid(dec.f_beta(h))  # (B, C)
    read = inputs[0][:, 4:] / gate  # the context the LSTM saw, before the gate
    cell = int(read[0].argmax())
    torch.testing.assert_close(read[0], torch.eye(6)[cell])  # sampled row: one cell
    torch.testing.assert_close(read[1], alpha[1, 0])  # other row: the expectation (alpha . one-hots)
    torch.testing.assert_close(loc_logp[0, 0], alpha[0, 0, cell].log())


def test_hard_attention_loss_by_hand():
    from sat_cli.training.losses import hard_attention_loss

    logits = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5]]))  # 3 predicted words, V = 2
    captions = torch.tensor([[9, 0, 1], [9, 1, 5]])  # row 0: targets 0, 1; row 1: target 1 then pad (5)
    alphas = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    loc_logp = torch.log(torch.tensor([[0.5, 1.0], [0.5, 0.5]]))
    sampled = torch.tensor([True, False])
    term, rewards = hard_attention_loss(logits, alphas, loc_logp, sampled, captions, pad=5, baseline=-1.0,
                                        reinforce=2.0, entropy=0.1)
    reward0 = (torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.75))) / 2  # mean log-likelihood per word
    torch.testing.assert_close(rewards, reward0.view(1))
    policy = -(reward0 + 1.0) * (loc_logp[0, 0] + loc_logp[0, 1])
    entropy = torch.log(torch.tensor(2.0))  # the first map of row 0; its second map has entropy 0
    torch.testing.assert_close(term, (2.0 * policy - 0.1 * entropy) / 3)


@pytest.mark.parametrize("reinforce", [0.0, 1.0])
def test_only_reinforce_trains_the_attention_of_sampled_captions(reinforce):
    """When every caption reads sampled cells, the word loss cannot reach the attention MLP (the
    choice is discrete): its gradient comes from the REINFORCE term alone."""
    from sat_cli.training.losses import hard_attention_loss

    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(vocab_size=10, encoder_dim=6, embed_dim=4, attention_dim=5, decoder_dim=7,
                                dropout=0.0, attention="hard"))
    feats = torch.randn(3, 6, 6)
    caps = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 8, 2, 0], [1, 9, 2, 0, 0]])
    lengths = torch.tensor([5, 4, 3])
    sampled = torch.ones(3, dtype=torch.bool)
    logits, alphas, loc_logp = dec(feats, caps, lengths.tolist(), sampled)
    loss, _ = caption_loss(logits, alphas, caps, lengths, 0.0, 0.0, 0)
    term, _ = hard_attention_loss(logits, alphas, loc_logp, sampled, caps, 0, None, reinforce, 0.0)
    (loss + term).backward()
    grad = dec.attention.full_att.weight.grad
    assert (grad is not None and grad.abs().sum() > 0) == (reinforce > 0)
    assert dec.fc.weight.grad.abs().sum() > 0


def test_hard_attention_training_writes_a_hard_model(small_set, tmp_path):
    summary = Trainer(tiny_config(small_set, tmp_path, attention="hard", epochs=2, hard_inference="argmax"))
    summary.setup()
    result = summary.run()
    assert result["hard_baseline"] < 0  # a running mean of log-likelihoods
    config = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert config["decoder"]["attention"] == "hard" and config["decoder"]["hard_inference"] == "argmax"
    db = tmp_path / "h.db"
    run = CliRunner().invoke(cli, ["caption", str(small_set[1]), "--model", str(tmp_path / "run" / "last"),
                                   "--db", str(db), "-q"], catch_exceptions=False)
    assert run.exit_code == 0
    import sqlite_utils

    maps = list(sqlite_utils.Database(db).query("SELECT words, grid_h, grid_w FROM attention_maps"))
    assert any(m["words"] >= 1 for m in maps)  # stored like soft attention: a map per word


def test_zero_initial_state_leaves_vision_to_the_attention(small_set, tmp_path):
    """--init-state zero: no projection of the mean feature; the first state is zero, and the
    checkpoint records it (it loads back strictly)."""
    from sat_cli.model.checkpoint import load_checkpoint

    dec = Decoder(DecoderConfig(vocab_size=10, encoder_dim=6, embed_dim=4, attention_dim=5, decoder_dim=7,
                                init_state="zero"))
    assert not hasattr(dec, "init_h")
    h, c, _ = dec.init_state(torch.randn(2, 3, 6))
    assert h.abs().sum() == 0 and c.abs().sum() == 0
    trainer = Trainer(tiny_config(small_set, tmp_path, init_state="zero", epochs=1))
    trainer.setup()
    trainer.run()
    loaded = load_checkpoint(tmp_path / "run" / "last")
    assert loaded.decoder.config.init_state == "zero" and not hasattr(loaded.decoder, "init_h")


def test_mosaic_features_put_the_captions_photo_in_one_quadrant():
    from sat_cli.training.data import mosaic_features

    n, side, C = 10, 3, 2
    tiles = torch.zeros(n, side * side, C)
    for i in range(n):
        tiles[i, :, 0] = i  # channel 0: which image
        tiles[i, :, 1] = torch.arange(side * side)  # channel 1: the cell inside the tile
    own = torch.tensor([7, 2, 7])
    filled = mosaic_features(tiles, own, fill=9).view(3, 2 * side, 2 * side, C)
    owners = [sorted({int(filled[m, r * side, c * side, 0]) for r in (0, 1) for c in (0, 1)}) for m in range(3)]
    assert owners == [[7, 9], [2, 9], [7, 9]]  # the caption's photo and three blank tiles
    out = mosaic_features(tiles, own, torch.Generator().manual_seed(0)).view(3, 2 * side, 2 * side, C)
    for m in range(3):
        quadrants = [out[m, r * side : (r + 1) * side, c * side : (c + 1) * side] for r in (0, 1) for c in (0, 1)]
        owners = [int(q[0, 0, 0]) for q in quadrants]
        assert int(own[m]) in owners
        for q in quadrants:  # each quadrant is one whole tile, cells in their own order
            assert (q[..., 0] == q[0, 0, 0]).all()
            assert q[..., 1].flatten().tolist() == list(range(side * side))


def test_mosaic_training_builds_half_size_tiles_and_trains(small_set, tmp_path):
    trainer = Trainer(tiny_config(small_set, tmp_path, mosaic=0.5, image_size=256, epochs=1))
    trainer.setup()
    assert trainer.train_feats.shape[1] == 64 and trainer.tile_feats.shape[1] == 16  # 8x8 and 4x4 grids
    assert len(trainer.tile_feats) == len(trainer.train_entries) + 1  # and a blank tile
    assert trainer.run()["epoch"] == 1
    blank = Trainer(tiny_config(small_set, tmp_path, mosaic=1.0, mosaic_fill="blank", image_size=256, epochs=1,
                                out=str(tmp_path / "blank")))
    blank.setup()
    assert blank.run()["epoch"] == 1
    with pytest.raises(Exception, match="halves"):  # 224 px: a 7x7 grid has no half
        Trainer(tiny_config(small_set, tmp_path, mosaic=0.5, out=str(tmp_path / "odd"))).setup()


# ------------------------------------------------------------------ training
def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_training_learns_and_writes_checkpoints_and_metrics(small_set, tmp_path):
    result = CliRunner().invoke(cli, [
        "train", "--data", str(small_set[0]), "--images", str(small_set[1]), "--out", str(tmp_path / "run"),
        "--embed-dim", "32", "--attention-dim", "32", "--decoder-dim", "48", "--epochs", "6", "--batch-size", "8",
        "--min-word-freq", "1", "--lr", "3e-3", "--no-meteor", "--cache-dir", str(tmp_path / "cache"),
        "--workers", "0", "--val-max-len", "12"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(rows[0]) and "METEOR" not in rows[0]
    best = max(rows, key=lambda r: r["CIDEr"])
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert config["training"]["best_epoch"] == best["epoch"] and config["encoder"]["weights"] == "pretrained"
    assert "Best CIDEr" in result.stderr and "metrics.jsonl" in result.stderr
    db = tmp_path / "o.db"
    cap = CliRunner().invoke(cli, ["caption", str(small_set[1]), "--model", str(tmp_path / "run" / "best"),
                                   "--db", str(db), "--workers", "0", "-q", "--print"])
    assert cap.exit_code == 0 and len(cap.stdout.strip().split("\n")) == 12


def test_feature_cache_is_reused(small_set, tmp_path):
    from sat_cli.features import FeatureCache
    from sat_cli.model.encoders import EncoderOptions, create_encoder

    encoder = create_encoder("timm:tf_efficientnet_lite0")
    calls = []
    encoder.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    paths = sorted(str(p) for p in small_set[1].iterdir())
    cache = FeatureCache(encoder, tmp_path / "cache")
    first = cache.build(paths, torch.device("cpu"), "fp32", workers=0, quiet=True)
    assert sum(calls) == 12 and all(first.values())
    calls.clear()
    second = FeatureCache(create_encoder("timm:tf_efficientnet_lite0"), tmp_path / "cache")
    second.encoder.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    assert second.dir == cache.dir
    assert second.build(paths, torch.device("cpu"), "fp32", workers=0, quiet=True) == first and calls == []
    other = FeatureCache(create_encoder("timm:tf_efficientnet_lite0", EncoderOptions(grid=3)), tmp_path / "cache")
    assert other.dir != cache.dir  # another grid, another key


def test_feature_cache_keeps_float32_where_float16_overflows(tmp_path):
    import numpy as np

    from sat_cli.features import FeatureCache

    cache = FeatureCache.__new__(FeatureCache)
    cache.dir = tmp_path
    cache.save("ab" * 32, np.array([[1.5, 2.0]], dtype=np.float32))
    cache.save("cd" * 32, np.array([[1e6, 2.0]], dtype=np.float32))
    assert cache.load("ab" * 32).dtype == np.float16
    big = cache.load("cd" * 32)
    assert big.dtype == np.float32 and big[0, 0] == 1e6


class StopAfter:
    """Stands in for the Ctrl-C flag: 'pressed' after a number of training steps."""

    def __init__(self, steps: int):
        self.steps = steps
        self.reads = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    @property
    def requested(self) -> bool:
        self.reads += 1
        return self.reads > self.steps


def test_stop_and_resume_continue_exactly(small_set, tmp_path):
    straight = Trainer(tiny_config(small_set, tmp_path, out=str(tmp_path / "straight"), epochs=3))
    straight.setup()
    straight.run()

    cut = Trainer(tiny_config(small_set, tmp_path, out=str(tmp_path / "cut"), epochs=3))
    cut.setup()
    summary = cut.run(stop=StopAfter(7))  # mid-way through the second epoch (4 steps an epoch)
    assert summary["stopped"] and summary["epoch"] == 1 and summary["step"] == 3
    resumed = Trainer(tiny_config(small_set, tmp_path, out=str(tmp_path / "cut"), epochs=3), resume=True)
    resumed.setup()
    assert resumed.state["step"] == 3
    resumed.run()
    a, b = weights(tmp_path / "straight" / "last"), weights(tmp_path / "cut" / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}  # noqa: E731
    assert [drop(r) for r in ma] == [drop(r) for r in mb]


def test_two_processes_with_torchrun_end_identical(small_set, tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "sat_cli", "train",  # a free port
           "--data", str(small_set[0]), "--images", str(small_set[1]), "--out", str(out), "--embed-dim", "32",
           "--attention-dim", "32", "--decoder-dim", "48", "--epochs", "2", "--batch-size", "4",
           "--min-word-freq", "1", "--no-meteor", "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "-q",
           "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    checksums = json.loads((out / "ranks.json").read_text())
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "CIDEr" in rows[-1]
    assert (out / "best" / "model.safetensors").exists()


def test_fine_tuning_trains_the_encoder_and_stores_it(small_set, tmp_path):
    cfg = tiny_config(small_set, tmp_path, epochs=2, fine_tune_encoder=2, encoder_lr=1e-3)
    trainer = Trainer(cfg)
    trainer.setup()
    before = {k: v.clone() for k, v in trainer.encoder.state_dict().items()}
    trainer.run()
    after = trainer.encoder.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert any("conv" in k for k in changed)
    assert not any("running_mean" in k for k in changed)  # batch norm statistics stay frozen
    config = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert config["encoder"]["weights"] == "checkpoint"
    assert any(k.startswith("encoder.") for k in weights(tmp_path / "run" / "last"))
    # a fine-tuned teacher reads other features than the pretrained encoder, the same as a student
    # that starts from it
    tuned = str(tmp_path / "run" / "last")
    with pytest.raises(SatError, match="encoder weights"):
        Trainer(tiny_config(small_set, tmp_path, out=str(tmp_path / "s1"), distill_from=tuned)).setup()
    student = Trainer(tiny_config(small_set, tmp_path, out=str(tmp_path / "s2"), distill_from=tuned, init_from=tuned))
    student.setup()
    assert student.teacher is not None


# ------------------------------------------------------------------ metrics and eval
def test_metrics_on_a_known_tiny_case(monkeypatch):
    from sat_cli.evaluation import metrics

    refs = {1: ["a dog sits on grass"], 2: ["a red ball"]}
    same = metrics.score_captions(refs, {1: "a dog sits on grass", 2: "a red ball"}, meteor=False)
    assert same["BLEU-1"] == pytest.approx(100.0, abs=1e-3) and same["ROUGE-L"] == pytest.approx(100.0, abs=1e-3)
    # hypothesis "a dog runs" against "a dog sits on grass": 2 of 3 unigrams match, brevity
    # penalty exp(1 - 5/3): BLEU-1 = 2/3 * 0.5134 = 34.23
    one = metrics.score_captions({1: ["a dog sits on grass"]}, {1: "a dog runs"}, meteor=False)
    assert one["BLEU-1"] == pytest.approx(100 * 2 / 3 * 2.718281828 ** (1 - 5 / 3), abs=0.01)
    none = metrics.score_captions({1: ["a dog sits on grass"], 2: ["x y z"]}, {1: "red blue", 2: "q"}, meteor=False)
    assert none["BLEU-1"] < 1e-6 and none["CIDEr"] == 0.0
    warnings = []
    monkeypatch.setattr(metrics, "have_java", lambda: False)
    nojava = metrics.score_captions(refs, {1: "a dog sits on grass", 2: "a red ball"}, meteor=True,
                                    warn=warnings.append)
    assert "METEOR" not in nojava and "Java" in warnings[0] and nojava["BLEU-1"] == pytest.approx(100.0, abs=1e-3)


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_with_java():
    from sat_cli.evaluation.metrics import score_captions

    out = score_captions({1: ["a dog sits on the grass"], 2: ["a red ball"]},
                         {1: "a dog sits on the grass", 2: "a blue cube"})
    assert 0 < out["METEOR"] < 100


def test_eval_model_and_database(small_set, tmp_path):
    trainer = Trainer(tiny_config(small_set, tmp_path, epochs=3))
    trainer.setup()
    trainer.run()
    best = tmp_path / "run" / "best"
    res = CliRunner().invoke(cli, ["eval", "--model", str(best), "--data", str(small_set[0]), "--images",
                                   str(small_set[1]), "--split", "val", "--no-meteor", "--json",
                                   "--cache-dir", str(tmp_path / "cache"), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    model_scores = json.loads(res.stdout)
    assert model_scores["images"] == 2 and "CIDEr" in model_scores
    db = tmp_path / "val.db"
    val_images = [str(small_set[1] / "chelsea_1.jpg"), str(small_set[1] / "rocket_1.jpg")]
    cap = CliRunner().invoke(cli, ["caption", *val_images, "--model", str(best), "--db", str(db), "--workers", "0",
                                   "-q"])
    assert cap.exit_code == 0
    res = CliRunner().invoke(cli, ["eval", str(db), "--references", str(small_set[0]), "--images",
                                   str(small_set[1]), "--no-meteor", "--json"], catch_exceptions=False)
    db_scores = json.loads(res.stdout)
    assert db_scores["images"] == 2
    for metric in ("BLEU-4", "CIDEr", "ROUGE-L"):  # same model, same beam, same images: same scores
        assert db_scores[metric] == pytest.approx(model_scores[metric], abs=1e-3)
    table = CliRunner().invoke(cli, ["eval", str(db), "--references", str(small_set[0]), "--images",
                                     str(small_set[1]), "--no-meteor"])
    assert "CIDEr" in table.stderr


def test_cider_d_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    from sat_cli.evaluation.cider import CiderD

    refs = {0: ["a dog runs on the grass", "a brown dog running", "dog on grass"],
            1: ["a man rides a red bike", "a cyclist on a road", "man riding bicycle"],
            2: ["two cats sleep on a sofa", "cats on a couch", "two cats sleeping"]}
    hyps = {0: "a dog on the grass", 1: "a man on a red bike", 2: "a cat on a couch"}
    reference, per_image = Cider().compute_score({k: v for k, v in refs.items()}, {k: [v] for k, v in hyps.items()})
    mine = CiderD([[r.split() for r in refs[k]] for k in range(3)])
    scores = [mine.score(hyps[k].split(), k) for k in range(3)]
    assert scores == pytest.approx(list(per_image), rel=1e-9)
    assert sum(scores) / 3 == pytest.approx(reference, rel=1e-9)


class CatReward:
    """A reward the policy gradient must learn: the share of sampled words that are 'cat'."""

    def score(self, words, image):
        return sum(w == "cat" for w in words) / max(1, len(words))


def greedy_share(trainer, word: str = "cat") -> float:
    """The share of ``word`` among the words of the trainer's greedy captions of its training photos."""
    from sat_cli.model.beam import DecodeSettings, beam_search

    v = trainer.vocab
    trainer.decoder.eval()
    out = beam_search(trainer.decoder, trainer.train_feats.float(), DecodeSettings(beam_size=1, max_len=20),
                      start=v.start, end=v.end, blocked=(v.pad, v.start, v.unk))
    words = [w for h in out for w in v.decode(h[0].tokens)]
    return sum(w == word for w in words) / max(1, len(words))


def test_self_critical_training_follows_the_reward(small_set, tmp_path):
    base = dict(lr=5e-3, early_stop=20, scst_lr=1e-2, scst_samples=5, batch_size=4)
    xe = Trainer(tiny_config(small_set, tmp_path, out=str(tmp_path / "xe"), epochs=4, **base))
    xe.setup()
    xe.run()
    trainer = Trainer(tiny_config(small_set, tmp_path, epochs=12, scst_from=5, **base))
    trainer.setup()
    trainer.cider = CatReward()
    summary = trainer.run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("train_loss" in r, "train_reward" in r) for r in rows] == [(True, False)] * 4 + [(False, True)] * 8
    assert rows[4]["lr"] == 1e-2 and summary["scst"] is True
    rewards = [r["train_reward"] for r in rows[4:]]
    assert rewards[-1] > 3 * rewards[0]
    assert greedy_share(trainer) > greedy_share(xe) + 0.2  # the greedy captions moved too
    assert "CIDEr" in rows[-1]  # validation still scores with pycocoevalcap
    # warm start: a new run from that checkpoint keeps its vocabulary and sizes
    again = Trainer(tiny_config(small_set, tmp_path, out=str(tmp_path / "again"), epochs=1,
                                init_from=str(tmp_path / "run" / "last"), embed_dim=8, min_word_freq=3))
    again.setup()
    assert again.vocab.itos == trainer.vocab.itos and again.decoder.config.embed_dim == 32
    for a, b in zip(again.decoder.state_dict().values(), trainer.decoder.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_distillation_teaches_the_students_words_from_the_teacher(small_set, tmp_path):
    """--distill-from: a teacher that calls the cat a kitten (trained on captions that say so)
    teaches a student trained on the human captions, which never say kitten, to say it; without
    distillation the same student never does. A teacher reading other features is refused."""
    data, images = small_set
    kitten = tmp_path / "kitten.csv"
    kitten.write_text(data.read_text().replace("cat", "kitten"))
    base = dict(lr=5e-3, early_stop=20, batch_size=4, attention_lambda=0.0)
    teacher = Trainer(tiny_config((kitten, images), tmp_path, out=str(tmp_path / "teacher"), epochs=6, **base))
    teacher.setup()
    teacher.run()

    def student(name, **options):
        t = Trainer(tiny_config(small_set, tmp_path, out=str(tmp_path / name), epochs=6,
                                distill_from=str(tmp_path / "teacher" / "last"), **base, **options))
        t.setup()
        t.run()
        return t

    taught, alone = student("taught", distill_weight=1.0), student("alone", distill_weight=0.0)
    assert taught.vocab.itos == teacher.vocab.itos == alone.vocab.itos  # the student takes the teacher's words
    assert "cat" not in taught.vocab.itos and greedy_share(teacher, "kitten") > 0.05
    shares = greedy_share(taught, "kitten"), greedy_share(alone, "kitten")
    assert shares[0] > 0.0 and shares[1] == 0.0, shares  # (6 epochs: 0.048 and 0)
    with pytest.raises(SatError, match="image size"):
        Trainer(tiny_config(small_set, tmp_path, out=str(tmp_path / "other"), image_size=160,
                            distill_from=str(tmp_path / "teacher" / "last"))).setup()


def test_cli_resume_extends_a_finished_run(small_set, tmp_path):
    args = ["train", "--data", str(small_set[0]), "--images", str(small_set[1]), "--out", str(tmp_path / "r"),
            "--embed-dim", "16", "--attention-dim", "16", "--decoder-dim", "16", "--epochs", "1",
            "--min-word-freq", "1", "--no-meteor", "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "-q"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    again = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "r"), "--epochs", "2", "-q"])
    assert again.exit_code == 0, again.output
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    saved = json.loads((tmp_path / "r" / "train_config.json").read_text())
    assert saved["decoder_dim"] == 16
    bad = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path)])
    assert bad.exit_code == 2 and "not a sat run folder" in bad.stderr
    nodata = CliRunner().invoke(cli, ["train"])
    assert nodata.exit_code == 2 and "--data is required" in nodata.stderr


def test_self_critical_reward_is_the_sampled_images_cider_d(small_set, tmp_path, monkeypatch):
    """SCST with the real CIDEr-D: each sampled caption is scored against the references of the
    image whose features were sampled (its file's captions in the CSV), not another image's."""
    import csv
    from pathlib import Path

    import sat_cli.training.scst as scst
    from sat_cli.evaluation.cider import CiderD
    from sat_cli.model.vocab import tokenize

    sampled, calls = [], []
    real_sample, real_score = scst.sample_captions, CiderD.score

    def recording_sample(decoder, feats, *args, **kwargs):
        sampled.append(feats.detach().cpu().clone())
        return real_sample(decoder, feats, *args, **kwargs)

    def recording_score(self, words, image):
        value = real_score(self, words, image)
        calls.append((len(sampled) - 1, list(words), image, value))
        return value

    monkeypatch.setattr(scst, "sample_captions", recording_sample)
    monkeypatch.setattr(CiderD, "score", recording_score)
    trainer = Trainer(tiny_config(small_set, tmp_path, epochs=2, scst_from=2, lr=5e-3, scst_samples=3, batch_size=4))
    trainer.setup()
    trainer.run()
    assert calls
    by_file = {}
    with open(small_set[0], newline="") as f:
        for row in csv.DictReader(f):
            by_file.setdefault(row["image"], []).append([*tokenize(row["caption"]), "<end>"])
    files = [Path(e.path).name for e in trainer.train_entries]
    # an independent CIDEr-D over the CSV's references, in the trainer's image order
    independent = CiderD([by_file[name] for name in files])
    per_batch = {}
    for batch, words, image, value in calls:
        per_batch.setdefault(batch, []).append(image)
        assert real_score(independent, words, image) == pytest.approx(value, abs=1e-9)
    for batch, images in per_batch.items():  # the image scored is the image whose features were sampled
        seen = list(dict.fromkeys(images))
        assert len(seen) == len(sampled[batch])
        for row, image in enumerate(seen):
            torch.testing.assert_close(sampled[batch][row], trainer.train_feats[image].float())
    # the check above would catch a shuffled pairing: a different image's references score differently
    shuffled = [(words, (image + 1) % len(files), value) for _, words, image, value in calls]
    assert any(real_score(independent, w, i) != pytest.approx(v, abs=1e-9) for w, i, v in shuffled)
