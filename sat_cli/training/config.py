"""The training configuration: the one place where `sat train`'s options and their defaults are
written down (cli/models.py builds its options from these fields, help text included)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

STATE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def opt(default, help: str = "", **cli):
    """A config field with its command-line description: ``help``, and optionally ``choices``,
    ``min``/``max`` (a range), ``flag`` (a boolean switch named ``flag``), ``metavar``, ``cli=False``
    (not an option), ``ints`` (comma-separated integers)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    data: str | None = opt(None, "Captions: Karpathy-split JSON (dataset_coco.json ...), COCO captions_*.json "
                                 "or CSV (image,caption).", file=True, exists=True)
    images: str | None = opt(None, "Image folder (default: the caption file's folder).", folder=True)
    val_data: str | None = opt(None, "Separate validation captions, e.g. captions_val2017.json.", file=True,
                               exists=True)
    val_images: str | None = opt(None, "Image folder of --val-data.", folder=True)
    out: str = opt("runs/sat", "Run folder: best/ and last/ checkpoints, metrics.jsonl, trainer state.", folder=True)
    encoder: str = opt("timm:tf_efficientnet_lite0", "Encoder spec (sat encoders).")
    grid: int | None = opt(None, "Pool the feature map to GRID x GRID (0: native map).", min=0)
    image_size: int | None = opt(None, "Encoder input size (default: the weights' own).", min=32)
    encoder_weights: str | None = opt(None, "Local encoder weights file.", file=True, exists=True)
    feature_layers: list[int] | None = opt(
        None, "timm CNNs: encoder stages that form the grid, comma-separated: 0 (stride 2) .. 4 (stride 32) and -1, "
              "the last feature map (default); several are pooled to the coarsest and concatenated, e.g. 4,-1. "
              "With --init-from, more layers than the starting model reads grow its decoder: the added "
              "channels start at zero weight, so training begins from the same captions.",
        ints=True)
    embed_dim: int = opt(512, "Word embedding size.", min=1)
    attention_dim: int = opt(512, "Size of the attention MLP.", min=1)
    decoder_dim: int = opt(512, "LSTM hidden size.", min=1)
    dropout: float = opt(0.5, "Dropout before the output layer.", min=0.0, max=1.0)
    grid_dim: int = opt(0, "Project the encoder's grid to this many channels once per photo (a learned linear "
                           "map) and attend over the projection: narrower per-word products, faster training and "
                           "captioning. 0: read the grid as the encoder gives it (the paper's decoder).", min=0)
    epochs: int = opt(20, "Epochs in all (on --resume: raise it to train longer).", min=1)
    batch_size: int = opt(32, "Captions per training step.", min=1)
    batching: str = opt("length", "length: captions of similar length from different photos; photo: every caption of a "
                                  "photo in the same batch, so its features are projected once a step (fewer "
                                  "operations, a different recipe: its results are not yet compared with length's).",
                         choices=("length", "photo"))
    lr: float = opt(4e-4, "Decoder learning rate (Adam).")
    weight_decay: float = opt(0.0, "Adam weight decay.")
    fine_tune_encoder: int | None = opt(None, "Train the encoder too from this epoch on (bypasses the feature "
                                              "cache).", min=1, metavar="EPOCH")
    encoder_lr: float = opt(1e-4, "Encoder learning rate when fine-tuning.")
    attention_lambda: float = opt(1.0, "Weight of the doubly stochastic attention regularizer.")
    attention: str = opt("soft", "soft: the context is the attention-weighted mean of the grid; hard: half of the "
                                 "captions read one sampled cell per word, trained with REINFORCE (Xu et al. 2015).",
                         choices=("soft", "hard"))
    hard_reinforce: float = opt(1.0, "Hard attention: weight of the REINFORCE term (lambda_r).")
    hard_entropy: float = opt(0.001, "Hard attention: weight of the entropy bonus on the attention (lambda_e).")
    hard_inference: str = opt("expected", "Hard attention at inference: the expected context or the single most "
                                          "likely cell.", choices=("expected", "argmax"))
    init_state: str = opt("mean", "The LSTM's first state: a projection of the mean feature (the paper's), or "
                                  "zero, so everything the decoder sees comes through its attention.",
                          choices=("mean", "zero"))
    mosaic: float = opt(0.0, "Share of training captions shown inside a 2x2 mosaic of four training photos (their "
                             "features at half size, tiled; the caption's photo in a random quadrant), so the "
                             "decoder learns to look where the words are.", min=0.0, max=1.0)
    mosaic_fill: str = opt("photos", "What fills a mosaic's other three quadrants: other training photos, or blank "
                                     "(mid-grey) tiles, so the caption's photo is the only content to find.",
                           choices=("photos", "blank"))
    attention_boxes: str | None = opt(None, "Person boxes JSON ({\"boxes\": {file name: [[cx, cy, w, h], ...]}}, "
                                            "fractions; e.g. coco/person_boxes.json): the attention of each person "
                                            "word is trained toward its photo's people.", exists=True)
    box_weight: float = opt(1.0, "Weight of the --attention-boxes term.", min=0.0)
    label_smoothing: float = opt(0.0, "Label smoothing of the cross-entropy.", min=0.0, max=1.0)
    grad_clip: float = opt(5.0, "Clip gradients to this norm.")
    min_word_freq: int = opt(5, "Words seen fewer times in the training captions become <unk>.", min=1)
    max_caption_len: int = opt(50, "Longer training captions are cut to this many words.", min=1)
    lr_decay: float = opt(0.5, "Multiply learning rates by this when more than --lr-patience epochs in a row bring "
                               "no improvement.", min=0.0, max=1.0)
    lr_patience: int = opt(2, "Epochs without improvement before the learning rate decays.", min=0)
    early_stop: int = opt(6, "Stop after this many epochs without improvement.", min=1)
    metric: str = opt("CIDEr", "Validation metric that picks the best checkpoint.", choices=METRIC_NAMES)
    beam: int = opt(3, "Beam size for validation.", min=1)
    length_penalty: float = opt(0.0, "Validation decoding: alpha in logprob / length**alpha.")
    val_max_len: int = opt(50, "Validation decoding: most words per caption.", min=1)
    val_fraction: float = opt(0.05, "Share of a COCO/CSV file without splits held out for validation.",
                              min=0.0, max=1.0)
    meteor: bool = opt(True, "Skip METEOR (it needs Java and ~10 s per validation).", flag="no-meteor")
    seed: int = opt(0, "Seeds initialisation, shuffling and dropout.")
    device: str = opt("auto", "auto picks CUDA, then MPS, then the CPU.", choices=("auto", "cpu", "cuda", "mps"))
    precision: str = opt("auto", "Mixed precision on CUDA (auto: bf16 where supported, else fp16 with loss "
                                 "scaling). On the CPU auto is fp32; bf16 runs the decoder's matrix products "
                                 "in bf16 with fp32 accumulation (fast on CPUs with AMX), features stay fp32.",
                         choices=("auto", "fp32", "fp16", "bf16"))
    workers: int | None = opt(None, "Image-decoding worker processes (default: one per spare core, up to 8).", min=0)
    cache_dir: str | None = opt(None, "Feature cache folder (default: $SAT_CACHE_DIR or ~/.cache/sat/features).",
                                folder=True)
    half: bool = opt(False, "Store best/ in float16 (half the size).", flag="half")
    init_from: str | None = opt(None, "Start from this checkpoint's decoder (its encoder, vocabulary and sizes), "
                                      "e.g. to adapt a model to your photos.", exists=True)
    distill_from: str | None = opt(None, "Knowledge distillation: also learn each word's whole predicted distribution "
                                         "from this checkpoint (the teacher), e.g. a strong model into one trained "
                                         "from scratch. The teacher must read the same features (encoder, image size, "
                                         "--feature-layers); the student takes its vocabulary.", exists=True)
    distill_weight: float = opt(0.5, "With --distill-from: share of the word loss that follows the teacher (KL "
                                     "divergence from its distribution); the rest is the cross-entropy with the "
                                     "human caption.", min=0.0, max=1.0)
    scst_from: int | None = opt(None, "From this epoch on, self-critical training: sample captions and follow the "
                                      "CIDEr-D reward.", min=1, metavar="EPOCH")
    scst_samples: int = opt(5, "Captions sampled per image in self-critical training.", min=2)
    scst_lr: float = opt(5e-5, "Learning rate for self-critical training.")
    scst_max_len: int = opt(20, "Most words of a sampled caption in self-critical training.", min=1)
    quiet: bool = opt(False, "No progress bar or tables.", flag="quiet")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def load(cls, run_dir: str | Path) -> "TrainConfig":
        """The configuration a run folder was started with (for --resume)."""
        from ..errors import SatError

        saved = Path(run_dir) / CONFIG_FILE
        if not saved.exists():
            raise SatError(f"{run_dir} is not a sat run folder ({CONFIG_FILE} is missing)")
        data = json.loads(saved.read_text())
        cfg = cls.from_dict(data)
        cfg.out = str(run_dir)
        return cfg


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
