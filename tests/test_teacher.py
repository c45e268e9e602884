"""Fast teacher forcing (sat_cli.model.teacher) against the step-by-step reference, and photo batches."""

import json

import pytest
import torch

from sat_cli.model import teacher
from sat_cli.model.decoder import Decoder, DecoderConfig
from sat_cli.training.config import CONFIG_FILE, TrainConfig
from sat_cli.training.data import photo_batches
from sat_cli.training.losses import caption_loss


def batch(seed, photos=4, per_photo=(2, 5), P=9, C=24, V=40):
    g = torch.Generator().manual_seed(seed)
    photo = torch.cat([torch.full((int(torch.randint(*per_photo, (1,), generator=g)),), i) for i in range(photos)])
    B = len(photo)
    lengths = torch.randint(3, 9, (B,), generator=g)
    order = lengths.argsort(descending=True, stable=True)
    lengths, photo = lengths[order], photo[order]
    caps = torch.randint(4, V, (B, int(lengths.max())), generator=g)
    caps[:, 0] = 1
    for i, n in enumerate(lengths.tolist()):
        caps[i, n - 1], caps[i, n:] = 2, 0
    feats = torch.rand(photos, P, C, generator=g)
    return feats, caps, lengths, photo


def loss_and_grads(dec, feats, caps, lengths, photo, fast, lam):
    dec.zero_grad()
    feats = feats.clone().requires_grad_(True)  # as when the encoder is fine-tuned
    steps = [int(n) - 1 for n in lengths]
    grid = dec.prepare(feats)  # --grid-dim: projected once per photo
    if fast:
        hs, alphas = teacher.teacher_forcing(dec, grid, caps, steps, photo)
    else:
        hs, alphas, _ = dec.stepwise(grid[photo], caps, steps)
    mask = torch.arange(max(steps))[None] < torch.tensor(steps)[:, None]
    loss, _ = caption_loss(dec.fc(hs[mask]), alphas, caps, lengths, lam, 0.1, 0)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in dec.named_parameters()}
    return loss.detach(), alphas.detach(), grads, feats.grad.clone()


@pytest.mark.parametrize("init_state,grid_dim", [("mean", 0), ("zero", 0), ("mean", 10)])
@pytest.mark.parametrize("lam", [1.0, 0.0])
def test_fast_teacher_forcing_matches_the_step_by_step_reference(monkeypatch, init_state, grid_dim, lam):
    monkeypatch.setattr(teacher, "SLICE_FLOATS", 300)  # several slices of the energy per step
    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(vocab_size=40, encoder_dim=24, embed_dim=12, attention_dim=20, decoder_dim=16,
                                dropout=0.0, init_state=init_state, grid_dim=grid_dim)).double()
    assert ("grid_proj.weight" in dict(dec.named_parameters())) == bool(grid_dim)
    for seed in range(3):
        feats, caps, lengths, photo = batch(seed)
        feats = feats.double()
        ref = loss_and_grads(dec, feats, caps, lengths, photo, False, lam)
        out = loss_and_grads(dec, feats, caps, lengths, photo, True, lam)
        assert out[0].item() == pytest.approx(ref[0].item(), rel=1e-12)
        torch.testing.assert_close(out[1], ref[1], rtol=1e-10, atol=1e-12)  # alphas, zero past the end
        for name in ref[2]:
            torch.testing.assert_close(out[2][name], ref[2][name], rtol=1e-8, atol=1e-12, msg=name)
        torch.testing.assert_close(out[3], ref[3], rtol=1e-8, atol=1e-12)  # gradient for the features


def test_decoder_forward_uses_photos_and_keeps_the_reference_path_for_hard_attention():
    torch.manual_seed(1)
    feats, caps, lengths, photo = batch(7)
    soft = Decoder(DecoderConfig(vocab_size=40, encoder_dim=24, embed_dim=12, attention_dim=20, decoder_dim=16,
                                 dropout=0.0))
    logits, alphas, loc = soft(feats, caps, lengths.tolist(), None, photo)
    again, alphas2, _ = soft(feats[photo], caps, lengths.tolist())  # one photo a caption
    torch.testing.assert_close(logits, again, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alphas, alphas2, rtol=1e-5, atol=1e-6)
    assert loc is None and logits.shape == (int((lengths - 1).sum()), 40)
    hard = Decoder(DecoderConfig(vocab_size=40, encoder_dim=24, embed_dim=12, attention_dim=20, decoder_dim=16,
                                 attention="hard"))
    sample = torch.ones(len(caps), dtype=torch.bool)
    _, _, loc = hard(feats, caps, lengths.tolist(), sample, photo)
    assert loc is not None and loc.shape == (len(caps), int(lengths.max()) - 1)


def test_photo_batches_keep_a_photos_captions_together_and_cover_the_epoch_once():
    g = torch.Generator().manual_seed(3)
    image_index = [i for i in range(103) for _ in range(int(torch.randint(3, 7, (1,), generator=g)))]
    lengths = torch.randint(5, 20, (len(image_index),), generator=g).tolist()
    batches = photo_batches(image_index, lengths, 32, seed=0, epoch=0)
    seen = [j for b in batches for j in b]
    assert sorted(seen) == list(range(len(image_index)))  # every caption once
    for b in batches:
        photos = {image_index[j] for j in b}
        assert sum(image_index.count(p) for p in photos) == len(b)  # all of each photo's captions
    per_photo = len(image_index) / 103
    assert abs(sum(map(len, batches)) / len(batches) - round(32 / per_photo) * per_photo) < per_photo
    assert photo_batches(image_index, lengths, 32, seed=0, epoch=0) == batches
    assert photo_batches(image_index, lengths, 32, seed=0, epoch=1) != batches
    ranks = [photo_batches(image_index, lengths, 32, seed=0, epoch=0, rank=r, world=2) for r in range(2)]
    shares = [{image_index[j] for b in bs for j in b} for bs in ranks]
    assert not shares[0] & shares[1] and len(shares[0]) == len(shares[1]) == 51  # disjoint, even


def test_runs_started_before_the_batching_option_resume_with_their_batches(tmp_path):
    old = {k: v for k, v in vars(TrainConfig()).items() if k != "batching"}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(old))
    assert TrainConfig.load(tmp_path).batching == "length"


def test_bf16_products_follow_fp32_teacher_forcing_closely():
    """products=bf16 (sat train --precision bf16 on the CPU): the same loss and gradients as fp32 up
    to bf16 rounding of the products' inputs, and every product really runs in bf16 (a model
    whose weights bf16 cannot hold exactly gives a measurably different loss)."""
    torch.manual_seed(3)
    dec = Decoder(DecoderConfig(vocab_size=40, encoder_dim=24, embed_dim=12, attention_dim=20, decoder_dim=16,
                                dropout=0.0))
    feats, caps, lengths, photo = batch(5)

    def run(products):
        dec.zero_grad()
        logits, alphas, _ = dec(feats, caps, lengths.tolist(), None, photo, products=products)
        loss, _ = caption_loss(logits, alphas, caps, lengths, 0.0, 0.1, 0)
        loss.backward()
        return loss.item(), logits.dtype, alphas.dtype, {k: p.grad.clone() for k, p in dec.named_parameters()}

    ref, low = run(None), run(torch.bfloat16)
    assert low[1] == low[2] == torch.float32  # outputs, and the state between steps, stay fp32
    assert low[0] == pytest.approx(ref[0], rel=2e-2)
    assert low[0] != ref[0]  # not silently fp32
    for name, g in ref[3].items():
        assert low[3][name].dtype == torch.float32, name
        if g.norm() < 1e-6:  # full_att.bias: zero in exact arithmetic (softmax ignores a shift)
            continue
        cos = torch.nn.functional.cosine_similarity(low[3][name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, name


def test_grid_dim_projects_each_photo_once_and_every_path_reads_the_projection():
    """--grid-dim: the decoder reads a learned projection of the grid (grid_dim channels wide):
    forward equals the step-by-step reference reading the grid projected by hand, and the
    projection is learned (it gets a gradient)."""
    torch.manual_seed(3)
    dec = Decoder(DecoderConfig(vocab_size=40, encoder_dim=24, embed_dim=12, attention_dim=20, decoder_dim=16,
                                dropout=0.0, grid_dim=6)).double()
    assert dec.lstm.weight_ih.shape == (64, 12 + 6) and dec.f_beta.out_features == 6
    feats, caps, lengths, photo = batch(11)
    feats = feats.double()
    fast, alphas, _ = dec(feats, caps, lengths.tolist(), None, photo)
    fast.sum().backward()
    assert dec.grid_proj.weight.grad.abs().sum() > 0
    projected = dec.grid_proj(feats[photo])
    steps = (lengths - 1).tolist()
    hs, ref_alphas, _ = dec.stepwise(projected, caps, steps)
    torch.testing.assert_close(alphas, ref_alphas)
    mask = torch.arange(max(steps))[None] < torch.tensor(steps)[:, None]
    torch.testing.assert_close(fast, dec.fc(hs[mask]))
    with pytest.raises(ValueError, match="grid_dim"):
        DecoderConfig(vocab_size=40, encoder_dim=24, grid_dim=-1)
