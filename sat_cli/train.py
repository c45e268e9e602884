"""``sat train``: teach the attention decoder to caption, on cached frozen-encoder features
(or with the encoder fine-tuned), validating every epoch by real beam decoding."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .beam import DecodeSettings
from .errors import SatError

STATE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"


@dataclass
class TrainConfig:
    data: str  # caption file: Karpathy JSON, COCO captions JSON or CSV
    images: str | None = None  # image root (default: the caption file's folder)
    val_data: str | None = None  # a separate validation caption file (e.g. captions_val2017.json)
    val_images: str | None = None
    out: str = "runs/sat"  # run folder: best/, last/, metrics.jsonl, trainer_state.pt
    encoder: str = "timm:tf_efficientnet_lite0"
    grid: int | None = None  # pool the encoder's map to grid x grid (None: the encoder's default)
    image_size: int | None = None
    encoder_weights: str | None = None
    feature_layers: list[int] | None = None  # encoder stages that form the grid (None: the last map)
    embed_dim: int = 512
    attention_dim: int = 512
    decoder_dim: int = 512
    dropout: float = 0.5
    epochs: int = 20
    batch_size: int = 32
    lr: float = 4e-4  # decoder learning rate (Adam)
    weight_decay: float = 0.0
    fine_tune_encoder: int | None = None  # from this epoch on (1-based) the encoder trains too
    encoder_lr: float = 1e-4
    attention_lambda: float = 1.0  # doubly stochastic attention regularizer weight
    attention: str = "soft"  # soft | hard (a sampled location, REINFORCE; Xu et al. 2015, 4.1)
    hard_reinforce: float = 1.0  # lambda_r: weight of the REINFORCE term of hard attention
    hard_entropy: float = 0.001  # lambda_e: weight of the entropy bonus of hard attention
    hard_inference: str = "expected"  # hard attention at inference: expected context or argmax cell
    init_state: str = "mean"  # the LSTM's first state: from the mean feature, or zero
    label_smoothing: float = 0.0
    grad_clip: float = 5.0
    min_word_freq: int = 5
    max_caption_len: int = 50  # longer training captions are cut
    lr_decay: float = 0.5  # learning rates are multiplied by this when validation stalls
    lr_patience: int = 2  # epochs without improvement before decaying
    early_stop: int = 6  # epochs without improvement before stopping
    metric: str = "CIDEr"  # picks the best checkpoint
    beam: int = 3  # validation decoding
    length_penalty: float = 0.0
    val_max_len: int = 50
    val_fraction: float = 0.05  # of a COCO/CSV file without splits, held out for validation
    meteor: bool = True
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    cache_dir: str | None = None
    half: bool = False  # store best/ in float16 (half the size)
    init_from: str | None = None  # start from this checkpoint's decoder (its vocabulary and sizes)
    scst_from: int | None = None  # from this epoch on (1-based): self-critical training on CIDEr-D
    scst_samples: int = 5  # captions sampled per image; each one's baseline is the others' mean reward
    scst_lr: float = 5e-5
    scst_max_len: int = 20
    quiet: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class Dist:
    """torchrun's environment: rank, world size, local rank; a no-op on one process."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device):
        if self.world > 1:
            import torch.distributed as td

            if not td.is_initialized():
                td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    def barrier(self):
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool, device) -> bool:
        if self.world == 1:
            return flag
        import torch
        import torch.distributed as td

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        td.all_reduce(t)
        return bool(t.item() > 0)

    def average_gradients(self, params):
        """Mean of the gradients over the ranks, for parameters stepped outside DDP's forward."""
        if self.world == 1:
            return
        import torch.distributed as td

        for p in params:
            if p.grad is not None:
                td.all_reduce(p.grad)
                p.grad /= self.world

    def close(self):
        if self.world > 1:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()


class StopFlag:
    """First Ctrl-C (or SIGTERM) asks for a clean stop at the next step; a second one aborts."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)


def _tensor_captions(entries, vocab, max_len):
    """All training captions as one padded tensor, with lengths and image indices."""
    import torch

    rows, image_index = [], []
    for i, entry in enumerate(entries):
        for tokens in entry.captions:
            if tokens:
                rows.append(vocab.encode(tokens, max_len))
                image_index.append(i)
    longest = max(len(r) for r in rows)
    caps = torch.full((len(rows), longest), vocab.pad, dtype=torch.long)
    for j, r in enumerate(rows):
        caps[j, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    return caps, lengths, torch.tensor(image_index)


def caption_loss(logits, alphas, captions, lengths, attention_lambda, label_smoothing, pad):
    """Cross-entropy over the predicted words plus the attention regularizer; returns (loss, ce).

    logits (N, V): the decoder's predictions at the N non-padding positions of captions[:, 1:].
    """
    import torch.nn.functional as F

    from .model import attention_regularizer

    targets = captions[:, 1 : alphas.shape[1] + 1]
    mask = targets != pad
    ce = F.cross_entropy(logits, targets[mask], label_smoothing=label_smoothing)
    loss = ce + attention_lambda * attention_regularizer(alphas, mask) if attention_lambda else ce
    return loss, ce


def hard_attention_loss(logits, alphas, loc_logp, sampled, captions, pad, baseline: float | None,
                        reinforce: float, entropy: float):
    """The REINFORCE part of hard attention (Xu et al. 2015, eq. 12), per predicted word.

    Rows in ``sampled`` (B,) read a location drawn from alpha at every step, with log-probability
    ``loc_logp`` (B, T); their reward is the caption's mean log-likelihood per word (length-
    normalized, so the moving-average ``baseline`` does not just track caption length). Returns
    (loss term, rewards of the sampled rows): -reinforce * (reward - baseline) * log p(locations)
    - entropy * H(alpha), averaged over the predicted words. A ``baseline`` of None (the first
    batch) stands for the mean reward of this batch.
    """
    import torch
    import torch.nn.functional as F

    targets = captions[:, 1 : alphas.shape[1] + 1]
    mask = targets != pad  # (B, T)
    loglik = torch.zeros(mask.shape, device=logits.device)
    loglik[mask] = -F.cross_entropy(logits.detach(), targets[mask], reduction="none")
    reward = loglik.sum(1) / mask.sum(1).clamp_min(1)  # (B,)
    if baseline is None:
        baseline = float(reward[sampled].mean())
    words = mask & sampled.unsqueeze(1)
    advantage = (reward - baseline) * sampled
    policy = -(advantage.unsqueeze(1) * loc_logp * words).sum()
    ent = -(alphas * alphas.clamp_min(1e-30).log()).sum(-1)  # (B, T)
    bonus = (ent * words).sum()
    n = mask.sum().clamp_min(1)
    return (reinforce * policy - entropy * bonus) / n, reward[sampled]


def fused_adam(device) -> dict:
    """Adam's fused kernel (one pass over all parameters) where this torch has it."""
    import inspect

    import torch

    ok = device.type in ("cpu", "cuda") and "fused" in inspect.signature(torch.optim.Adam).parameters
    return {"fused": True} if ok else {}


def freeze_batchnorm(module):
    from torch import nn

    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.dist = Dist()
        self.out = Path(cfg.out)
        self.log_lines: list[str] = []

    # ---------------------------------------------------------------- setup
    def say(self, message: str):
        if self.dist.main and not self.cfg.quiet:
            from .progress import console

            console.print(message, highlight=False)

    def setup(self):
        import numpy as np
        import torch

        from .datasets import load_captions
        from .devices import keep_freed_memory, resolve_device, resolve_precision
        from .encoders import EncoderOptions, create_encoder
        from .features import FeatureCache
        from .model import Decoder, DecoderConfig
        from .vocab import Vocab

        cfg, dist = self.cfg, self.dist
        device = resolve_device(cfg.device)
        keep_freed_memory()
        if dist.world > 1 and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.precision = resolve_precision(device, cfg.precision, training=True)
        dist.init(device)
        torch.manual_seed(cfg.seed)

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
            self.say(f"[yellow]{len(missing)} image files are missing and left out[/] (first: {missing[0]})")
        if not train:
            raise SatError(f"{cfg.data} has no training images (split 'train' or 'restval')")
        if not val:
            raise SatError(f"{cfg.data} has no validation images: give --val-data or a file with a 'val' split")

        init = None
        if cfg.init_from and not self.resume:
            from .checkpoint import load_checkpoint

            init = load_checkpoint(cfg.init_from)
            enc = init.config["encoder"]
            cfg.encoder, cfg.grid, cfg.image_size = enc["spec"], enc.get("grid"), enc.get("image_size")
            cfg.feature_layers = enc.get("layers")
            d = init.decoder.config
            cfg.embed_dim, cfg.attention_dim, cfg.decoder_dim = d.embed_dim, d.attention_dim, d.decoder_dim
            cfg.attention, cfg.hard_inference, cfg.init_state = d.attention, d.hard_inference, d.init_state
            self.say(f"Starting from {cfg.init_from} ({cfg.encoder}, vocabulary {len(init.vocab)} words)")
        self.encoder = create_encoder(cfg.encoder, EncoderOptions(
            grid=cfg.grid, image_size=cfg.image_size, weights=cfg.encoder_weights,
            layers=tuple(cfg.feature_layers) if cfg.feature_layers else None))
        if init is not None and init.config["encoder"].get("weights") == "checkpoint":
            self.encoder.load_state_dict(init.encoder.state_dict())
        last = self.out / "last"
        if self.resume and (last / "config.json").exists():
            self.vocab = Vocab(json.loads((last / "config.json").read_text())["vocab"])
        elif init is not None:
            self.vocab = init.vocab
        else:
            self.vocab = Vocab.build((c for e in train for c in e.captions), cfg.min_word_freq)

        # features of every image, computed once and cached (the encoder is frozen until fine-tuning)
        self.cache = FeatureCache(self.encoder, cfg.cache_dir)
        paths = sorted({e.path for e in train + val})
        workers = max(1, min(8, (os.cpu_count() or 2) - 1)) if cfg.workers is None else cfg.workers
        self.workers = workers
        shas = {}
        for part in dist.gather(self.cache.build(paths, device, self.precision, workers=workers, quiet=cfg.quiet
                                                 or not dist.main, rank=dist.rank, world=dist.world)):
            shas.update(part)
        unreadable = [p for p in paths if shas.get(p) is None]
        if unreadable:
            self.say(f"[yellow]{len(unreadable)} images could not be read and are left out[/] (first: {unreadable[0]})")
        self.train_entries = [e for e in train if shas.get(e.path)]
        self.val_entries = [e for e in val if shas.get(e.path)]
        self.shas = shas
        self.train_feats = torch.from_numpy(np.stack([self.cache.load(shas[e.path]) for e in self.train_entries]))
        self.val_feats = torch.from_numpy(np.stack([self.cache.load(shas[e.path]) for e in self.val_entries]))
        self.caps, self.lengths, self.image_index = _tensor_captions(self.train_entries, self.vocab, cfg.max_caption_len)

        self.decoder = Decoder(DecoderConfig(
            vocab_size=len(self.vocab), encoder_dim=self.encoder.out_dim, embed_dim=cfg.embed_dim,
            attention_dim=cfg.attention_dim, decoder_dim=cfg.decoder_dim, dropout=cfg.dropout,
            attention=cfg.attention, hard_inference=cfg.hard_inference, init_state=cfg.init_state)).to(device)
        if init is not None:
            self.decoder.load_state_dict(init.decoder.state_dict())
        self.encoder.to(device)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          **fused_adam(device))
        self.encoder_optimizer = None
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=cfg.lr_decay, patience=cfg.lr_patience)
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and self.precision == "fp16" else None
        self.state = {"epoch": 0, "step": 0, "best": -math.inf, "best_epoch": 0, "bad_epochs": 0,
                      "fine_tuning": False, "scst": False, "train_seconds": 0.0, "running": (0.0, 0)}
        self.cider = None
        if self.resume:
            self.load_state()
        self.model = self.decoder
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.decoder, device_ids=[device.index] if device.type == "cuda" else None)

    # ------------------------------------------------------------ state I/O
    def start_fine_tuning(self):
        import torch

        for p in self.encoder.parameters():
            p.requires_grad_(True)
        self.encoder_optimizer = torch.optim.Adam(self.encoder.parameters(), lr=self.cfg.encoder_lr,
                                                  **fused_adam(self.device))
        self.state["fine_tuning"] = True

    def save(self, best: bool = False):
        """Write last/ (and best/) checkpoints and the trainer state, atomically. Rank 0 only."""
        import random

        import numpy as np
        import torch

        from .checkpoint import save_checkpoint

        if not self.dist.main:
            return
        decode = {"beam_size": self.cfg.beam, "length_penalty": self.cfg.length_penalty, "max_len": self.cfg.val_max_len}
        training = {"data": self.cfg.data, "epoch": self.state["epoch"], "best_epoch": self.state["best_epoch"],
                    "metric": self.cfg.metric, "best": self.state["best"], "val_metrics": self.state.get("best_metrics"),
                    "train_images": len(self.train_entries), "train_captions": len(self.caps),
                    "val_images": len(self.val_entries), "train_seconds": round(self.state["train_seconds"], 1),
                    "config": asdict(self.cfg)}
        tuned = self.state["fine_tuning"]
        save_checkpoint(self.out / "last", self.encoder, self.decoder, self.vocab, include_encoder=tuned,
                        decode=decode, training=training)
        if best:
            save_checkpoint(self.out / "best", self.encoder, self.decoder, self.vocab, include_encoder=tuned,
                            decode=decode, training=training, half=self.cfg.half)
        state = {
            **{k: v for k, v in self.state.items() if k != "best_metrics"},
            "best_metrics": json.dumps(self.state.get("best_metrics")),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "encoder_optimizer": self.encoder_optimizer.state_dict() if self.encoder_optimizer else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": json.dumps(random.getstate()),
            "numpy_rng": json.dumps([x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()]),
        }
        tmp = self.out / (STATE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.out / STATE)

    def load_state(self):
        import random

        import numpy as np
        import torch

        from .checkpoint import load_checkpoint

        path = self.out / STATE
        if not path.exists():
            raise SatError(f"Nothing to resume in {self.out}: {STATE} is missing")
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and numbers only, no code
        last = load_checkpoint(self.out / "last")
        self.decoder.load_state_dict(last.decoder.state_dict())
        if state.get("fine_tuning"):
            self.encoder.load_state_dict(last.encoder.state_dict())
            self.start_fine_tuning()
            self.encoder_optimizer.load_state_dict(state["encoder_optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        py = json.loads(state["python_rng"])
        random.setstate((py[0], tuple(py[1]), py[2]))
        npy = json.loads(state["numpy_rng"])
        np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))
        for key in ("epoch", "step", "best", "best_epoch", "bad_epochs", "fine_tuning", "scst", "train_seconds"):
            self.state[key] = state.get(key, False)
        self.state["running"] = tuple(state.get("running", (0.0, 0)))
        self.state["hard_baseline"] = state.get("hard_baseline")
        self.state["best_metrics"] = json.loads(state["best_metrics"])
        self.say(f"Resuming {self.out} at epoch {self.state['epoch'] + 1}, step {self.state['step']}")

    # --------------------------------------------------------------- epochs
    def batches(self, epoch: int) -> list:
        """This rank's batches of caption indices for an epoch.

        DistributedSampler shuffles (seeded by epoch) and shards; then captions of similar length
        are grouped into batches within pools of 50 batches, and the batch order is shuffled, so
        the recurrence runs ~12 steps a batch instead of the longest caption's ~20.
        """
        import random

        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(len(self.caps)), num_replicas=self.dist.world, rank=self.dist.rank,
                                     shuffle=True, seed=self.cfg.seed, drop_last=self.dist.world > 1)
        sampler.set_epoch(epoch)
        order = list(sampler)
        lengths = self.lengths.tolist()
        bs, pool = self.cfg.batch_size, self.cfg.batch_size * 50
        batches = []
        for i in range(0, len(order), pool):
            chunk = sorted(order[i : i + pool], key=lambda j: lengths[j])
            batches += [chunk[k : k + bs] for k in range(0, len(chunk), bs)]
        random.Random(self.cfg.seed * 100003 + epoch).shuffle(batches)
        return batches

    def image_batches(self, batches):
        """Encoder inputs for each batch (fine-tuning: the encoder sees the pixels)."""
        from torch.utils.data import DataLoader

        from .images import ImageFiles, collate

        pre = self.encoder.preprocess
        paths = [e.path for e in self.train_entries]
        index = self.image_index.tolist()
        batch_sampler = [[index[i] for i in b] for b in batches]
        loader = DataLoader(ImageFiles(paths, pre.size, pre.interpolation), batch_sampler=batch_sampler,
                            num_workers=self.workers, collate_fn=collate)
        for items, pixels in loader:
            yield pixels

    def train_epoch(self, epoch: int, stop: StopFlag, progress, task) -> tuple[float, int, bool]:
        import torch
        from torch.nn.utils import clip_grad_norm_

        from .devices import autocast

        if self.state["scst"]:
            return self.scst_epoch(epoch, stop, progress, task)
        cfg, device = self.cfg, self.device
        self.decoder.train()
        tuning = self.state["fine_tuning"]
        if tuning:
            self.encoder.train()
            freeze_batchnorm(self.encoder)
        batches = self.batches(epoch)
        start_step = self.state["step"]
        pixels_iter = self.image_batches(batches[start_step:]) if tuning else None
        total, count = self.state["running"] if start_step else (0.0, 0)  # an interrupted epoch's mean so far
        samples = 0
        world = self.dist.world
        progress.update(task, total=sum(len(b) for b in batches) * world,
                        completed=sum(len(b) for b in batches[:start_step]) * world)
        for step in range(start_step, len(batches)):
            idx = torch.tensor(batches[step])
            lengths = self.lengths[idx]
            order = lengths.argsort(descending=True, stable=True)
            idx, lengths = idx[order], lengths[order]
            caps = self.caps[idx, : int(lengths.max())].to(device, non_blocking=True)
            with autocast(device, self.precision if device.type == "cuda" else "fp32"):
                if tuning:
                    pixels = next(pixels_iter)[order].to(device, non_blocking=True)
                    feats = self.encoder(pixels)
                else:
                    feats = self.train_feats[self.image_index[idx]].to(device, non_blocking=True).float()
                # hard attention: each caption reads sampled locations with probability 0.5, else
                # the expected context (Xu et al. 2015, section 4.1)
                sampled = torch.rand(len(idx)) < 0.5 if cfg.attention == "hard" else None
                if sampled is not None:
                    sampled = sampled.to(device)
                logits, alphas, loc_logp = self.model(feats, caps, lengths.tolist(), sampled)
                loss, ce = caption_loss(logits.float(), alphas.float(), caps, lengths, cfg.attention_lambda,
                                        cfg.label_smoothing, self.vocab.pad)
                if sampled is not None and bool(sampled.any()):
                    baseline = self.state.get("hard_baseline")
                    term, rewards = hard_attention_loss(
                        logits.float(), alphas.float(), loc_logp.float(), sampled, caps, self.vocab.pad,
                        baseline, cfg.hard_reinforce, cfg.hard_entropy)
                    loss = loss + term
                    mean = float(rewards.mean())  # the moving-average baseline b_k = 0.9 b_k-1 + 0.1 reward
                    self.state["hard_baseline"] = mean if baseline is None else 0.9 * baseline + 0.1 * mean
            self.optimizer.zero_grad(set_to_none=True)
            if self.encoder_optimizer:
                self.encoder_optimizer.zero_grad(set_to_none=True)
            params = list(self.decoder.parameters()) + (list(self.encoder.parameters()) if tuning else [])
            if self.scaler:
                self.scaler.scale(loss).backward()
                if tuning:
                    self.dist.average_gradients(self.encoder.parameters())  # DDP wraps the decoder only
                self.scaler.unscale_(self.optimizer)
                if tuning:
                    self.scaler.unscale_(self.encoder_optimizer)
                clip_grad_norm_(params, cfg.grad_clip)
                self.scaler.step(self.optimizer)
                if tuning:
                    self.scaler.step(self.encoder_optimizer)
                self.scaler.update()
            else:
                loss.backward()
                if tuning:
                    self.dist.average_gradients(self.encoder.parameters())  # DDP wraps the decoder only
                clip_grad_norm_(params, cfg.grad_clip)
                self.optimizer.step()
                if tuning:
                    self.encoder_optimizer.step()
            total += float(ce.detach()) * len(idx)
            count += len(idx)
            samples += len(idx) * self.dist.world
            self.state["step"] = step + 1
            self.state["running"] = (total, count)
            progress.update(task, advance=len(idx) * world, status=f"loss {total / count:.3f}")
            if self.dist.any(stop.requested, device):
                return total / max(count, 1), samples, True
        return total / max(count, 1), samples, False

    # ------------------------------------------------- self-critical training
    def start_scst(self):
        self.state["scst"] = True
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.scst_lr

    def scst_epoch(self, epoch: int, stop, progress, task) -> tuple[float, int, bool]:
        """Self-critical sequence training (Rennie et al., 2017): sample captions, reward each with
        CIDEr-D against the image's references (with <end>, against bad endings), baseline = the
        mean reward of the image's other samples, and follow the policy gradient. Returns the mean
        reward instead of a loss."""
        import torch
        from torch.nn.utils import clip_grad_norm_
        from torch.utils.data import DistributedSampler

        from .cider import CiderD

        cfg, device, vocab = self.cfg, self.device, self.vocab
        if self.cider is None:
            self.cider = CiderD([[[*c, "<end>"] for c in e.captions] for e in self.train_entries])
        self.decoder.train()
        sampler = DistributedSampler(range(len(self.train_entries)), num_replicas=self.dist.world,
                                     rank=self.dist.rank, shuffle=True, seed=self.cfg.seed, drop_last=self.dist.world > 1)
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        world = self.dist.world
        progress.update(task, total=len(order) * world, completed=sum(len(b) for b in batches[: self.state["step"]]) * world)
        blocked = torch.tensor([vocab.pad, vocab.start, vocab.unk], device=device)
        K = cfg.scst_samples
        total, count = self.state["running"] if self.state["step"] else (0.0, 0)
        for step in range(self.state["step"], len(batches)):
            images = torch.tensor(batches[step])
            feats = self.train_feats[images].to(device).float()
            B = len(images)
            h, c, enc_proj = self.decoder.init_state(feats)
            h = h.unsqueeze(1).expand(B, K, -1).contiguous()
            c = c.unsqueeze(1).expand(B, K, -1).contiguous()
            tokens = torch.full((B, K), vocab.start, dtype=torch.long, device=device)
            alive = torch.ones(B, K, dtype=torch.bool, device=device)
            logprob = torch.zeros(B, K, device=device)
            words = []
            for _ in range(cfg.scst_max_len):
                logits, h, c, _ = self.decoder.step(feats, enc_proj, tokens, h, c)
                logp = logits.float().index_fill(2, blocked, float("-inf")).log_softmax(-1)
                tokens = torch.multinomial(logp.detach().exp().view(B * K, -1), 1).view(B, K)
                logprob = logprob + logp.gather(2, tokens.unsqueeze(-1)).squeeze(-1) * alive
                words.append(torch.where(alive, tokens, torch.full_like(tokens, vocab.pad)))
                alive = alive & (tokens != vocab.end)
                if not alive.any():
                    break
            sampled = torch.stack(words, dim=2).tolist()  # (B, K, T)
            rewards = torch.tensor([[self.cider.score([*vocab.decode(seq), "<end>"] if vocab.end in seq
                                                      else vocab.decode(seq), int(images[b]))
                                     for seq in sampled[b]] for b in range(B)], device=device)
            baseline = (rewards.sum(1, keepdim=True) - rewards) / (K - 1)
            loss = -((rewards - baseline) * logprob).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.dist.average_gradients(self.decoder.parameters())  # sampled outside DDP's forward
            clip_grad_norm_(self.decoder.parameters(), cfg.grad_clip)
            self.optimizer.step()
            total += float(rewards.mean()) * B
            count += B
            self.state["step"] = step + 1
            self.state["running"] = (total, count)
            progress.update(task, advance=B * world, status=f"reward {total / count:.3f}")
            if self.dist.any(stop.requested, device):
                return total / max(count, 1), count * world, True
        return total / max(count, 1), count * world, False

    # ------------------------------------------------------------ validation
    def validate(self) -> dict:
        """Beam-decode the validation images (rank 0) and score them with pycocoevalcap."""
        import torch

        from .beam import beam_search
        from .devices import autocast
        from .evaluate import best_text

        self.decoder.eval()
        self.encoder.eval()
        settings = DecodeSettings(beam_size=self.cfg.beam, n_best=1, max_len=self.cfg.val_max_len,
                                  length_penalty=self.cfg.length_penalty)
        hyps = {}
        blocked = (self.vocab.pad, self.vocab.start, self.vocab.unk)
        bs = 64
        pixel_iter = None
        if self.state["fine_tuning"]:  # features of the current encoder
            from torch.utils.data import DataLoader

            from .images import ImageFiles, collate

            pre = self.encoder.preprocess
            pixel_iter = iter(DataLoader(ImageFiles([e.path for e in self.val_entries], pre.size, pre.interpolation),
                                         batch_size=bs, num_workers=self.workers, collate_fn=collate))
        for i in range(0, len(self.val_entries), bs):
            if pixel_iter is not None:
                _, pixels = next(pixel_iter)
                with torch.inference_mode(), autocast(self.device, self.precision):
                    feats = self.encoder(pixels.to(self.device)).float()
            else:
                feats = self.val_feats[i : i + bs].to(self.device).float()
            out = beam_search(self.decoder, feats, settings, start=self.vocab.start, end=self.vocab.end,
                              blocked=blocked, attention=False)
            for entry, h in zip(self.val_entries[i : i + bs], out):
                hyps[entry.path] = best_text(h, self.vocab)
        refs = {e.path: e.raw for e in self.val_entries}
        from .metrics import score_captions

        scores = score_captions(refs, hyps, meteor=self.cfg.meteor, warn=self.say)
        self.last_hypotheses = hyps
        return scores

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        import torch

        from .progress import progress_bar

        cfg, dist = self.cfg, self.dist
        self.out.mkdir(parents=True, exist_ok=True)
        if dist.main and not self.resume:
            (self.out / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=1) + "\n")
            (self.out / METRICS_FILE).write_text("")
        self.say(f"Training on {len(self.train_entries)} images / {len(self.caps)} captions, validating on "
                 f"{len(self.val_entries)} images; vocabulary {len(self.vocab)} words; features "
                 f"{tuple(self.train_feats.shape[1:])} from {cfg.encoder}; device {self.device}")
        stopped = False
        with StopFlag() as stop, progress_bar("samples", cfg.quiet or not dist.main) as progress:
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
                loss, samples, stopped = self.train_epoch(epoch, stop, progress, task)
                seconds = time.perf_counter() - started
                if stopped:
                    self.state["train_seconds"] += seconds
                    self.save()
                    break
                row = {"epoch": epoch + 1, ("train_reward" if self.state["scst"] else "train_loss"): round(loss, 4),
                       "lr": self.optimizer.param_groups[0]["lr"],
                       "seconds": round(seconds, 1), "samples_per_s": round(samples / seconds, 1)}
                scores = self.validate() if dist.main else {}
                scores = dist.broadcast(scores)
                row.update({k: round(v, 2) for k, v in scores.items()})
                score = scores.get(cfg.metric, -math.inf)
                self.state["train_seconds"] += time.perf_counter() - started
                improved = score > self.state["best"]
                self.scheduler.step(score)
                if self.encoder_optimizer and self.optimizer.param_groups[0]["lr"] < row["lr"]:
                    for g in self.encoder_optimizer.param_groups:
                        g["lr"] *= cfg.lr_decay
                self.state.update(epoch=epoch + 1, step=0)
                if improved:
                    self.state.update(best=score, best_epoch=epoch + 1, bad_epochs=0, best_metrics=scores)
                else:
                    self.state["bad_epochs"] += 1
                row["best"] = improved
                if dist.main:
                    with open(self.out / METRICS_FILE, "a") as f:
                        f.write(json.dumps(row) + "\n")
                self.save(best=improved)
                what = "reward" if self.state["scst"] else "loss"
                progress.update(task, status=f"{what} {loss:.3f}  {cfg.metric} {score:.1f}" + (" *" if improved else ""))
                if self.state["bad_epochs"] >= cfg.early_stop:
                    self.say(f"Early stop: {cfg.metric} has not improved for {cfg.early_stop} epochs")
                    break
                if self.dist.any(stop.requested, self.device):
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


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    trainer = Trainer(cfg, resume)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.dist.close()
