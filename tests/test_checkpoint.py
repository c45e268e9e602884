"""Checkpoints: safetensors + JSON, round trip, fingerprint, and never unpickling."""

import json
import pickle

import pytest
import torch

from conftest import build_tiny_model
from sat_cli.errors import CheckpointError
from sat_cli.model.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_restores_every_weight(tmp_path):
    path = build_tiny_model(tmp_path / "m")
    ck = load_checkpoint(path)
    config = json.loads((path / "config.json").read_text())
    assert config["format"] == "sat-checkpoint" and config["format_version"] == FORMAT_VERSION
    assert config["encoder"]["spec"] == "timm:test_efficientnet" and config["vocab"][:4] == [
        "<pad>", "<start>", "<end>", "<unk>"]
    assert config["preprocess"]["size"] == [64, 64]
    copy = save_checkpoint(tmp_path / "copy", ck.encoder, ck.decoder, ck.vocab, include_encoder=True)
    again = load_checkpoint(copy)
    for a, b in zip(ck.decoder.state_dict().values(), again.decoder.state_dict().values()):
        torch.testing.assert_close(a, b)
    for a, b in zip(ck.encoder.state_dict().values(), again.encoder.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert again.fingerprint == load_checkpoint(copy / "model.safetensors").fingerprint
    assert load_checkpoint(copy / "config.json").vocab.itos == ck.vocab.itos


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    """safetensors creates its file owner-only; a saved checkpoint follows the umask like other files."""
    import os
    import stat

    ck = load_checkpoint(build_tiny_model(tmp_path / "m"))
    old = os.umask(0o022)
    try:
        out = save_checkpoint(tmp_path / "perm", ck.encoder, ck.decoder, ck.vocab)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def test_fingerprint_follows_the_weights(tmp_path):
    a = load_checkpoint(build_tiny_model(tmp_path / "a", seed=0))
    b = load_checkpoint(build_tiny_model(tmp_path / "b", seed=1))
    a2 = load_checkpoint(tmp_path / "a")
    assert a.fingerprint == a2.fingerprint != b.fingerprint


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    ck = load_checkpoint(build_tiny_model(tmp_path / "m"))
    save_checkpoint(tmp_path / "h", ck.encoder, ck.decoder, ck.vocab, include_encoder=True, half=True)
    half = load_checkpoint(tmp_path / "h")
    w = half.decoder.fc.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, ck.decoder.fc.weight, atol=1e-2, rtol=1e-2)
    assert (tmp_path / "h" / "model.safetensors").stat().st_size < (tmp_path / "m" / "model.safetensors").stat().st_size


@pytest.mark.parametrize("name", ["model.pth", "model.pt", "checkpoint.ckpt"])
def test_pickle_files_are_refused_unread(tmp_path, name):
    marker = tmp_path / "pwned"
    target = tmp_path / name
    target.write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(target)
    assert not marker.exists()


def test_pickle_renamed_to_safetensors_is_refused_unread(tmp_path):
    path = build_tiny_model(tmp_path / "m")
    marker = tmp_path / "pwned"
    (path / "model.safetensors").write_bytes(pickle.dumps(Payload(str(marker))))
    torch.save({"x": Payload(str(marker))}, tmp_path / "zip.pt")  # torch's zip pickle too
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(path)
    (path / "model.safetensors").write_bytes((tmp_path / "zip.pt").read_bytes())
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(path)
    assert not marker.exists()
    # and the proof that the payload is live: unpickling it does run it
    pickle.loads(pickle.dumps(Payload(str(marker))))
    assert marker.exists()


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="Model not found"):
        load_checkpoint(tmp_path / "nope")
    path = build_tiny_model(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match="Upgrade sat"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({**config, "decoder": {**config["decoder"], "decoder_dim": 8}}))
    with pytest.raises(CheckpointError, match="do not match its config"):
        load_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(path)


def test_average_of_checkpoints_is_the_mean_of_their_weights(tmp_path):
    from click.testing import CliRunner

    from sat_cli.cli.main import cli

    a, b = build_tiny_model(tmp_path / "a", seed=0), build_tiny_model(tmp_path / "b", seed=1)
    result = CliRunner().invoke(cli, ["average", str(a), str(b), "--out", str(tmp_path / "avg")])
    assert result.exit_code == 0, result.output
    avg, ca, cb = (load_checkpoint(p) for p in (tmp_path / "avg", a, b))
    for part in ("decoder", "encoder"):  # the tiny models store their encoder: it is averaged too
        sa, sb, sm = (getattr(c, part).state_dict() for c in (ca, cb, avg))
        floats = [k for k in sm if sm[k].is_floating_point()]
        assert floats and any(not torch.equal(sa[k], sb[k]) for k in floats)
        for k in floats:
            torch.testing.assert_close(sm[k], (sa[k] + sb[k]) / 2)
    config = json.loads((tmp_path / "avg" / "config.json").read_text())
    assert [m["fingerprint"] for m in config["training"]["averaged_from"]] == [ca.fingerprint, cb.fingerprint]
    assert avg.fingerprint not in (ca.fingerprint, cb.fingerprint)

    half = CliRunner().invoke(cli, ["average", str(a), str(b), "--out", str(tmp_path / "half"), "--half"])
    assert half.exit_code == 0 and (tmp_path / "half" / "model.safetensors").stat().st_size < (
        tmp_path / "avg" / "model.safetensors").stat().st_size * 0.6


def test_average_refuses_checkpoints_of_different_models(tmp_path):
    from click.testing import CliRunner

    from sat_cli.cli.main import cli

    a = build_tiny_model(tmp_path / "a")
    other = build_tiny_model(tmp_path / "other", words=["a", "dog", "runs"])
    result = CliRunner().invoke(cli, ["average", str(a), str(other), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "differ in their" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()
    one = CliRunner().invoke(cli, ["average", str(a), "--out", str(tmp_path / "x")])
    assert one.exit_code == 2 and "at least two" in one.output


def test_average_accepts_a_config_written_before_the_newer_decoder_fields(tmp_path):
    """The shipped model's config predates `attention`, `hard_inference` and `init_state`; a model
    fine-tuned from it spells out their defaults. Both are one model and average; a real
    difference in one of those fields is still refused."""
    from click.testing import CliRunner

    from sat_cli.cli.main import cli

    old, new = build_tiny_model(tmp_path / "old", seed=0), build_tiny_model(tmp_path / "new", seed=1)
    config = json.loads((old / "config.json").read_text())
    for field in ("attention", "hard_inference", "init_state"):
        config["decoder"].pop(field, None)
    (old / "config.json").write_text(json.dumps(config))
    assert "init_state" in json.loads((new / "config.json").read_text())["decoder"]
    result = CliRunner().invoke(cli, ["average", str(old), str(new), "--out", str(tmp_path / "avg")])
    assert result.exit_code == 0, result.output
    argmax = json.loads((new / "config.json").read_text())
    argmax["decoder"]["hard_inference"] = "argmax"  # same weights, other captions
    (new / "config.json").write_text(json.dumps(argmax))
    refused = CliRunner().invoke(cli, ["average", str(old), str(new), "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "differ in their decoder" in refused.output
