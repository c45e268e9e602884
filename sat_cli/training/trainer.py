"""The Trainer: data, encoder, feature cache, decoder and optimizers set up once; then epochs
(cross-entropy or self-critical), validation by real beam decoding, checkpoints and resume."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import SatError
from .config import CONFIG_FILE, METRICS_FILE, STATE, TrainConfig


def fused_adam(device) -> dict:
    """Adam's fused kernel (one pass over all parameters) where this torch has it."""
    import inspect

    import torch

    ok = device.type in ("cpu", "cuda") and "fused" in inspect.signature(torch.optim.Adam).parameters
    return {"fused": True} if ok else {}


def split_entries(cfg: TrainConfig, say):
    """(train entries, val entries) from the caption files; missing images reported."""
    from ..evaluation.datasets import load_captions

    data = load_captions(cfg.data, cfg.images, val_fraction=cfg.val_fraction)
    missing = list(data.missing)
    train = data.split("train")
    if cfg.val_data:
        val_data = load_captions(cfg.val_data, cfg.val_images or cfg.images, split="val")
        val = val_data.split("val") or val_data.entries
        missing += val_data.missing
    else:
        val = data.split("val")
    if missing:
        say(f"[yellow]{len(missing)} image files are missing and left out[/] (first: {missing[0]})")
    if not train:
        raise SatError(f"{cfg.data} has no training images (split 'train' or 'restval')")
    if not val:
        raise SatError(f"{cfg.data} has no validation images: give --val-data or a file with a 'val' split")
    return train, val


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        from contextlib import ExitStack

        from ..runtime import Dist

        self.cfg = cfg
        self.resume = resume
        self.dist = Dist()
        self.out = Path(cfg.out)
        self.scopes = ExitStack()  # settings held while training (TF32 off for fp32 on CUDA); close() ends them

    def say(self, message: str):
        if self.dist.main and not self.cfg.quiet:
            from ..progress import console

            console.print(message, highlight=False)

    # ---------------------------------------------------------------- setup
    def setup(self):
        import numpy as np
        import torch

        from ..features import FeatureCache
        from ..model.decoder import Decoder, DecoderConfig
        from ..model.encoders import EncoderOptions, create_encoder
        from ..model.vocab import Vocab
        from ..runtime import default_workers, precision_scope, resolve_device, resolve_precision
        from .data import tensor_captions
        from .schedule import new_state, plateau

        cfg, dist = self.cfg, self.dist
        device = resolve_device(cfg.device, dist.local_rank if dist.world > 1 else None)
        if device.type == "cuda" and dist.world > 1:
            torch.cuda.set_device(device)
        self.device = device
        self.precision = resolve_precision(device, cfg.precision, training=True)
        self.scopes.enter_context(precision_scope(device, self.precision))
        # On the CPU, bf16 means the decoder's matrix products in bf16 (AMX); features stay fp32
        self.products = torch.bfloat16 if device.type == "cpu" and self.precision == "bf16" else None
        self.encode_precision = "fp32" if device.type == "cpu" else self.precision
        dist.init(device)
        torch.manual_seed(cfg.seed)
        train, val = split_entries(cfg, self.say)

        init, grow = None, False
        if cfg.init_from and not self.resume:
            from ..model.checkpoint import load_checkpoint

            init = load_checkpoint(cfg.init_from)
            enc = init.config["encoder"]
            cfg.encoder, cfg.grid, cfg.image_size = enc["spec"], enc.get("grid"), enc.get("image_size")
            # --feature-layers with more layers than the start reads grows its decoder (added channels at 0)
            wanted = list(cfg.feature_layers) if cfg.feature_layers else None
            cfg.feature_layers = enc.get("layers")
            if wanted and wanted != list(cfg.feature_layers or [-1]):
                grow, cfg.feature_layers = True, wanted
            d = init.decoder.config
            cfg.embed_dim, cfg.attention_dim, cfg.decoder_dim = d.embed_dim, d.attention_dim, d.decoder_dim
            cfg.grid_dim = d.grid_dim
            cfg.attention, cfg.hard_inference, cfg.init_state = d.attention, d.hard_inference, d.init_state
            self.say(f"Starting from {cfg.init_from} ({cfg.encoder}, vocabulary {len(init.vocab)} words)")
        self.encoder = create_encoder(cfg.encoder, EncoderOptions(
            grid=cfg.grid, image_size=cfg.image_size, weights=cfg.encoder_weights,
            layers=tuple(cfg.feature_layers) if cfg.feature_layers else None))
        if init is not None and init.config["encoder"].get("weights") == "checkpoint":
            self.encoder.load_state_dict(init.encoder.state_dict())
        teacher = self.load_teacher() if cfg.distill_from else None
        last = self.out / "last"
        if self.resume and (last / "config.json").exists():
            self.vocab = Vocab(json.loads((last / "config.json").read_text())["vocab"])
        elif init is not None:
            if teacher is not None and teacher.vocab.itos != init.vocab.itos:
                raise SatError(f"--distill-from {cfg.distill_from} and --init-from {cfg.init_from} have different "
                               "vocabularies: the student learns the teacher's distribution over its words")
            self.vocab = init.vocab
        elif teacher is not None:
            self.vocab = teacher.vocab
        else:
            self.vocab = Vocab.build((c for e in train for c in e.captions), cfg.min_word_freq)

        # features of every image, computed once and cached (the encoder is frozen until fine-tuning)
        self.cache = FeatureCache(self.encoder, cfg.cache_dir)
        paths = sorted({e.path for e in train + val})
        self.workers = default_workers() if cfg.workers is None else cfg.workers
        shas = {}
        for part in dist.gather(self.cache.build(paths, device, self.encode_precision, workers=self.workers,
                                                 quiet=cfg.quiet or not dist.main, rank=dist.rank, world=dist.world)):
            shas.update(part)
        unreadable = [p for p in paths if shas.get(p) is None]
        if unreadable:
            self.say(f"[yellow]{len(unreadable)} images could not be read and are left out[/] (first: {unreadable[0]})")
        self.train_entries = [e for e in train if shas.get(e.path)]
        self.val_entries = [e for e in val if shas.get(e.path)]
        self.train_feats = torch.from_numpy(np.stack([self.cache.load(shas[e.path]) for e in self.train_entries]))
        self.val_feats = torch.from_numpy(np.stack([self.cache.load(shas[e.path]) for e in self.val_entries]))
        self.caps, self.lengths, self.image_index = tensor_captions(self.train_entries, self.vocab, cfg.max_caption_len)
        if cfg.mosaic:
            self.tile_feats = self.half_size_features(shas)
        self.box_cover = None
        if cfg.attention_boxes:
            from .boxes import load_box_cover, person_ids

            self.box_cover, self.box_has = load_box_cover(cfg.attention_boxes, self.train_entries,
                                                          self.encoder.grid_shape())
            self.person_ids = person_ids(self.vocab)
            self.say(f"Attention supervision: person boxes for {int(self.box_has.sum())} of "
                     f"{len(self.train_entries)} training photos, {len(self.person_ids)} person words")

        self.decoder = Decoder(DecoderConfig(
            vocab_size=len(self.vocab), encoder_dim=self.encoder.out_dim, embed_dim=cfg.embed_dim,
            attention_dim=cfg.attention_dim, decoder_dim=cfg.decoder_dim, dropout=cfg.dropout,
            attention=cfg.attention, hard_inference=cfg.hard_inference, init_state=cfg.init_state,
            grid_dim=cfg.grid_dim)).to(device)
        if grow:
            from ..model.decoder import grow_grid_channels

            try:
                grow_grid_channels(self.decoder, init.decoder.state_dict(), init.encoder.layer_channels(),
                                   self.encoder.layer_channels())
            except ValueError as exc:
                raise SatError(f"--init-from {cfg.init_from} with --feature-layers "
                               f"{','.join(map(str, cfg.feature_layers))}: {exc}") from None
            self.say(f"Grid grown from {init.encoder.out_dim} to {self.encoder.out_dim} channels "
                     f"(layers {','.join(map(str, cfg.feature_layers))}; the added ones start at zero)")
        elif init is not None:
            self.decoder.load_state_dict(init.decoder.state_dict())
        self.teacher = None
        if teacher is not None:
            self.teacher = teacher.decoder.to(device).eval().requires_grad_(False)
            self.say(f"Distilling from {cfg.distill_from} (weight {cfg.distill_weight:g} of the word loss)")
        self.encoder.to(device)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          **fused_adam(device))
        self.encoder_optimizer = None
        self.scheduler = plateau(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and self.precision == "fp16" else None
        self.state = new_state()
        self.cider = None
        if self.resume:
            self.load_state()
        self.model = self.decoder
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.decoder, device_ids=[device.index] if device.type == "cuda" else None)

    def close(self):
        self.scopes.close()
        self.dist.close()

    def load_teacher(self):
        """The --distill-from checkpoint, refused unless it reads the features the student is trained
        on (called once the student's encoder holds its weights, --init-from's included)."""
        import torch

        from ..model.checkpoint import load_checkpoint

        cfg = self.cfg
        teacher = load_checkpoint(cfg.distill_from)
        mine, theirs = self.encoder, teacher.encoder
        differs = [what for what, a, b in (
            ("encoder", mine.spec, theirs.spec), ("image size", mine.preprocess.size, theirs.preprocess.size),
            ("grid", mine.grid_shape(), theirs.grid_shape()), ("feature layers", mine.layer_channels(),
                                                                theirs.layer_channels())) if a != b]
        if not differs:  # a fine-tuned encoder (its own weights in a checkpoint) reads other features
            own, other = mine.state_dict(), theirs.state_dict()
            if own.keys() != other.keys() or not all(torch.equal(v.float(), other[k].float()) for k, v in own.items()):
                differs.append("encoder weights")
        if differs:
            raise SatError(f"--distill-from {cfg.distill_from} reads other features than this run ({', '.join(differs)}"
                           f" differ): train the student with the teacher's encoder, --image-size and "
                           f"--feature-layers ({theirs.spec}, {theirs.preprocess.size[0]} px, layers "
                           f"{','.join(str(i) for i, _ in theirs.layer_channels())})")
        return teacher

    def half_size_features(self, shas: dict):
        """Features of every training image at half the input size (half the grid), the tiles of
        mosaic training, through the same cache; the last row is a blank (mid-grey) image's."""
        import numpy as np
        import torch

        from ..features import FeatureCache
        from ..model.encoders import EncoderOptions, create_encoder

        cfg = self.cfg
        if cfg.fine_tune_encoder:
            raise SatError("--mosaic works on cached features: do not combine it with --fine-tune-encoder")
        size = self.encoder.preprocess.size
        half = create_encoder(cfg.encoder, EncoderOptions(
            grid=cfg.grid // 2 if cfg.grid else None, image_size=size[0] // 2, weights=cfg.encoder_weights,
            layers=tuple(cfg.feature_layers) if cfg.feature_layers else None))
        full_grid, half_grid = self.encoder.grid_shape(), half.grid_shape()
        if full_grid != (2 * half_grid[0], 2 * half_grid[1]) or half_grid[0] != half_grid[1]:
            raise SatError(f"--mosaic needs a square grid that halves with the image size: {full_grid} at "
                           f"{size[0]} px, {half_grid} at {size[0] // 2} px (try an image size divisible by 64)")
        cache = FeatureCache(half, cfg.cache_dir)
        paths = sorted({e.path for e in self.train_entries})
        half_shas = {}
        for part in self.dist.gather(cache.build(paths, self.device, self.encode_precision, workers=self.workers,
                                                 quiet=cfg.quiet or not self.dist.main, rank=self.dist.rank,
                                                 world=self.dist.world)):
            half_shas.update(part)
        tiles = torch.from_numpy(np.stack([cache.load(half_shas[e.path]) for e in self.train_entries]))
        from ..pipeline import encode

        grey = torch.full((1, 3, *half.preprocess.size), 128, dtype=torch.uint8)
        blank = encode(half.to(self.device).eval(), grey, self.device, self.encode_precision).cpu().to(tiles.dtype)
        return torch.cat([tiles, blank])

    def start_fine_tuning(self):
        import torch

        for p in self.encoder.parameters():
            p.requires_grad_(True)
        self.encoder_optimizer = torch.optim.Adam(self.encoder.parameters(), lr=self.cfg.encoder_lr,
                                                  **fused_adam(self.device))
        self.state["fine_tuning"] = True

    def start_scst(self):
        self.state["scst"] = True
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.scst_lr

    # ------------------------------------------------------------ state I/O
    def save(self, best: bool = False):
        """Write last/ (and best/) checkpoints and the trainer state, atomically. Rank 0 only."""
        from ..model.checkpoint import save_checkpoint
        from .state import save_state

        if not self.dist.main:
            return
        cfg = self.cfg
        decode = {"beam_size": cfg.beam, "length_penalty": cfg.length_penalty, "max_len": cfg.val_max_len}
        training = {"data": cfg.data, "epoch": self.state["epoch"], "best_epoch": self.state["best_epoch"],
                    "metric": cfg.metric, "best": self.state["best"], "val_metrics": self.state.get("best_metrics"),
                    "train_images": len(self.train_entries), "train_captions": len(self.caps),
                    "val_images": len(self.val_entries), "train_seconds": round(self.state["train_seconds"], 1),
                    "config": asdict(cfg)}
        tuned = self.state["fine_tuning"]
        save_checkpoint(self.out / "last", self.encoder, self.decoder, self.vocab, include_encoder=tuned,
                        decode=decode, training=training)
        if best:
            save_checkpoint(self.out / "best", self.encoder, self.decoder, self.vocab, include_encoder=tuned,
                            decode=decode, training=training, half=cfg.half)
        save_state(self.out / STATE, self.state, self.optimizer, self.scheduler, self.encoder_optimizer)

    def load_state(self):
        from ..model.checkpoint import load_checkpoint
        from .state import read_state, restore_rng, restored_counters

        path = self.out / STATE
        if not path.exists():
            raise SatError(f"Nothing to resume in {self.out}: {STATE} is missing")
        saved = read_state(path)
        last = load_checkpoint(self.out / "last")
        self.decoder.load_state_dict(last.decoder.state_dict())
        if saved.get("fine_tuning"):
            self.encoder.load_state_dict(last.encoder.state_dict())
            self.start_fine_tuning()
            self.encoder_optimizer.load_state_dict(saved["encoder_optimizer"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        restore_rng(saved)
        self.state.update(restored_counters(saved))
        self.say(f"Resuming {self.out} at epoch {self.state['epoch'] + 1}, step {self.state['step']}")

    # ------------------------------------------------------------ validation
    def validate(self) -> dict:
        """Beam-decode the validation images (rank 0) and score them with pycocoevalcap."""
        from ..evaluation.metrics import score_captions
        from ..model.beam import DecodeSettings
        from ..pipeline import best_text, decode, encode, load_batches

        self.decoder.eval()
        self.encoder.eval()
        settings = DecodeSettings(beam_size=self.cfg.beam, n_best=1, max_len=self.cfg.val_max_len,
                                  length_penalty=self.cfg.length_penalty)
        bs = 64
        if self.state["fine_tuning"]:  # features of the current encoder
            loaded = load_batches([e.path for e in self.val_entries], self.encoder.preprocess, bs, self.workers)
            features = (encode(self.encoder, pixels, self.device, self.encode_precision) for _, pixels in loaded)
        else:
            features = (self.val_feats[i : i + bs].to(self.device).float() for i in range(0, len(self.val_entries), bs))
        hyps = {}
        for i, feats in zip(range(0, len(self.val_entries), bs), features):
            for entry, captions in zip(self.val_entries[i : i + bs], decode(self, feats, settings, attention=False)):
                hyps[entry.path] = best_text(captions)
        refs = {e.path: e.raw for e in self.val_entries}
        scores = score_captions(refs, hyps, meteor=self.cfg.meteor, warn=self.say)
        parts = sorted({e.source for e in self.val_entries if e.source})
        if len(parts) > 1:  # a mixed split: each collection's CIDEr and BLEU-4 too (scored on its own)
            for part in parts:
                ids = {e.path for e in self.val_entries if e.source == part}
                own = score_captions({k: refs[k] for k in ids}, {k: hyps[k] for k in ids}, meteor=False)
                scores.update({f"{m} {part}": own[m] for m in ("CIDEr", "BLEU-4") if m in own})
        self.last_hypotheses = hyps
        return scores

    # ------------------------------------------------------------------ run
    def run(self, stop=None) -> dict:
        """Train until the last epoch or an early stop; ``stop`` (a :class:`~sat_cli.runtime.StopSignal`,
        default: Ctrl-C / SIGTERM) ends it cleanly after saving."""
        from ..progress import progress_bar
        from ..runtime import StopSignal
        from .loop import xent_epoch
        from .schedule import end_epoch, should_stop
        from .scst import scst_epoch

        cfg, dist = self.cfg, self.dist
        self.out.mkdir(parents=True, exist_ok=True)
        if dist.main and not self.resume:
            (self.out / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=1) + "\n")
            (self.out / METRICS_FILE).write_text("")
        self.say(f"Training on {len(self.train_entries)} images / {len(self.caps)} captions, validating on "
                 f"{len(self.val_entries)} images; vocabulary {len(self.vocab)} words; features "
                 f"{tuple(self.train_feats.shape[1:])} from {cfg.encoder}; device {self.device}")
        stopped = False
        with (stop or StopSignal()) as stop, progress_bar("samples", cfg.quiet or not dist.main) as progress:
            while self.state["epoch"] < cfg.epochs:
                epoch = self.state["epoch"]
                if cfg.fine_tune_encoder and epoch + 1 >= cfg.fine_tune_encoder and not self.state["fine_tuning"]:
                    self.start_fine_tuning()
                    self.say(f"Fine-tuning the encoder from epoch {epoch + 1} (lr {cfg.encoder_lr})")
                if cfg.scst_from and epoch + 1 >= cfg.scst_from and not self.state["scst"]:
                    if self.state["fine_tuning"]:
                        raise SatError("Self-critical training runs on cached features: do not combine it with "
                                       "--fine-tune-encoder")
                    self.start_scst()
                    self.say(f"Self-critical training on CIDEr-D from epoch {epoch + 1} (lr {cfg.scst_lr})")
                task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=None, status="")
                started = time.perf_counter()
                loss, samples, stopped = (scst_epoch if self.state["scst"] else xent_epoch)(
                    self, epoch, stop, progress, task)
                seconds = time.perf_counter() - started
                if stopped:
                    self.state["train_seconds"] += seconds
                    self.save()
                    break
                row = {"epoch": epoch + 1, ("train_reward" if self.state["scst"] else "train_loss"): round(loss, 4),
                       "lr": self.optimizer.param_groups[0]["lr"],
                       "seconds": round(seconds, 1), "samples_per_s": round(samples / seconds, 1)}
                scores = dist.broadcast(self.validate() if dist.main else {})
                row.update({k: round(v, 2) for k, v in scores.items()})
                self.state["train_seconds"] += time.perf_counter() - started
                improved = end_epoch(self.state, self.scheduler, self.optimizer, self.encoder_optimizer, cfg, epoch,
                                     scores)
                row["best"] = improved
                if dist.main:
                    with open(self.out / METRICS_FILE, "a") as f:
                        f.write(json.dumps(row) + "\n")
                self.save(best=improved)
                what = "reward" if self.state["scst"] else "loss"
                progress.update(task, status=f"{what} {loss:.3f}  {cfg.metric} "
                                             f"{scores.get(cfg.metric, float('-inf')):.1f}" + (" *" if improved else ""))
                if should_stop(self.state, cfg):
                    self.say(f"Early stop: {cfg.metric} has not improved for {cfg.early_stop} epochs")
                    break
                if dist.any(stop.requested, self.device):
                    stopped = True
                    break
        summary = {"out": str(self.out), "stopped": stopped, **self.state}
        summary.pop("fine_tuning", None)
        if dist.world > 1:  # proof that DDP kept the replicas identical
            checksum = float(sum(p.double().sum() for p in self.decoder.parameters()))
            summary["rank_checksums"] = dist.gather(checksum)
            if dist.main:
                (self.out / "ranks.json").write_text(json.dumps(summary["rank_checksums"]))
        return summary
