"""Batched beam search: greedy at beam 1, batch-independent, exact on a tiny vocabulary."""

import itertools
import math

import numpy as np
import pytest
import torch

from sat_cli.model.beam import DecodeSettings, beam_search
from sat_cli.model.decoder import Decoder, DecoderConfig, InferenceStep

START, END = 1, 2
BLOCKED = (0, 1, 3)  # <pad>, <start>, <unk>


def make_decoder(vocab_size=20, encoder_dim=24, seed=0, end_bias=0.0, dims=32, **config):
    torch.manual_seed(seed)
    dec = Decoder(DecoderConfig(vocab_size=vocab_size, encoder_dim=encoder_dim, embed_dim=dims,
                                attention_dim=dims, decoder_dim=dims, dropout=0.5, **config)).eval()
    with torch.no_grad():
        dec.fc.weight.mul_(8.0)  # peaky distributions, like a trained model
        dec.fc.bias[END] += end_bias
    return dec


def make_features(n, P=9, C=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, P, C, generator=g).relu()


def greedy(decoder, features, max_len):
    """Reference greedy decoding, one image, one word at a time."""
    features = decoder.prepare(features)
    h, c, proj = decoder.init_state(features)
    h, c = h.unsqueeze(1), c.unsqueeze(1)
    token, words, logprob = START, [], 0.0
    with torch.no_grad():
        for _ in range(max_len):
            logits, h, c, _ = decoder.step(features, proj, torch.tensor([[token]]), h, c)
            logp = logits[0, 0].log_softmax(-1)
            logp[list(BLOCKED)] = -math.inf
            token = int(logp.argmax())
            logprob += float(logp[token])
            if token == END:
                return words, logprob, True
            words.append(token)
    return words, logprob, False


def sequence_logprob(decoder, features, seq):
    """log P(seq) under the model with the blocked tokens masked, by teacher forcing."""
    features = decoder.prepare(features)
    h, c, proj = decoder.init_state(features)
    h, c = h.unsqueeze(1), c.unsqueeze(1)
    total, prev = 0.0, START
    with torch.no_grad():
        for token in seq:
            logits, h, c, _ = decoder.step(features, proj, torch.tensor([[prev]]), h, c)
            logp = logits[0, 0].log_softmax(-1)
            logp[list(BLOCKED)] = -math.inf
            total += float(logp[token])
            prev = token
    return total


@pytest.mark.parametrize("config", [{}, {"grid_dim": 8}])  # the grid as it is, or projected to 8 channels
def test_beam_one_equals_greedy(config):
    dec = make_decoder(end_bias=2.0, **config)
    feats = make_features(8)
    out = beam_search(dec, feats, DecodeSettings(beam_size=1, max_len=15), start=START, end=END, blocked=BLOCKED)
    finished = 0
    for i in range(8):
        words, logprob, done = greedy(dec, feats[i : i + 1], 15)
        hyp = out[i][0]
        assert hyp.tokens == words
        assert hyp.finished == done
        assert hyp.logprob == pytest.approx(logprob, abs=1e-4)
        finished += done
    assert 0 < finished  # the comparison covered finished captions


@pytest.mark.parametrize("settings", [
    DecodeSettings(beam_size=3, max_len=12),
    DecodeSettings(beam_size=5, n_best=5, max_len=10, length_penalty=0.7, no_repeat_ngram=2),
])
def test_batched_equals_one_image_at_a_time(settings):
    dec = make_decoder(end_bias=1.0)
    feats = make_features(7)
    batched = beam_search(dec, feats, settings, start=START, end=END, blocked=BLOCKED)
    lengths = set()
    for i in range(7):
        alone = beam_search(dec, feats[i : i + 1], settings, start=START, end=END, blocked=BLOCKED)[0]
        assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
        assert [h.finished for h in batched[i]] == [h.finished for h in alone]
        np.testing.assert_allclose([h.score for h in batched[i]], [h.score for h in alone], atol=1e-5)
        for a, b in zip(batched[i], alone):
            np.testing.assert_allclose(a.alphas, b.alphas, atol=1e-6)
        lengths |= {len(h.tokens) for h in batched[i]}
    assert len(lengths) > 1  # images finished at different steps


def exhaustive(decoder, features, words, max_len, length_penalty):
    """Every finished sequence of up to max_len words, scored like the beam search does."""
    results = []
    for n in range(max_len):
        for seq in itertools.product(words, repeat=n):
            logprob = sequence_logprob(decoder, features, [*seq, END])
            score = logprob / ((n + 1) ** length_penalty) if length_penalty else logprob
            results.append((score, list(seq), logprob))
    return sorted(results, key=lambda r: -r[0])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_large_beam_equals_exhaustive_search(length_penalty):
    dec = make_decoder(vocab_size=7, end_bias=0.5)  # 3 real words: ids 4, 5, 6
    feats = make_features(2)
    max_len = 4  # 1 + 3 + 9 + 27 finished sequences and 81 open ones: a beam of 128 prunes nothing
    settings = DecodeSettings(beam_size=128, n_best=10, max_len=max_len, length_penalty=length_penalty)
    out = beam_search(dec, feats, settings, start=START, end=END, blocked=BLOCKED)
    for i in range(2):
        truth = exhaustive(dec, feats[i : i + 1], [4, 5, 6], max_len, length_penalty)
        got = [h for h in out[i] if h.finished]
        assert len(got) == 10
        assert [h.tokens for h in got] == [t[1] for t in truth[:10]]
        np.testing.assert_allclose([h.score for h in got], [t[0] for t in truth[:10]], atol=1e-4)


def test_image_that_never_ends_returns_best_unfinished():
    dec = make_decoder(end_bias=-1e4)  # <end> can never win
    feats = make_features(3)
    out = beam_search(dec, feats, DecodeSettings(beam_size=3, max_len=6), start=START, end=END, blocked=BLOCKED)
    for hyps in out:
        assert len(hyps) == 3
        assert all(not h.finished and len(h.tokens) == 6 for h in hyps)
        assert hyps[0].score >= hyps[1].score >= hyps[2].score


def test_finished_hypotheses_rank_before_unfinished_and_n_best_is_respected():
    dec = make_decoder(end_bias=1.0)
    out = beam_search(dec, make_features(5), DecodeSettings(beam_size=4, n_best=2, max_len=8),
                      start=START, end=END, blocked=BLOCKED)
    for hyps in out:
        assert len(hyps) == 2
        flags = [h.finished for h in hyps]
        assert flags == sorted(flags, reverse=True)


def test_blocked_tokens_are_never_generated():
    dec = make_decoder()
    with torch.no_grad():
        dec.fc.bias[3] += 50.0  # <unk> would win every step
    out = beam_search(dec, make_features(3), DecodeSettings(beam_size=3, max_len=8), start=START, end=END,
                      blocked=BLOCKED)
    assert all(3 not in h.tokens and 1 not in h.tokens and 0 not in h.tokens for hyps in out for h in hyps)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram(n):
    dec = make_decoder(end_bias=-1e4)
    with torch.no_grad():
        dec.fc.bias[5] += 6.0  # a model that loves repeating word 5
    feats = make_features(3)
    plain = beam_search(dec, feats, DecodeSettings(beam_size=2, max_len=9), start=START, end=END, blocked=BLOCKED)
    assert any(h.tokens.count(5) > 2 for hyps in plain for h in hyps)
    out = beam_search(dec, feats, DecodeSettings(beam_size=2, max_len=9, no_repeat_ngram=n), start=START, end=END,
                      blocked=BLOCKED)
    assert len(out) == 3 and all(hyps for hyps in out)  # every photo still gets its captions
    for hyps in out:
        for h in hyps:
            grams = [tuple(h.tokens[i : i + n]) for i in range(len(h.tokens) - n + 1)]
            assert len(grams) == len(set(grams))
            # only the repeats are banned: every word is still a real choice with a finite score
            assert len(h.tokens) == 9 and math.isfinite(h.logprob) and h.logprob > -1e3


@pytest.mark.parametrize("bad, message", [
    (dict(max_len=0), "max length must be at least 1"),
    (dict(no_repeat_ngram=-1), "no-repeat-ngram must be 0 (off) or a positive n-gram size"),
])
def test_impossible_decode_settings_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError) as err:
        DecodeSettings(**bad)
    assert str(err.value) == message


def test_length_penalty_score_formula():
    dec = make_decoder(end_bias=1.0)
    out = beam_search(dec, make_features(4), DecodeSettings(beam_size=3, max_len=10, length_penalty=0.8),
                      start=START, end=END, blocked=BLOCKED)
    for hyps in out:
        for h in hyps:
            length = len(h.tokens) + (1 if h.finished else 0)
            assert h.score == pytest.approx(h.logprob / length**0.8, rel=1e-6)


def test_attention_maps_one_per_word_and_normalized():
    dec = make_decoder(end_bias=1.0)
    out = beam_search(dec, make_features(3, P=9), DecodeSettings(beam_size=3, max_len=10), start=START, end=END,
                      blocked=BLOCKED)
    for hyps in out:
        for h in hyps:
            assert h.alphas.shape == (len(h.tokens), 9)
            np.testing.assert_allclose(h.alphas.sum(axis=1), 1.0, atol=1e-5)
    none = beam_search(dec, make_features(3, P=9), DecodeSettings(beam_size=3, max_len=10), start=START, end=END,
                       blocked=BLOCKED, attention=False)
    assert all(h.alphas is None for hyps in none for h in hyps)
    assert [h.tokens for hyps in none for h in hyps] == [h.tokens for hyps in out for h in hyps]


def test_encoder_projection_is_computed_once_per_batch():
    dec = make_decoder(end_bias=-1e4)
    calls = []
    handle = dec.attention.encoder_att.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    try:
        beam_search(dec, make_features(4), DecodeSettings(beam_size=3, max_len=7), start=START, end=END,
                    blocked=BLOCKED)
    finally:
        handle.remove()
    assert calls == [torch.Size([4, 9, 32])]  # one call for the batch, not one per step


def test_settings_validation_and_key():
    with pytest.raises(ValueError, match="n-best"):
        DecodeSettings(beam_size=2, n_best=3)
    with pytest.raises(ValueError):
        DecodeSettings(beam_size=0)
    assert DecodeSettings(beam_size=3).key() == DecodeSettings(beam_size=3, n_best=3).key()
    assert DecodeSettings(beam_size=3).key() != DecodeSettings(beam_size=3, length_penalty=0.5).key()


@pytest.mark.parametrize("config", [{}, {"attention": "hard", "hard_inference": "argmax"}, {"grid_dim": 8}])
@pytest.mark.parametrize("expected_steps", [0, 10**6])  # embedding product at every step, or a word table
@pytest.mark.parametrize("slice_floats", [1 << 19, 500, 0])  # one energy slice, many, or unsliced (GPU path)
def test_inference_step_matches_decoder_step(monkeypatch, slice_floats, expected_steps, config):
    monkeypatch.setattr(InferenceStep, "SLICE_FLOATS", slice_floats)
    dec = make_decoder(end_bias=1.0, **config)
    feats = dec.prepare(make_features(4))
    h0, c0, proj = dec.init_state(feats)
    g = torch.Generator().manual_seed(2)
    h = h0.unsqueeze(1) + 0.1 * torch.randn(4, 3, 32, generator=g)  # three different hypotheses per image
    c = c0.unsqueeze(1) + 0.1 * torch.randn(4, 3, 32, generator=g)
    tokens = torch.randint(0, 20, (4, 3), generator=g)
    with torch.inference_mode():
        expected = dec.step(feats, proj, tokens, h, c)
        step = InferenceStep(dec, expected_steps=expected_steps)
        assert step.table == (expected_steps > 20)
        got = step(feats, proj, tokens, h, c)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_hard_attention_inference_reads_one_cell_or_the_expectation():
    """A hard-attention model decodes with the expected context (as a soft one) or, with argmax,
    with the single most likely cell: the step's LSTM input is that cell's features."""
    soft = make_decoder(end_bias=1.0)
    expected = make_decoder(end_bias=1.0, attention="hard", hard_inference="expected")
    argmax = make_decoder(end_bias=1.0, attention="hard", hard_inference="argmax")
    feats = make_features(3)
    h, c, proj = soft.init_state(feats)
    h, c, tokens = h.unsqueeze(1), c.unsqueeze(1), torch.full((3, 1), START)
    with torch.no_grad():
        a = soft.step(feats, proj, tokens, h, c)
        b = expected.step(feats, proj, tokens, h, c)
        d = argmax.step(feats, proj, tokens, h, c)
        torch.testing.assert_close(a[0], b[0])
        assert not torch.allclose(a[0], d[0])
        # argmax by hand: the gate times the features of the best cell
        context, alpha = argmax.attention(feats, proj, h)
        cell = feats[torch.arange(3), alpha[:, 0].argmax(-1)].unsqueeze(1)
        gated = torch.sigmoid(argmax.f_beta(h)) * cell
        x = torch.cat([argmax.embedding(tokens), gated], dim=-1).reshape(3, -1)
        h1, _ = argmax.lstm(x, (h.reshape(3, -1), c.reshape(3, -1)))
        torch.testing.assert_close(d[1].reshape(3, -1), h1)
    hyps = beam_search(argmax, feats, DecodeSettings(beam_size=3, max_len=8), start=START, end=END, blocked=BLOCKED)
    assert all(h and h[0].alphas is not None for h in hyps)


def test_decoding_follows_weights_updated_in_place():
    """Fused Adam changes weights without bumping their version counters: nothing may go stale."""
    import copy

    dec = make_decoder(end_bias=1.0)
    feats = make_features(64)  # enough images for the word table
    settings = DecodeSettings(beam_size=3, max_len=10)
    before = beam_search(dec, feats, settings, start=START, end=END, blocked=BLOCKED)
    opt = torch.optim.Adam(dec.parameters(), lr=0.05, fused=True)
    dec.train()
    logits, _, _ = dec(feats[:8], torch.randint(4, 20, (8, 6)))
    logits.logsumexp(-1).sum().backward()
    opt.step()
    dec.eval()
    after = beam_search(dec, feats, settings, start=START, end=END, blocked=BLOCKED)
    fresh = beam_search(copy.deepcopy(dec), feats, settings, start=START, end=END, blocked=BLOCKED)
    assert [h.tokens for hs in after for h in hs] == [h.tokens for hs in fresh for h in hs]
    assert [h.tokens for hs in after for h in hs] != [h.tokens for hs in before for h in hs]


def count_steps(monkeypatch):
    calls = []
    original = InferenceStep.__call__
    monkeypatch.setattr(InferenceStep, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    return calls


def test_images_settled_early_keep_the_full_search_result(monkeypatch):
    """With no length penalty, an image stops once its kept hypotheses beat every live one."""
    dec = make_decoder(end_bias=1.0)
    feats = make_features(8)
    calls = count_steps(monkeypatch)
    full = beam_search(dec, feats, DecodeSettings(beam_size=4, max_len=15), start=START, end=END, blocked=BLOCKED)
    full_steps = len(calls)
    for keep in (1, 2):
        calls.clear()
        out = beam_search(dec, feats, DecodeSettings(beam_size=4, n_best=keep, max_len=15), start=START, end=END,
                          blocked=BLOCKED)
        assert len(calls) < full_steps  # fewer steps...
        for short, long in zip(out, full):  # ...same kept hypotheses, same scores and maps
            assert [h.tokens for h in short] == [h.tokens for h in long[:keep]]
            np.testing.assert_allclose([h.logprob for h in short], [h.logprob for h in long[:keep]], atol=1e-5)
            for a, b in zip(short, long):
                np.testing.assert_allclose(a.alphas, b.alphas, atol=1e-6)
    calls.clear()  # a length penalty lets longer hypotheses overtake: no early stop
    beam_search(dec, feats, DecodeSettings(beam_size=4, n_best=1, max_len=15, length_penalty=0.7), start=START,
                end=END, blocked=BLOCKED)
    lp_steps = len(calls)
    calls.clear()
    beam_search(dec, feats, DecodeSettings(beam_size=4, max_len=15, length_penalty=0.7), start=START, end=END,
                blocked=BLOCKED)
    assert lp_steps == len(calls)


def test_hard_attention_argmax_maps_are_one_hot():
    """With argmax inference the decoder reads one cell per word, so the attention map stored with
    each word is that cell: one-hot (a soft map would claim it looked elsewhere too)."""
    argmax = make_decoder(end_bias=1.0, attention="hard", hard_inference="argmax")
    hyps = beam_search(argmax, make_features(3), DecodeSettings(beam_size=3, max_len=8), start=START, end=END,
                       blocked=BLOCKED)
    for per_image in hyps:
        for hyp in per_image:
            alphas = torch.as_tensor(hyp.alphas)
            alphas = alphas.reshape(alphas.shape[0], -1) if alphas.numel() else alphas.reshape(0, 1)
            assert ((alphas == 0) | (alphas == 1)).all() and (alphas.sum(-1) == 1).all(), alphas


def test_half_maps_come_back_as_float16_for_finished_and_open_hypotheses():
    """half_maps (what sat caption asks for): the same hypotheses, with maps in float16 that
    round the float32 ones, for captions that ended and for those still open at max_len."""
    dec = make_decoder(end_bias=0.5)
    feats = make_features(6)
    settings = DecodeSettings(beam_size=3, n_best=3, max_len=4)
    full = beam_search(dec, feats, settings, start=START, end=END, blocked=BLOCKED)
    half = beam_search(dec, feats, settings, start=START, end=END, blocked=BLOCKED, half_maps=True)
    kinds = set()
    for a_hyps, b_hyps in zip(full, half):
        assert [h.tokens for h in a_hyps] == [h.tokens for h in b_hyps]
        assert [h.score for h in a_hyps] == [h.score for h in b_hyps]
        for a, b in zip(a_hyps, b_hyps):
            kinds.add(a.finished)
            assert a.alphas.dtype == np.float32 and b.alphas.dtype == np.float16
            assert b.alphas.shape == a.alphas.shape == (len(a.tokens), 9)
            np.testing.assert_array_equal(b.alphas, a.alphas.astype(np.float16))
    assert kinds == {True, False}  # both kinds of hypotheses were compared
