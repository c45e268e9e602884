"""`sat import sgrvinod`: a checkpoint in his format (his module, class and attribute names,
written here; random weights; both torch.save formats) imported without running pickled code,
then captioned the way his caption.py does, reimplemented here per image."""

import contextlib
import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from conftest import SHARED_DATA, shared_images
from sat_cli.cli.main import cli
from sat_cli.errors import CheckpointError
from sat_cli.importers import import_sgrvinod
from sat_cli.importers.unpickle import _storage_tensor
from sat_cli.model.vocab import SPECIALS

MODELS = types.ModuleType("models")  # his models.py, as pickle will name it
MODELS.__file__ = __file__  # so torch's legacy format stores the classes' source, as it did for him


# His models.py: the class and attribute names his pickles hold (only what the test runs is written).
class Encoder(nn.Module):
    def __init__(self, encoded_image_size=14):
        super().__init__()
        self.enc_image_size = encoded_image_size
        resnet = torchvision.models.resnet101(weights=None, zero_init_residual=True)
        self.resnet = nn.Sequential(*list(resnet.children())[:-2])
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))

    def forward(self, images):  # (B, 3, 256, 256) -> (B, 14, 14, 2048)
        return self.adaptive_pool(self.resnet(images)).permute(0, 2, 3, 1)


class Attention(nn.Module):
    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)


class DecoderWithAttention(nn.Module):
    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5):
        super().__init__()
        self.encoder_dim, self.attention_dim, self.embed_dim = encoder_dim, attention_dim, embed_dim
        self.decoder_dim, self.vocab_size, self.dropout = decoder_dim, vocab_size, dropout
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=self.dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(decoder_dim, vocab_size)


for _cls in (Encoder, Attention, DecoderWithAttention):
    _cls.__module__ = "models"
    setattr(MODELS, _cls.__name__, _cls)


class Payload:
    """Unpickling this runs code (``call``), e.g. writes a marker file."""

    def __init__(self, call):
        self.call = call

    def __reduce__(self):
        return self.call


class ThnnBackend:
    """PyTorch 0.4 pickled each module's ``_backend`` as a call of this function."""

    def __reduce__(self):
        from torch.nn.backends.thnn import _get_thnn_function_backend

        return _get_thnn_function_backend, ()


@contextlib.contextmanager
def as_models_module():
    old = sys.modules.get("models")
    sys.modules["models"] = MODELS
    try:
        yield
    finally:
        if old is None:
            del sys.modules["models"]
        else:
            sys.modules["models"] = old


@contextlib.contextmanager
def pickled_as_in_pytorch_04(*roots):
    """Parameters pickled as Parameter(tensor, requires_grad), a _backend on every module and no
    num_batches_tracked, as PyTorch 0.4.0's torch.save wrote them."""
    modules = [m for root in roots for m in root.modules()]
    counters = {m: m._buffers.pop("num_batches_tracked") for m in modules if "num_batches_tracked" in m._buffers}
    for m in modules:
        m.__dict__["_backend"] = ThnnBackend()
    reduce = nn.Parameter.__reduce_ex__
    nn.Parameter.__reduce_ex__ = lambda self, proto: (nn.Parameter, (self.data, self.requires_grad))
    try:
        yield
    finally:
        nn.Parameter.__reduce_ex__ = reduce
        for m in modules:
            del m.__dict__["_backend"]
        for m, counter in counters.items():
            m._buffers["num_batches_tracked"] = counter


def his_word_map(n_words=400):
    """create_input_files' numbering: words from 1 (in first-seen order), <unk> <start> <end> last, <pad> 0."""
    seen = {}
    for image in json.loads((SHARED_DATA / "captions.json").read_text())["images"]:
        for sentence in image["sentences"]:
            for token in sentence["tokens"]:
                seen[token] = seen.get(token, 0) + 1
    words = [w for w, n in seen.items() if n > 5][:n_words]
    word_map = {w: i + 1 for i, w in enumerate(words)}
    for special in ("<unk>", "<start>", "<end>"):
        word_map[special] = len(word_map) + 1
    word_map["<pad>"] = 0
    return word_map


def save(obj, path, legacy=False):
    with as_models_module():
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def his_encoder():
    """A "fine-tuned" ResNet-101: every batch norm moved, residual branches small, one block perturbed."""
    torch.manual_seed(0)
    encoder = Encoder().eval()
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.02)
                m.running_var.uniform_(0.8, 1.2)
                m.num_batches_tracked.fill_(1000)
        for block in (b for stage in list(encoder.resnet)[4:] for b in stage):
            block.bn3.weight.uniform_(0.0, 0.3)
        conv = encoder.resnet[7][2].conv3.weight
        conv.add_(torch.randn_like(conv) * 0.01)
    return encoder


def his_decoder(word_map, seed=2):
    """Random weights that still write captions. The image steers the words (its features are
    about 0.06, so the layers that read them are scaled up) while the recurrence stays calm (so
    rounding cannot flip a beam decision: captions here do not change when the features move by
    1e-4 of their size), and LSTM unit 0 is a clock whose output raises <end> from the fifth
    word on, so captions end after 6 to 11 words. The seed gives 18 different captions."""
    torch.manual_seed(seed)
    D, end = 128, word_map["<end>"]
    decoder = DecoderWithAttention(64, 64, D, len(word_map)).eval()
    lstm = decoder.decode_step
    with torch.no_grad():
        for layer in (decoder.init_h, decoder.init_c):
            layer.weight.mul_(20)
        lstm.weight_ih[:, 64:].mul_(20)
        decoder.attention.encoder_att.weight.mul_(10)
        lstm.weight_hh.mul_(0.5)
        decoder.embedding.weight.mul_(10)
        decoder.fc.weight.normal_(0, 2.0)
        for gate in range(4):  # rows of unit 0 in the i, f, g, o gates
            lstm.weight_ih[gate * D], lstm.weight_hh[gate * D], lstm.bias_hh[gate * D] = 0, 0, 0
            lstm.bias_ih[gate * D] = 0.25 if gate == 2 else 10.0  # its cell grows by tanh(0.25) a step
        decoder.init_c.weight[0], decoder.init_c.bias[0] = 0, 0
        decoder.fc.weight[:, 0] = 0
        decoder.fc.weight[end, 0], decoder.fc.bias[end] = 200.0, -170.0
    return decoder


@pytest.fixture(scope="module")
def his(tmp_path_factory):
    """His trained-looking checkpoint, saved both ways, and both imported."""
    shared_images(1)  # skips without ../shared/data
    tmp = tmp_path_factory.mktemp("sgrvinod")
    word_map = his_word_map()
    (tmp / "WORDMAP.json").write_text(json.dumps(word_map))
    encoder, decoder = his_encoder(), his_decoder(word_map)
    optimizers = {}
    for name, params in (("encoder_optimizer", encoder.resnet[7][2].bn3.parameters()),
                         ("decoder_optimizer", decoder.parameters())):
        opt = optimizers[name] = torch.optim.Adam(params, lr=1e-4)
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = {"epoch": 12, "epochs_since_improvement": 0, "bleu-4": 0.2429, "encoder": encoder, "decoder": decoder,
             **optimizers}
    zip_file = save(state, tmp / "BEST_checkpoint_zip.pth.tar")
    with pickled_as_in_pytorch_04(encoder, decoder):
        legacy_file = save({**state, "encoder_optimizer": None}, tmp / "BEST_checkpoint_legacy.pth.tar", legacy=True)
    imported = {fmt: import_sgrvinod(f, tmp / "WORDMAP.json", tmp / f"sat-{fmt}").path
                for fmt, f in (("zip", zip_file), ("legacy", legacy_file))}
    return types.SimpleNamespace(encoder=encoder, decoder=decoder, word_map=word_map, tmp=tmp,
                                 files=(zip_file, legacy_file), imported=imported)


# --- his caption.py, per image ------------------------------------------------------------------

def his_pixels(path):
    """caption.py: imread, grey -> 3 channels, imresize to 256x256 (PIL bilinear), /255, ImageNet normalize."""
    img = np.asarray(Image.open(path))
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=2)
    img = np.asarray(Image.fromarray(img).resize((256, 256), Image.BILINEAR)).transpose(2, 0, 1) / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (torch.FloatTensor(img) - mean) / std


def his_beam_search(decoder, encoder_out, word_map, beam_size=5):
    """caption.py's beam search for one image: k hypotheses, the best k of k x V each step,
    those ending in <end> set aside and k reduced, stop after step 51, best finished by summed
    log-probability. encoder_out (14, 14, C). Returns word ids (with <start> and <end>), or None
    where his code finds no finished caption (it raises)."""
    k, V = beam_size, len(word_map)
    start, end = word_map["<start>"], word_map["<end>"]
    feats = encoder_out.reshape(1, -1, encoder_out.shape[-1])  # (1, P, C): the same for every hypothesis
    att = decoder.attention
    projected = att.encoder_att(feats)  # his Attention computes this at every step; it depends on the image only
    mean = feats.mean(dim=1).expand(k, -1)
    h, c = decoder.init_h(mean), decoder.init_c(mean)
    words = torch.full((k,), start)
    seqs = words.unsqueeze(1)
    totals = torch.zeros(k)
    done, done_scores = [], []
    for step in range(1, 52):
        alpha = att.softmax(att.full_att(att.relu(projected + att.decoder_att(h).unsqueeze(1))).squeeze(2))  # (k, P)
        context = decoder.sigmoid(decoder.f_beta(h)) * (alpha @ feats[0])  # gated attention-weighted encoding
        h, c = decoder.decode_step(torch.cat([decoder.embedding(words), context], dim=1), (h, c))
        scores = totals.unsqueeze(1) + F.log_softmax(decoder.fc(h), dim=1)  # (k, V)
        flat = scores[0] if step == 1 else scores.view(-1)  # step 1: the k rows are the same
        totals, index = flat.topk(k)
        parent, words = index // V, index % V
        seqs = torch.cat([seqs[parent], words.unsqueeze(1)], dim=1)
        ended = words == end
        done += seqs[ended].tolist()
        done_scores += totals[ended].tolist()
        k -= int(ended.sum())
        if k == 0:
            break
        live = ~ended
        seqs, totals, words = seqs[live], totals[live], words[live]
        h, c = h[parent[live]], c[parent[live]]
    return done[int(np.argmax(done_scores))] if done else None


def his_captions(his, paths):
    """eval.py's hypotheses: the best sequence without <start>, <end> and <pad>, as words."""
    words = {i: w for w, i in his.word_map.items()}
    drop = {his.word_map[s] for s in ("<start>", "<end>", "<pad>")}
    threads = torch.get_num_threads()
    with torch.inference_mode():
        pixels = torch.stack([his_pixels(p) for p in paths]).contiguous(memory_format=torch.channels_last)
        features = his.encoder.to(memory_format=torch.channels_last)(pixels)  # (N, 14, 14, C); same numbers, faster
        torch.set_num_threads(1)  # tiny per-step operations: threads only wait for each other
        try:
            seqs = [his_beam_search(his.decoder, f, his.word_map) for f in features]
        finally:
            torch.set_num_threads(threads)
    return [None if s is None else " ".join(words[i] for i in s if i not in drop) for s in seqs]


# --- tests -----------------------------------------------------------------------------------------

def test_captions_equal_his_beam_search_on_20_photos(his, tmp_path):
    """End to end: sat caption (sat's image loading, resize, encoder, batched beam search) on the
    imported model writes, for each photo, the caption his caption.py would."""
    paths = shared_images(20)
    expected = his_captions(his, paths)
    assert None not in expected, "every photo needs a finished caption in his search"
    assert len(set(expected)) >= 10, "the captions must depend on the image for this to test anything"
    assert any("<unk>" in c.split() for c in expected)  # his search blocks nothing (sat's own models block <unk>)
    result = CliRunner().invoke(cli, ["caption", *map(str, paths), "--model", str(his.imported["zip"]),
                                      "--db", str(tmp_path / "out.db"), "--device", "cpu", "--workers", "0",
                                      "--no-attention", "--print", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = {Path(k).name: v for k, v in (line.rsplit("\t", 1) for line in result.stdout.splitlines())}
    assert [got.get(p.name) for p in paths] == expected


def test_config_records_his_model(his):
    config = json.loads((his.imported["zip"] / "config.json").read_text())
    assert config["encoder"] == {"spec": "torchvision:resnet101", "grid": 14, "image_size": 256,
                                 "weights": "checkpoint", "out_dim": 2048}
    assert config["preprocess"] == {"size": [256, 256], "mean": [0.485, 0.456, 0.406],
                                    "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}
    assert config["decode"] == {"beam_size": 5, "max_len": 51, "length_penalty": 0.0, "block_specials": False}
    by_id = sorted(his.word_map, key=his.word_map.get)
    assert config["vocab"] == [*SPECIALS, *(w for w in by_id if w not in SPECIALS)]
    assert config["decoder"]["dropout"] == 0.5 and config["decoder"]["embed_dim"] == 64
    assert config["training"]["epoch"] == 12 and config["training"]["bleu-4"] == 0.2429
    assert config["training"]["encoder_fine_tuned"] is True


def test_fine_tuned_encoder_weights_and_every_row_are_carried(his):
    stored = load_file(str(his.imported["zip"] / "model.safetensors"))
    his_encoder = his.encoder.resnet.state_dict()
    for key, value in his_encoder.items():
        torch.testing.assert_close(stored[f"encoder.backbone.{key}"], value, rtol=0, atol=0)
    perturbed = his.encoder.resnet[7][2].conv3.weight
    assert torch.equal(stored["encoder.backbone.7.2.conv3.weight"], perturbed)
    vocab = json.loads((his.imported["zip"] / "config.json").read_text())["vocab"]
    for sat_id, word in enumerate(vocab):
        his_id = his.word_map[word]
        assert torch.equal(stored["decoder.embedding.weight"][sat_id], his.decoder.embedding.weight[his_id])
        assert torch.equal(stored["decoder.fc.weight"][sat_id], his.decoder.fc.weight[his_id])
    assert torch.equal(stored["decoder.lstm.weight_ih"], his.decoder.decode_step.weight_ih)


def test_legacy_and_zip_formats_import_alike(his):
    a = load_file(str(his.imported["zip"] / "model.safetensors"))
    b = load_file(str(his.imported["legacy"] / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if not key.endswith("num_batches_tracked"):  # PyTorch 0.4.0 files have none: they become 0
            assert torch.equal(a[key], b[key]), key
    assert b["encoder.backbone.1.num_batches_tracked"] == 0
    with open(his.files[1], "rb") as f:
        assert f.read(2) != b"PK"  # really the legacy format
    legacy = json.loads((his.imported["legacy"] / "config.json").read_text())
    assert legacy["training"]["encoder_fine_tuned"] is False
    assert not list(his.tmp.glob("*.patch")) and not list(Path.cwd().glob("*.patch"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "open"])
def test_a_code_payload_is_refused_and_never_runs(tmp_path, legacy, payload):
    marker = tmp_path / "ran"
    call = {"os.system": (os.system, (f"touch {marker}",)),
            "builtins.exec": (exec, (f"open({str(marker)!r}, 'w').close()",)),
            "open": (open, (str(marker), "w"))}[payload]
    pickle.loads(pickle.dumps(Payload(call)))  # the payload is live: unpickled the usual way, it runs
    assert marker.exists()
    marker.unlink()
    decoder = DecoderWithAttention(8, 8, 8, 6, encoder_dim=16)
    decoder.note = Payload(call)  # hidden among his attributes
    path = save({"epoch": 1, "encoder": None, "decoder": decoder}, tmp_path / "evil.pth.tar", legacy=legacy)
    (tmp_path / "wm.json").write_text(json.dumps({"a": 1, "<unk>": 2, "<start>": 3, "<end>": 4, "b": 5, "<pad>": 0}))
    with pytest.raises(CheckpointError) as err:
        import_sgrvinod(path, tmp_path / "wm.json", tmp_path / "out")
    name = {"os.system": f"{os.system.__module__}.system", "builtins.exec": "builtins.exec",
            "open": f"{open.__module__}.open"}[payload]
    assert name in str(err.value) and "Nothing from the file was run" in str(err.value)
    assert not marker.exists() and not (tmp_path / "out").exists()
    result = CliRunner().invoke(cli, ["import", "sgrvinod", str(path), "--word-map", str(tmp_path / "wm.json"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and name in result.output and "Traceback" not in result.output
    assert not marker.exists()


def test_bad_inputs_are_clear_errors(tmp_path):
    (tmp_path / "wm.json").write_text(json.dumps({"a": 1, "<start>": 2, "<end>": 3, "<pad>": 0}))
    (tmp_path / "ck.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="lacks <unk>"):
        import_sgrvinod(tmp_path / "ck.pth.tar", tmp_path / "wm.json", tmp_path / "out")
    (tmp_path / "wm.json").write_text(json.dumps({"a": 1, "<unk>": 2, "<start>": 3, "<end>": 4, "<pad>": 0}))
    with pytest.raises(CheckpointError, match="Cannot read"):
        import_sgrvinod(tmp_path / "ck.pth.tar", tmp_path / "wm.json", tmp_path / "out")
    save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no 'encoder' and 'decoder'"):
        import_sgrvinod(tmp_path / "other.pth", tmp_path / "wm.json", tmp_path / "out")
    storage = torch.zeros(4).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    assert _storage_tensor(typed, 0, (2, 2), (2, 1)).shape == (2, 2)
    with pytest.raises(CheckpointError, match="past its storage"):
        _storage_tensor(typed, 0, (100,), (1,))  # torch's own set_ would read past the end


def test_half_stores_float16_that_equals_the_weights_rounded_and_captions(his, tmp_path):
    """sat import sgrvinod --half: every weight is his, rounded to float16 (half the file), and
    the model loads and captions a photo."""
    import sat_cli

    out = tmp_path / "half"
    result = CliRunner().invoke(cli, ["import", "sgrvinod", str(his.files[0]), "--word-map",
                                      str(his.tmp / "WORDMAP.json"), "--out", str(out), "--half"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    half, full = load_file(str(out / "model.safetensors")), load_file(str(his.imported["zip"] / "model.safetensors"))
    assert half.keys() == full.keys()
    for key, value in full.items():
        if value.is_floating_point():
            assert half[key].dtype == torch.float16, key
            assert torch.equal(half[key], value.half()), key
        else:
            assert torch.equal(half[key], value), key
    size = (out / "model.safetensors").stat().st_size
    assert size < 0.55 * (his.imported["zip"] / "model.safetensors").stat().st_size
    cap = sat_cli.load(out, device="cpu")
    got = cap([str(shared_images(1)[0])], beam=2, max_len=8)
    assert got[0].ok and got[0].words
