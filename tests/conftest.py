import os
from pathlib import Path

import pytest



def pytest_configure(config):
    # Third-party plugins installed in this environment must not change what the tests see.
    os.environ["SAT_NO_ENTRYPOINTS"] = "1"

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SHARED_DATA = ROOT.parent / "shared" / "data"
WORDS = ["a", "dog", "cat", "on", "the", "grass", "man", "red", "with", "ball", "sitting", "table"]


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's torch hub or Hugging Face caches, or reaches the network."""
    home = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def build_tiny_model(out: Path, spec="timm:test_efficientnet", image_size=64, seed=0, grid=None, words=WORDS,
                     decode=None, end_bias=0.0):
    """A small checkpoint with random weights (encoder included) for fast CPU tests."""
    import torch

    from sat_cli.model.checkpoint import save_checkpoint
    from sat_cli.model.decoder import Decoder, DecoderConfig
    from sat_cli.model.encoders import EncoderOptions, create_encoder
    from sat_cli.model.vocab import SPECIALS, Vocab

    torch.manual_seed(seed)
    encoder = create_encoder(spec, EncoderOptions(pretrained=False, image_size=image_size, grid=grid))
    vocab = Vocab([*SPECIALS, *words])
    decoder = Decoder(DecoderConfig(vocab_size=len(vocab), encoder_dim=encoder.out_dim, embed_dim=16,
                                    attention_dim=16, decoder_dim=32, dropout=0.0))
    if end_bias:
        with torch.no_grad():
            decoder.fc.bias[vocab.end] += end_bias
    save_checkpoint(out, encoder, decoder, vocab, include_encoder=True, decode=decode or {"max_len": 12})
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")  # 1-2 word captions


@pytest.fixture
def photos(tmp_path):
    """A folder with the example photos, one in a subfolder, plus a hidden file."""
    import shutil

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        shutil.copy(EXAMPLES / name, folder / name)
    shutil.copy(EXAMPLES / "astronaut.png", folder / "sub" / "astronaut.png")
    shutil.copy(EXAMPLES / "camera.png", folder / ".hidden.png")
    return folder


def shared_images(n: int, split: str | None = None):
    """Paths of the first n real photos of ../shared/data (skips the test when absent)."""
    import json

    index = SHARED_DATA / "captions.json"
    if not index.exists():
        pytest.skip("../shared/data is not present")
    images = json.loads(index.read_text())["images"]
    chosen = [im for im in images if split is None or im["split"] == split][:n]
    return [SHARED_DATA / im["filepath"] / im["filename"] for im in chosen]



def as_nobody() -> list[str]:
    """A command prefix that runs a child as an unprivileged user (root reads and writes
    everything, so tests of permissions need another user); [] when not root."""
    import shutil

    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot drop privileges to test permissions")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def rows(db, sql, *params) -> list[dict]:
    """Rows of a database file as another program sees them: a fresh sqlite3 connection."""
    import sqlite3

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()
