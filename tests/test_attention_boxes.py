"""--attention-boxes: person words' attention trained toward the people in the photo
(sat_cli.training.boxes)."""

import json
import math

import pytest
import torch

from sat_cli.errors import SatError
from sat_cli.model.decoder import Decoder, DecoderConfig
from sat_cli.model.vocab import SPECIALS, Vocab
from sat_cli.training.boxes import box_loss, person_ids
from sat_cli.training.losses import caption_loss
from test_train import small_set, tiny_config  # noqa: F401 (small_set is a fixture)


def test_box_loss_is_minus_log_of_the_mass_inside_per_predicted_word():
    vocab = Vocab([*SPECIALS, "a", "man", "dog"])
    a, man, dog = (vocab.stoi[w] for w in ("a", "man", "dog"))
    captions = torch.tensor([[vocab.start, a, man, vocab.end], [vocab.start, a, dog, vocab.end],
                             [vocab.start, man, vocab.end, vocab.pad]])
    alphas = torch.tensor([[[0.1, 0.2, 0.3, 0.4]] * 3, [[0.25] * 4] * 3, [[0.7, 0.1, 0.1, 0.1]] * 3])
    cover = torch.tensor([[1.0, 0.5, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    ids = person_ids(vocab)
    assert ids.tolist() == [man]
    term, n = box_loss(alphas, captions, cover, torch.tensor([True, True, True]), ids, vocab.pad)
    # 'man' is predicted at step 1 of caption 0 (inside 0.1 + 0.5 * 0.2) and step 0 of caption 2 (0.2);
    # 8 predicted words in all (3 + 3 + 2)
    assert n == 2 and float(term) == pytest.approx(-(math.log(0.2) + math.log(0.2)) / 8)
    unsupervised, n = box_loss(alphas, captions, cover, torch.tensor([True, True, False]), ids, vocab.pad)
    assert n == 1 and float(unsupervised) == pytest.approx(-math.log(0.2) / 8)
    none, n = box_loss(alphas, captions, cover, torch.tensor([False, False, False]), ids, vocab.pad)
    assert n == 0 and float(none) == 0.0


def world(n, gen, g=6):
    """Grids with one person (a 2x2 block lit in channel 0; every other cell lit as much in channel
    1, so the person is no more salient than the rest); the caption is always 'man', so nothing but
    the box term makes the model look at the person."""
    feats = torch.randn(n, g, g, 3, generator=gen) * 0.3
    feats[..., 1] += 1.0
    cover = torch.zeros(n, g, g)
    for i in range(n):
        r, c = (int(v) for v in torch.randint(g - 1, (2,), generator=gen))
        feats[i, r : r + 2, c : c + 2, :2] += torch.tensor([1.0, -1.0])
        cover[i, r : r + 2, c : c + 2] = 1.0
    return feats.view(n, g * g, 3), cover.view(n, g * g)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_the_term_teaches_a_model_to_look_at_the_person(weight):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vocab = Vocab([*SPECIALS, "man"])
    dec = Decoder(DecoderConfig(vocab_size=len(vocab), encoder_dim=3, embed_dim=8, attention_dim=16, decoder_dim=16,
                                dropout=0.0))
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    caps = torch.tensor([[vocab.start, vocab.stoi["man"], vocab.end]] * 32)
    ids, everyone = person_ids(vocab), torch.ones(32, dtype=torch.bool)
    for _ in range(150):
        feats, cover = world(32, gen)
        logits, alphas, _ = dec(feats, caps)
        loss, _ = caption_loss(logits, alphas, caps, torch.full((32,), 3), 0.0, 0.0, vocab.pad)
        term, n = box_loss(alphas, caps, cover, everyone, ids, vocab.pad)
        assert n == 32
        (loss + weight * term).backward()
        opt.step()
        opt.zero_grad()
    feats, cover = world(64, gen)
    with torch.no_grad():
        _, alphas, _ = dec.eval()(feats, caps[:1].expand(64, -1))
    inside = float((alphas[:, 0] * cover).sum(-1).mean())  # area 4/36: a uniform map has 0.11 inside
    if weight:
        assert inside > 0.6
    else:
        assert inside < 0.25


def boxes_file(tmp_path, names):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"boxes": {n: [[0.25, 0.5, 0.5, 1.0]] for n in names}}))
    return path


def test_the_trainer_supervises_person_words_of_photos_with_boxes(small_set, tmp_path, monkeypatch):
    import sat_cli.training.boxes as boxes
    from sat_cli.training.trainer import Trainer

    seen = []
    real = boxes.box_loss

    def spy(alphas, captions, cover, supervised, ids, pad):
        term, n = real(alphas, captions, cover, supervised, ids, pad)
        seen.append((n, int(supervised.sum()), float(cover.sum())))
        return term, n

    monkeypatch.setattr(boxes, "box_loss", spy)
    path = boxes_file(tmp_path, ["astronaut_0.jpg", "camera_0.jpg", "missing.jpg"])
    t = Trainer(tiny_config(small_set, tmp_path, epochs=1, attention_boxes=str(path), box_weight=2.0))
    t.setup()
    assert int(t.box_has.sum()) == 2  # two training photos are named in the file
    assert sorted(t.vocab.itos[i] for i in t.person_ids) == ["man", "woman"]
    t.run()
    # 3 + 3 captions of the two photos: 'woman' twice, 'man' three times
    assert sum(n for n, _, _ in seen) == 5 and sum(s for _, s, _ in seen) == 6

    seen.clear()
    t = Trainer(tiny_config(small_set, tmp_path, out=str(tmp_path / "m"), epochs=1, attention_boxes=str(path),
                            mosaic=1.0, image_size=256))
    t.setup()
    t.run()
    assert seen and all(n == 0 and s == 0 for n, s, _ in seen)  # every caption in a mosaic: none supervised


def test_a_bad_box_file_is_a_clear_error(small_set, tmp_path):
    from sat_cli.training.trainer import Trainer

    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    t = Trainer(tiny_config(small_set, tmp_path, epochs=1, attention_boxes=str(bad)))
    with pytest.raises(SatError, match="not a person-box file"):
        t.setup()
