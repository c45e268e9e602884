"""Training control driven by a scripted sequence of validation scores: the plateau schedule (the
encoder's learning rate following the decoder's), early stop, and --metric choosing the best epoch;
--seed on a tiny model."""

from types import SimpleNamespace

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
