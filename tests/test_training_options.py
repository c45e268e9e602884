"""sat train options the control tests leave out: --val-data/--val-images (a separate validation
file), --half (best/ in float16) and the per-part validation figures of a mixed val split."""

import csv
import json
import shutil

import pytest
import torch

from conftest import EXAMPLES
from sat_cli.evaluation.metrics import score_captions
from sat_cli.training.trainer import Trainer
from test_train import CAPTIONS, small_set, tiny_config  # noqa: F401 (small_set is a fixture)


def test_val_data_and_val_images_validate_on_that_file(small_set, tmp_path):
    """--val-data/--val-images: the images validated are exactly the separate file's, in its own
    folder, and the training file's own val split is not used."""
    folder = tmp_path / "valimgs"
    folder.mkdir()
    shutil.copy(EXAMPLES / "camera.png", folder / "v1.png")
    shutil.copy(EXAMPLES / "coffee.png", folder / "v2.png")
    with open(tmp_path / "val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([["v1.png", c] for c in CAPTIONS["camera"]] + [["v2.png", c] for c in CAPTIONS["coffee"]])
    t = Trainer(tiny_config(small_set, tmp_path, epochs=1, val_data=str(tmp_path / "val.csv"),
                            val_images=str(folder)))
    t.setup()
    wanted = {str((folder / n).resolve()) for n in ("v1.png", "v2.png")}
    assert {e.path for e in t.val_entries} == wanted
    t.run()
    assert set(t.last_hypotheses) == wanted  # what was decoded and scored
    best = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert best["training"]["val_images"] == 2


def test_half_stores_best_in_float16_that_loads_and_captions(small_set, tmp_path):
    """--half: best/ holds float16 tensors (last/ stays float32); it loads and decodes a photo."""
    import sat_cli
    from safetensors import safe_open

    t = Trainer(tiny_config(small_set, tmp_path, epochs=1, half=True))
    t.setup()
    t.run()

    def dtypes(name):
        with safe_open(str(tmp_path / "run" / name / "model.safetensors"), "pt") as f:
            return {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}

    assert dtypes("best") == {torch.float16}
    assert dtypes("last") == {torch.float32}
    half_size = (tmp_path / "run" / "best" / "model.safetensors").stat().st_size
    assert half_size < 0.6 * (tmp_path / "run" / "last" / "model.safetensors").stat().st_size
    cap = sat_cli.load(tmp_path / "run" / "best", device="cpu")
    out = cap([str(EXAMPLES / "chelsea.png")], beam=2)
    assert out[0].ok and out[0].words and out[0].attention.shape[0] == len(out[0].words)


@pytest.fixture
def two_sources(small_set, tmp_path):
    """small_set as a Karpathy file whose val split mixes two collections (coco and flickr8k)."""
    data, images = small_set
    rows = list(csv.DictReader(open(data)))
    val_parts = {"chelsea_1.jpg": "coco", "rocket_1.jpg": "coco", "coffee_1.jpg": "flickr8k",
                 "astronaut_1.jpg": "flickr8k"}
    by_file = {}
    for row in rows:
        by_file.setdefault(row["image"], []).append(row["caption"])
    out = {"images": [
        {"filename": name, "split": "val" if name in val_parts else "train", "source": val_parts.get(name, "coco"),
         "sentences": [{"raw": c} for c in caps]}
        for name, caps in by_file.items()]}
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(out))
    return (path, images), val_parts


def test_a_mixed_val_split_is_scored_per_part_on_its_own(two_sources, tmp_path):
    """Each collection of the val split gets its own CIDEr and BLEU-4, scored on its images alone
    (CIDEr's document frequencies come from that part only), besides the figures over all."""
    (data, images), val_parts = two_sources
    t = Trainer(tiny_config((data, images), tmp_path, epochs=1))
    t.setup()
    scores = t.validate()
    hyps = t.last_hypotheses
    assert len(hyps) == 4
    refs = {e.path: e.raw for e in t.val_entries}
    for part in ("coco", "flickr8k"):
        ids = {p for p in hyps if val_parts[p.rsplit("/", 1)[-1]] == part}
        assert len(ids) == 2
        own = score_captions({k: refs[k] for k in ids}, {k: hyps[k] for k in ids}, meteor=False)
        assert scores[f"CIDEr {part}"] == pytest.approx(own["CIDEr"])
        assert scores[f"BLEU-4 {part}"] == pytest.approx(own["BLEU-4"])
    everything = score_captions(refs, hyps, meteor=False)
    assert scores["CIDEr"] == pytest.approx(everything["CIDEr"])
    assert not any(k.startswith("CIDEr ") and k.split(" ", 1)[1] not in ("coco", "flickr8k") for k in scores)


def test_precision_bf16_on_the_cpu_trains_with_bf16_products_and_caches_fp32_features(small_set, tmp_path):
    """--precision bf16 on the CPU: the decoder's products run in bf16, the loss falls as in fp32,
    and the feature cache is the fp32 one (an fp32 run afterwards computes nothing new)."""
    from sat_cli.features import FeatureCache

    runs = {}
    for precision in ("bf16", "fp32"):
        cfg = tiny_config(small_set, tmp_path, epochs=2, precision=precision, device="cpu")
        cfg.out = str(tmp_path / precision)
        cfg.cache_dir = str(tmp_path / "cache")
        t = Trainer(cfg)
        t.setup()
        assert t.products == (torch.bfloat16 if precision == "bf16" else None)
        files = sorted(p.name for p in (tmp_path / "cache").rglob("*.npy"))
        t.run()
        runs[precision] = ([json.loads(line)["train_loss"] for line in (tmp_path / precision / "metrics.jsonl")
                            .read_text().splitlines()], files)
    assert runs["bf16"][1] == runs["fp32"][1]  # the fp32 run found every feature the bf16 run cached
    bf16, fp32 = runs["bf16"][0], runs["fp32"][0]
    assert bf16[1] < bf16[0] and fp32[1] < fp32[0]
    assert bf16 != fp32 and bf16[-1] == pytest.approx(fp32[-1], rel=0.05)


def test_grid_dim_trains_a_projected_grid_that_saves_loads_resumes_and_captions(small_set, tmp_path):
    """--grid-dim: the run learns a projection of the grid; best/ records it, loads and captions a
    photo with it; --resume and --init-from keep it."""
    import sat_cli
    from safetensors import safe_open

    t = Trainer(tiny_config(small_set, tmp_path, epochs=1, grid_dim=16))
    t.setup()
    encoder_dim = t.encoder.out_dim
    t.run()
    best = tmp_path / "run" / "best"
    assert json.loads((best / "config.json").read_text())["decoder"]["grid_dim"] == 16
    with safe_open(str(best / "model.safetensors"), "pt") as f:
        assert tuple(f.get_tensor("decoder.grid_proj.weight").shape) == (16, encoder_dim)
        assert tuple(f.get_tensor("decoder.f_beta.weight").shape) == (16, 48)
    cap = sat_cli.load(best, device="cpu")
    out = cap([str(EXAMPLES / "chelsea.png")], beam=2)
    assert out[0].ok and out[0].words and out[0].attention.shape[0] == len(out[0].words)
    from sat_cli.training import TrainConfig

    again = Trainer(TrainConfig.load(tmp_path / "run"), resume=True)  # what sat train --resume does
    again.setup()
    assert again.decoder.config.grid_dim == 16
    child = Trainer(tiny_config(small_set, tmp_path, epochs=1, init_from=str(best), out=str(tmp_path / "child")))
    child.setup()
    assert child.decoder.config.grid_dim == 16


def test_init_from_with_more_feature_layers_grows_the_decoder_and_captions_alike(small_set, tmp_path):
    """--init-from a last-map model with --feature-layers 3,-1: the decoder widens to the stage's
    added channels at zero weight, so before any training it captions exactly as its start; then it
    trains them. Asking for fewer layers than the start reads is a clear error."""
    import sat_cli
    from sat_cli.errors import SatError
    from sat_cli.model.checkpoint import save_checkpoint

    parent = Trainer(tiny_config(small_set, tmp_path, epochs=1))
    parent.setup()
    parent.run()
    best = tmp_path / "run" / "best"
    child = Trainer(tiny_config(small_set, tmp_path, epochs=1, init_from=str(best), feature_layers=[3, -1],
                                out=str(tmp_path / "child")))
    child.setup()
    stage = child.encoder.layer_channels()[0]
    assert stage[0] == 3 and child.encoder.out_dim == stage[1] + parent.encoder.out_dim
    grown = child.decoder.attention.encoder_att.weight
    assert grown[:, :stage[1]].abs().sum() == 0
    torch.testing.assert_close(grown[:, stage[1]:], parent.decoder.attention.encoder_att.weight)
    save_checkpoint(tmp_path / "grown", child.encoder, child.decoder, child.vocab)
    photos = [str(EXAMPLES / n) for n in ("chelsea.png", "camera.png", "coffee.png")]
    before = sat_cli.load(best, device="cpu")(photos, beam=2)
    after = sat_cli.load(tmp_path / "grown", device="cpu")(photos, beam=2)
    assert [r.words for r in after] == [r.words for r in before]
    assert [r.score for r in after] == pytest.approx([r.score for r in before], abs=1e-4)
    child.run()
    assert child.decoder.attention.encoder_att.weight[:, :stage[1]].abs().sum() > 0
    assert json.loads((tmp_path / "child" / "last" / "config.json").read_text())["encoder"]["layers"] == [3, -1]

    narrower = Trainer(tiny_config(small_set, tmp_path, epochs=1, init_from=str(tmp_path / "child" / "last"),
                                   feature_layers=[4, -1], out=str(tmp_path / "other")))
    with pytest.raises(SatError, match="layer 3"):
        narrower.setup()
