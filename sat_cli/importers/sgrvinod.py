"""`sat import sgrvinod`: a checkpoint of sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning
(train.py's ``BEST_checkpoint_*.pth.tar`` with its ``WORDMAP_*.json``) as a sat checkpoint.

His train.py saves whole module objects (``models.Encoder``, ``models.DecoderWithAttention``)
and Adam optimizers with torch.save; they are read with inert stand-ins (see ``unpickle``) and
only their tensors are kept. What his code does, and what the sat checkpoint records so that
`sat caption --model DIR` writes his captions:

- encoder: torchvision ResNet-101 without its last two children, then adaptive average pooling
  to 14x14 (B, 14, 14, 2048), flattened row-major -> ``torchvision:resnet101`` with grid 14, his
  (possibly fine-tuned) weights stored in the checkpoint.
- preprocessing (caption.py): the whole image resized to 256x256 by scipy's ``imresize``
  (PIL bilinear), divided by 255, ImageNet mean and std.
- decoder: sat's Decoder computes the same thing (attention MLP, sigmoid gate on the context,
  LSTMCell over [embedding, context], dropout then fc); his LSTMCell is named ``decode_step``.
- word map: ``<pad>`` 0, words from 1, then ``<unk>``, ``<start>``, ``<end>``; sat keeps the four
  specials first, so the rows of the embedding and of the output layer are permuted.
- beam search (caption.py, eval.py): beam 5 (his README's best row), no token blocked, at most
  51 steps (a finished caption has at most 50 words), the best finished caption by summed
  log-probability.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, SatError
from ..model.encoders import EncoderOptions, Preprocess
from ..model.vocab import PAD, SPECIALS, Vocab
from .unpickle import fields, load_restricted, module_tensors, origin

REPOSITORY = "sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning"
NN = "torch.nn.modules."
CLASSES = (
    "models.Encoder", "models.DecoderWithAttention", "models.Attention",
    *(NN + n for n in ("container.Sequential", "conv.Conv2d", "batchnorm.BatchNorm2d", "activation.ReLU",
                       "pooling.MaxPool2d", "pooling.AdaptiveAvgPool2d", "linear.Linear", "sparse.Embedding",
                       "dropout.Dropout", "rnn.LSTMCell", "activation.Sigmoid", "activation.Softmax")),
    "torchvision.models.resnet.Bottleneck", "torch.optim.adam.Adam",
)
DEPTHS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101", (3, 8, 36, 3): "resnet152"}  # blocks per stage
PREPROCESS = Preprocess(size=(256, 256), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                        interpolation="bilinear")
# His loop stops after step 51; sat's max_len counts steps the same way (words + <end>).
DECODE = {"beam_size": 5, "max_len": 51, "length_penalty": 0.0, "block_specials": False}


@dataclass
class Imported:
    path: Path
    encoder_spec: str
    grid: int
    vocab_size: int
    epoch: int | None
    bleu4: float | None
    fine_tuned: bool  # the checkpoint holds an encoder optimizer: his encoder was being fine-tuned


def read_word_map(path: str | Path) -> list[str]:
    """His ``WORDMAP_*.json`` ({word: id}) as the list of words by id, checked."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Cannot read the word map {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(w, str) and type(i) is int for w, i in data.items()):
        raise CheckpointError(f"{path} is not a word map (a JSON object of word -> integer id)")
    if sorted(data.values()) != list(range(len(data))):
        raise CheckpointError(f"The ids in {path} are not 0..{len(data) - 1}, each used once")
    missing = [s for s in SPECIALS if s not in data]
    if missing or data[PAD] != 0:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}" if missing else f"{path}: <pad> is not id 0")
    words = [""] * len(data)
    for word, i in data.items():
        words[i] = word
    return words


def sat_vocab(his_words: list[str]) -> tuple[Vocab, list[int]]:
    """sat's vocabulary (specials first, then his words in his order) and his id of each sat id."""
    his_id = {w: i for i, w in enumerate(his_words)}
    itos = [*SPECIALS, *(w for w in his_words if w not in SPECIALS)]
    return Vocab(itos), [his_id[w] for w in itos]


def _module(obj, expected: str, where: str):
    if origin(obj) != expected:
        found = origin(obj) or type(obj).__name__
        raise CheckpointError(f"{where} is {found}, not {expected}: not a checkpoint of {REPOSITORY}")
    return fields(obj).get("_modules") or {}


def build_encoder(enc, source: str):
    """His ``models.Encoder`` stand-in -> sat's torchvision encoder with his weights."""
    import torch

    from ..model.backbone import load_into
    from ..model.encoders import create_encoder

    seq = NN + "container.Sequential"
    parts = _module(enc, "models.Encoder", "checkpoint['encoder']")
    stages = _module(parts.get("resnet"), seq, "encoder.resnet")
    _module(parts.get("adaptive_pool"), NN + "pooling.AdaptiveAvgPool2d", "encoder.adaptive_pool")
    if list(stages) != [str(i) for i in range(8)]:
        raise CheckpointError(f"encoder.resnet has {len(stages)} children, not the 8 of a ResNet "
                              "without avgpool and fc")
    blocks = tuple(len(_module(stages[str(i)], seq, f"encoder.resnet.{i}")) for i in (4, 5, 6, 7))
    if blocks not in DEPTHS:
        raise CheckpointError(f"encoder.resnet has {blocks} blocks per stage: not a ResNet-50/101/152")
    size = fields(parts["adaptive_pool"]).get("output_size")
    size = (size, size) if type(size) is int else tuple(size) if isinstance(size, (tuple, list)) else None
    if not size or len(size) != 2 or size[0] != size[1] or type(size[0]) is not int:
        raise CheckpointError(f"encoder.adaptive_pool pools to {size}; sat needs a square grid")
    spec = f"torchvision:{DEPTHS[blocks]}"
    encoder = create_encoder(spec, EncoderOptions(grid=size[0], image_size=PREPROCESS.size[0], pretrained=False))
    encoder.set_preprocess(PREPROCESS)
    state = {f"backbone.{k}": v.float() if v.is_floating_point() else v
             for k, v in module_tensors(parts["resnet"]).items()}
    own = encoder.state_dict()
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in state:  # PyTorch 0.4.0 had no such buffer
            state[key] = torch.zeros_like(value)
        elif key in state and state[key].shape != value.shape:
            raise CheckpointError(f"encoder weight {key[9:]} has shape {tuple(state[key].shape)}, "
                                  f"{spec} has {tuple(value.shape)}")
    load_into(encoder, state, source)
    return encoder.eval()


def build_decoder(dec, his_ids: list[int], encoder_dim: int):
    """His ``models.DecoderWithAttention`` stand-in -> sat's Decoder, rows in sat's word order."""
    import torch

    from ..model.decoder import Decoder, DecoderConfig

    parts = _module(dec, "models.DecoderWithAttention", "checkpoint['decoder']")
    _module(parts.get("attention"), "models.Attention", "decoder.attention")
    state = {k.replace("decode_step.", "lstm.", 1) if k.startswith("decode_step.") else k: v.float()
             for k, v in module_tensors(dec).items()}
    try:
        (V, E), (D, A) = state["embedding.weight"].shape, state["attention.decoder_att.weight"].shape[::-1]
        C = state["attention.encoder_att.weight"].shape[1]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"the decoder lacks the weights of {REPOSITORY}'s DecoderWithAttention ({exc})") from None
    if V != len(his_ids):
        raise CheckpointError(f"the word map has {len(his_ids)} entries but the decoder has {V} words: "
                              "use the WORDMAP_*.json the model was trained with")
    if C != encoder_dim:
        raise CheckpointError(f"the decoder reads {C}-channel features, the encoder gives {encoder_dim}")
    dropout = fields(parts.get("dropout")).get("p", 0.5)
    config = DecoderConfig(vocab_size=V, encoder_dim=C, embed_dim=E, attention_dim=A, decoder_dim=D,
                           dropout=float(dropout) if isinstance(dropout, (int, float)) else 0.5)
    order = torch.tensor(his_ids)
    for key in ("embedding.weight", "fc.weight", "fc.bias"):
        if key in state:
            state[key] = state[key][order]
    decoder = Decoder(config)
    try:
        decoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the decoder's weights do not fit sat's decoder: {exc}") from None
    return decoder.eval()


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def import_sgrvinod(checkpoint: str | Path, word_map: str | Path, out: str | Path, *, half: bool = False) -> Imported:
    """Convert his checkpoint and word map into the sat checkpoint folder ``out``. Nothing in the
    file is run: see :func:`~sat_cli.importers.unpickle.load_restricted`."""
    from ..model.checkpoint import save_checkpoint

    checkpoint, word_map = Path(checkpoint), Path(word_map)
    vocab, his_ids = sat_vocab(read_word_map(word_map))
    ck = load_restricted(checkpoint, CLASSES)
    if not isinstance(ck, dict) or "encoder" not in ck or "decoder" not in ck:
        raise CheckpointError(f"{checkpoint} has no 'encoder' and 'decoder' entries: not a checkpoint of {REPOSITORY}")
    try:
        encoder = build_encoder(ck["encoder"], str(checkpoint))
    except SatError as exc:
        raise CheckpointError(f"{checkpoint}: {exc}") from exc
    decoder = build_decoder(ck["decoder"], his_ids, encoder.out_dim)
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    fine_tuned = ck.get("encoder_optimizer") is not None
    training = {
        "imported_from": REPOSITORY, "checkpoint": checkpoint.name, "checkpoint_sha256": digest.hexdigest(),
        "word_map": word_map.name, "epoch": _number(ck.get("epoch")), "bleu-4": _number(ck.get("bleu-4")),
        "epochs_since_improvement": _number(ck.get("epochs_since_improvement")), "encoder_fine_tuned": fine_tuned,
    }
    path = save_checkpoint(out, encoder, decoder, vocab, include_encoder=True, decode=dict(DECODE),
                           training=training, half=half)
    return Imported(path, encoder.spec, encoder.grid, len(vocab), training["epoch"], training["bleu-4"], fine_tuned)
