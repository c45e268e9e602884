"""Person grounding (sat_cli.evaluation.grounding and bench/pointing_bench.py --only grounding): the
attention mass of person words inside the photo's person boxes, against the boxes' area."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sat_cli.evaluation.grounding import PERSON_WORDS, box_coverage, centre_inside, score
from sat_cli.model.beam import DecodeSettings
from sat_cli.model.decoder import Decoder, DecoderConfig
from sat_cli.model.vocab import SPECIALS, Vocab
from sat_cli.pipeline import decode
from sat_cli.training.losses import caption_loss

from conftest import SHARED_DATA

BENCH = Path(__file__).resolve().parent.parent / "bench" / "pointing_bench.py"


def test_box_coverage_maps_fractions_onto_the_grid():
    left_half = box_coverage([[0.25, 0.5, 0.5, 1.0]], 4, 4)
    assert left_half.tolist() == [[1, 1, 0, 0]] * 4
    # a quarter of a cell wide and high around the corner of four cells: 1/16 of each of them
    corner = box_coverage([[0.25, 0.25, 0.125, 0.125]], 4, 4)
    assert corner[0, 0] == corner[0, 1] == corner[1, 0] == corner[1, 1] == pytest.approx(1 / 16)
    assert corner.sum() == pytest.approx(0.25)
    # two overlapping boxes count their overlap once; a box running off the photo is clipped
    union = box_coverage([[0.25, 0.5, 0.5, 1.0], [0.375, 0.5, 0.25, 1.0], [1.0, 0.0, 0.5, 0.5]], 4, 4)
    assert union.tolist() == [[1, 1, 0, 1], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert union.mean() == pytest.approx(9 / 16)
    # a 12x12 grid: a box's covered area equals its own area
    assert box_coverage([[0.4, 0.6, 0.3, 0.5]], 12, 12).mean() == pytest.approx(0.15, abs=2e-3)
    assert centre_inside([[0.25, 0.5, 0.5, 1.0]], 4, 4)[:, :2].all() and not centre_inside([[0.25, 0.5, 0.5, 1.0]], 4, 4)[:, 2:].any()


def _maps(boxes, words, where, gh=12, gw=12):
    """One map per word: uniform, or its mass spread over the cells most covered by the boxes, or
    over the cells they do not touch."""
    cover = box_coverage(boxes, gh, gw) if boxes else np.zeros((gh, gw))
    maps = []
    for _ in words:
        a = {"uniform": np.ones((gh, gw)), "inside": (cover == cover.max()) * 1.0, "outside": (cover == 0) * 1.0}[where]
        maps.append(a / a.sum())
    return np.stack(maps)


def test_uniform_maps_score_one_and_planted_maps_score_high():
    boxes = [[[0.3, 0.5, 0.2, 0.6]], [[0.7, 0.4, 0.4, 0.4], [0.2, 0.8, 0.2, 0.2]], []]
    words = [["a", "man", "riding", "a", "horse"], ["two", "people", "and", "a", "dog"], ["a", "woman"]]
    uniform = score([(w, _maps(b, w, "uniform")) for w, b in zip(words, boxes)], boxes)
    assert len(uniform.scored) == 2 and uniform.words == 12  # the photo without boxes scores no word
    assert uniform.ratio == pytest.approx(1.0, abs=1e-9)
    assert [s.word for s in uniform.scored] == ["man", "people"]
    planted = score([(w, _maps(b, w, "inside")) for w, b in zip(words, boxes)], boxes)
    assert planted.inside == pytest.approx(1.0) and planted.peak == 1.0
    assert planted.ratio == pytest.approx(1 / planted.area) and planted.ratio > 2
    away = score([(w, _maps(b, w, "outside")) for w, b in zip(words, boxes)], boxes)
    assert away.inside == 0.0 and away.peak == 0.0 and away.ratio == 0.0


KINDS = ["man", "woman", "boy", "girl"]
assert set(KINDS) <= PERSON_WORDS


def world(n: int, gen: torch.Generator, g: int = 6):
    """Feature grids (g x g cells) with one person in a random 2x2 block: channel k lights the
    person's cells when the person is of kind k, background cells carry only noise. The caption is
    the kind word, so a model must look at the person to say it. -> features, kinds, boxes."""
    feats = torch.randn(n, g, g, len(KINDS), generator=gen) * 0.1
    kinds = torch.randint(len(KINDS), (n,), generator=gen)
    boxes = []
    for i in range(n):
        r, c = (int(v) for v in torch.randint(g - 1, (2,), generator=gen))
        feats[i, r : r + 2, c : c + 2, kinds[i]] += 1.0
        boxes.append([[(c + 1) / g, (r + 1) / g, 2 / g, 2 / g]])
    return feats.view(n, g * g, len(KINDS)), kinds, boxes


def test_a_model_that_looks_at_people_scores_high_and_uniform_maps_score_one():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vocab = Vocab([*SPECIALS, *KINDS])
    dec = Decoder(DecoderConfig(vocab_size=len(vocab), encoder_dim=len(KINDS), embed_dim=16, attention_dim=16,
                                decoder_dim=32, dropout=0.0, init_state="zero"))
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    for _ in range(300):  # seconds on a CPU
        feats, kinds, _ = world(32, gen)
        caps = torch.stack([torch.full((32,), vocab.start), kinds + len(SPECIALS), torch.full((32,), vocab.end)], 1)
        logits, alphas, _ = dec(feats, caps)
        loss, _ = caption_loss(logits, alphas, caps, torch.full((32,), 3), 0.0, 0.0, vocab.pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
    feats, kinds, boxes = world(60, gen)

    def play(decoder):
        model = SimpleNamespace(decoder=decoder.eval(), vocab=vocab, grid=(6, 6))
        captions = decode(model, feats, DecodeSettings(beam_size=3, n_best=1, max_len=4))
        said = [c[0].words[0] for c in captions]
        return sum(w == KINDS[int(k)] for w, k in zip(said, kinds)) / len(said), score([(c[0].words, c[0].attention.astype(np.float64)) for c in captions], boxes)

    right, looks = play(dec)
    assert right > 0.95  # it learnt the task
    assert len(looks.scored) == 60 and looks.area == pytest.approx(4 / 36)
    assert looks.ratio > 4 and looks.peak > 0.9
    uniform = Decoder(dec.config)
    uniform.load_state_dict(dec.state_dict())
    with torch.no_grad():
        uniform.attention.full_att.weight.zero_()  # every cell the same energy
    _, flat = play(uniform)
    assert flat.ratio == pytest.approx(1.0, abs=1e-4)


def _bench():
    spec = importlib.util.spec_from_file_location("pointing_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PlantedCaptioner:
    """Stands in for sat_cli.load(): captions every photo 'a man ...' with its first word's map
    planted on the photo's person boxes (read from the boxes file by file name), or uniform."""

    def __init__(self, boxes: dict, planted: bool):
        self.boxes, self.planted, self.seen = boxes, planted, []

    def __call__(self, paths, beam, n_best, batch_size):
        out = []
        for p in paths:
            self.seen.append(Path(p))
            words = ["a", "man", "on", "a", "street"]
            maps = _maps(self.boxes[Path(p).name], words, "inside" if self.planted else "uniform")
            out.append(SimpleNamespace(error=None, words=words, attention=maps, text=" ".join(words)))
        return out


def test_the_bench_scores_the_val_photos_with_person_boxes(tmp_path, capsys):
    data, boxes_file = SHARED_DATA / "captions.json", SHARED_DATA / "coco" / "person_boxes.json"
    if not boxes_file.exists():
        pytest.skip("../shared/data/coco/person_boxes.json is not present")
    bench = _bench()
    boxes = json.loads(boxes_file.read_text())["boxes"]
    args = SimpleNamespace(data=str(data), boxes=None, beam=3, batch_size=8, json=False, examples=1)
    planted = PlantedCaptioner(boxes, planted=True)
    high = bench.grounding(planted, args)
    val = {r["filename"] for r in json.loads(data.read_text())["images"] if r["split"] == "val"}
    assert {p.name for p in planted.seen} == {name for name in boxes if name in val and boxes[name]}
    assert high["photos"] == len(planted.seen) > 200 and high["person_words"] == high["photos"]
    assert high["inside_share"] > 0.9 and high["peak_on_person"] > 0.9 and high["grounding_ratio"] > 2
    flat = bench.grounding(PlantedCaptioner(boxes, planted=False), args)
    assert flat["grounding_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert "person grounding" in capsys.readouterr().out
