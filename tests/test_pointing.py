"""The pointing game (sat_cli.evaluation.pointing): it scores where the attention falls, and it separates a
model that attends from one whose maps are uniform."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sat_cli.evaluation.pointing import (content_words, entropy_ratio, mosaic, mosaic_sets, owner, quadrant_shares,
                                         score, stem)
from sat_cli.model.beam import DecodeSettings
from sat_cli.model.decoder import Decoder, DecoderConfig
from sat_cli.model.vocab import SPECIALS, Vocab
from sat_cli.pipeline import decode
from sat_cli.training.losses import caption_loss


def test_quadrant_shares_even_and_odd_grids():
    even = np.zeros((4, 4))
    even[0, 3] = 1.0  # top-right
    assert quadrant_shares(even).tolist() == [0, 1, 0, 0]
    odd = np.zeros((3, 3))
    odd[1, 1] = 1.0  # the centre cell is split four ways
    assert quadrant_shares(odd) == pytest.approx([0.25] * 4)
    odd[:] = 0
    odd[0, 1] = 1.0  # top middle: half top-left, half top-right
    assert quadrant_shares(odd) == pytest.approx([0.5, 0.5, 0, 0])
    uniform = np.full((12, 12), 1 / 144)
    assert quadrant_shares(uniform) == pytest.approx([0.25] * 4)


def test_words_owned_by_one_tile_only():
    tiles = [content_words([["a", "dog", "on", "the", "grass"]]), content_words([["two", "dogs", "running"]]),
             content_words([["a", "red", "bus"]]), content_words([["a", "cat", "on", "a", "sofa"]])]
    assert stem("dogs") == "dog" and stem("buses") == "bus" and stem("ponies") == "pony" and stem("glass") == "glass"
    assert owner("dog", tiles) is None  # two tiles hold it
    assert owner("bus", tiles) == 2 and owner("buses", tiles) == 2 and owner("sofa", tiles) == 3
    assert owner("the", tiles) is None and owner("a", tiles) is None  # function words
    assert owner("piano", tiles) is None  # no tile


def test_entropy_ratio_and_mosaic_sets():
    assert entropy_ratio(np.full((4, 4), 1 / 16)) == pytest.approx(1.0)
    one = np.zeros((4, 4))
    one[2, 1] = 1
    assert entropy_ratio(one) == 0.0
    sets = mosaic_sets(10, 25, seed=1)
    assert len(sets) == 25 and all(len(set(s)) == 4 for s in sets)
    uses = np.bincount([i for s in sets for i in s], minlength=10)
    assert uses.max() - uses.min() <= 1  # each photo about equally often
    from PIL import Image

    tiles = [Image.new("RGB", (30, 20), c) for c in ("red", "green", "blue", "white")]
    m = np.asarray(mosaic(tiles, (64, 64)))
    assert m.shape == (64, 64, 3) and tuple(m[5, 5]) == (255, 0, 0) and tuple(m[60, 60]) == (255, 255, 255)


COLORS = ["red", "green", "blue", "yellow", "black", "white"]


def world(n: int, gen: torch.Generator):
    """Feature grids of 2x2 mosaics of one-object tiles (4x4 cells, 2x2 per tile): channel k lights
    the cells of object k, four more channels say which quadrant a cell is in. The caption names
    the four objects in reading order, so a model has to look at each quadrant in turn."""
    C = len(COLORS) + 4
    feats = torch.randn(n, 4, 4, C, generator=gen) * 0.1
    objects = torch.stack([torch.randperm(len(COLORS), generator=gen)[:4] for _ in range(n)])
    for q, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        feats[:, r : r + 2, c : c + 2, len(COLORS) + q] += 1.0
        for i in range(n):
            feats[i, r : r + 2, c : c + 2, objects[i, q]] += 1.0
    return feats.view(n, 16, C), objects


def test_the_metric_separates_a_model_that_attends_from_uniform_maps():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vocab = Vocab([*SPECIALS, *COLORS])
    dec = Decoder(DecoderConfig(vocab_size=len(vocab), encoder_dim=len(COLORS) + 4, embed_dim=16, attention_dim=16,
                                decoder_dim=32, dropout=0.0))
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    for _ in range(400):  # seconds on a CPU: trained in the test
        feats, objects = world(32, gen)
        caps = torch.cat([torch.full((32, 1), vocab.start), objects + len(SPECIALS), torch.full((32, 1), vocab.end)], 1)
        logits, alphas, _ = dec(feats, caps)
        loss, _ = caption_loss(logits, alphas, caps, torch.full((32,), 6), 0.0, 0.0, vocab.pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dec.eval()
    feats, objects = world(50, gen)
    tiles = [[content_words([[COLORS[int(k)]]]) for k in row] for row in objects]

    def play(decoder):
        model = SimpleNamespace(decoder=decoder, vocab=vocab, grid=(4, 4))
        captions = decode(model, feats, DecodeSettings(beam_size=3, n_best=1, max_len=6))
        return score([(c[0].words, c[0].attention.astype(np.float32)) for c in captions], tiles)

    attends = play(dec)
    assert len(attends.scored) >= 150 and attends.share > 0.6 and attends.hits > 0.7 and attends.entropy < 0.8
    uniform = Decoder(dec.config)
    uniform.load_state_dict(dec.state_dict())
    with torch.no_grad():
        uniform.attention.full_att.weight.zero_()  # every cell the same energy: uniform maps
    flat = play(uniform.eval())
    assert flat.share == pytest.approx(0.25, abs=0.01) and flat.entropy == pytest.approx(1.0, abs=1e-3)
