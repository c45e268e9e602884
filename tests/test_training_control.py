"""Training control driven by a scripted sequence of validation scores: the plateau schedule (the
encoder's learning rate following the decoder's), early stop, and --metric choosing the best epoch;
--seed on a tiny model."""

from types import SimpleNamespace

import pytest
import torch

from sat_cli.training.schedule import end_epoch, new_state, plateau, should_stop
from test_train import small_set, tiny_config  # noqa: F401 (small_set is a fixture)


def drive(scores, **cfg):
    cfg = SimpleNamespace(**{"lr_decay": 0.5, "lr_patience": 1, "early_stop": 3, "metric": "CIDEr", **cfg})
    w, e = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    decoder_opt, encoder_opt = torch.optim.Adam([w], lr=1.0), torch.optim.Adam([e], lr=0.1)
    scheduler, state, trace = plateau(decoder_opt, cfg), new_state(), []
    for epoch, score in enumerate(scores):
        improved = end_epoch(state, scheduler, decoder_opt, encoder_opt, cfg, epoch, score)
        trace.append((improved, decoder_opt.param_groups[0]["lr"], encoder_opt.param_groups[0]["lr"],
                      should_stop(state, cfg)))
    return state, trace


def test_plateau_decays_both_learning_rates_after_patience_and_early_stop_follows():
    scores = [{"CIDEr": s} for s in (10, 20, 20, 19, 25, 24, 24, 24)]
    state, trace = drive(scores)
    assert [t[0] for t in trace] == [True, True, False, False, True, False, False, False]
    # patience 1: the second epoch in a row without improvement halves the rates, the encoder's too
    assert [t[1] for t in trace] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert [t[2] for t in trace] == [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025]
    assert [t[3] for t in trace] == [False] * 7 + [True]  # early_stop 3: the third bad epoch in a row stops
    assert state["best"] == 25 and state["best_epoch"] == 5


def test_metric_chooses_the_best_epoch():
    scores = [{"CIDEr": 10, "BLEU-4": 30}, {"CIDEr": 20, "BLEU-4": 25}, {"CIDEr": 15, "BLEU-4": 35}]
    by_cider, _ = drive(scores, metric="CIDEr")
    by_bleu, _ = drive(scores, metric="BLEU-4")
    assert (by_cider["best_epoch"], by_cider["best_metrics"]) == (2, scores[1])
    assert (by_bleu["best_epoch"], by_bleu["best_metrics"]) == (3, scores[2])


def test_same_seed_same_weights_other_seed_other_weights(small_set, tmp_path):
    """--seed: one epoch of training twice with one seed gives the same weights; another seed differs."""
    from sat_cli.training.trainer import Trainer

    def weights(seed, name):
        t = Trainer(tiny_config(small_set, tmp_path, out=str(tmp_path / name), epochs=1, seed=seed))
        t.setup()
        t.run()
        return t.decoder.state_dict()

    a, b, c = weights(3, "a"), weights(3, "b"), weights(4, "c")
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_label_smoothing_value_and_that_the_options_reach_the_loss_and_the_clip(small_set, tmp_path, monkeypatch):
    """--label-smoothing: the loss equals the smoothed cross-entropy worked by hand, and the value
    given to the trainer is the one used; --grad-clip: every step clips at the value given."""
    import math

    import torch.nn.utils

    import sat_cli.training.loop as loop
    from sat_cli.training.losses import caption_loss
    from sat_cli.training.trainer import Trainer

    # one predicted word, vocabulary of 3, target 1: (1 - e) * -log p1 + e * mean(-log p)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    captions = torch.tensor([[0, 1]])
    _, ce = caption_loss(logits, torch.zeros(1, 1, 4), captions, None, 0.0, 0.3, pad=9)
    logp = [x - math.log(sum(math.exp(y) for y in (2.0, 0.0, -1.0))) for x in (2.0, 0.0, -1.0)]
    assert float(ce) == pytest.approx(0.7 * -logp[1] + 0.3 * -sum(logp) / 3, rel=1e-6)

    seen = {"smoothing": set(), "clip": set()}
    real_loss, real_clip = loop.caption_loss, torch.nn.utils.clip_grad_norm_

    def loss(*args):
        seen["smoothing"].add(args[5])
        return real_loss(*args)

    def clip(params, max_norm, *args, **kwargs):
        seen["clip"].add(max_norm)
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(loop, "caption_loss", loss)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    t = Trainer(tiny_config(small_set, tmp_path, epochs=1, label_smoothing=0.15, grad_clip=0.7))
    t.setup()
    t.run()
    assert seen == {"smoothing": {0.15}, "clip": {0.7}}
