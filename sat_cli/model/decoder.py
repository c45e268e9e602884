"""The Show, Attend and Tell decoder: soft attention + gate + LSTM, one word per step."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderConfig:
    vocab_size: int  # words, the four special tokens included
    encoder_dim: int  # C, channels of the encoder's feature grid
    embed_dim: int = 512  # word embedding size
    attention_dim: int = 512  # size of the attention MLP
    decoder_dim: int = 512  # LSTM hidden size
    dropout: float = 0.5  # before the output layer
    # soft: the context is the alpha-weighted mean of the grid (deterministic attention);
    # hard: trained with a sampled location (Xu et al. 2015, section 4.1). Both store alpha as the maps.
    attention: str = "soft"
    # Hard-attention models at inference: "expected" (the alpha-weighted mean, as soft attention
    # and as half of the hard model's training steps) or "argmax" (the single most likely cell).
    hard_inference: str = "expected"
    # The LSTM's first state: "mean" (a projection of the mean feature, as in the paper) or "zero"
    # (all visual information has to come through the attention).
    init_state: str = "mean"
    # Project the grid's C channels to this many once per photo (a learned linear map) and attend
    # over, read and gate the projection: the per-word products shrink from C to grid_dim wide.
    # 0: the grid as the encoder gives it (the paper's decoder).
    grid_dim: int = 0

    def __post_init__(self):
        if self.grid_dim < 0:
            raise ValueError(f"grid_dim must be 0 (none) or a width, not {self.grid_dim}")
        if self.init_state not in ("mean", "zero"):
            raise ValueError(f"init_state must be mean or zero, not {self.init_state!r}")
        if self.attention not in ("soft", "hard"):
            raise ValueError(f"attention must be soft or hard, not {self.attention!r}")
        if self.hard_inference not in ("expected", "argmax"):
            raise ValueError(f"hard_inference must be expected or argmax, not {self.hard_inference!r}")

    @property
    def width(self) -> int:
        """Channels of the grid the attention reads: grid_dim, or the encoder's own C."""
        return self.grid_dim or self.encoder_dim

    @property
    def argmax_context(self) -> bool:
        """True when inference reads the single most likely cell instead of the expected context."""
        return self.attention == "hard" and self.hard_inference == "argmax"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DecoderConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def pick_cells(features, index):
    """features (B, P, C), index (B, K) grid cells -> (B, K, C): each hypothesis's chosen cell."""
    B, K = index.shape
    return features.gather(1, index.unsqueeze(-1).expand(B, K, features.shape[-1]))


class Attention(nn.Module):
    """Soft attention: an MLP over the encoder projection plus the hidden-state projection."""

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder side, computed once per image: (B, P, C) -> (B, P, A)."""
        return self.encoder_att(features)

    def forward(self, features, enc_proj, h):
        # features (B, P, C), enc_proj (B, P, A), h (B, K, D): K hypotheses per image
        e = self.full_att(F.relu(enc_proj.unsqueeze(1) + self.decoder_att(h).unsqueeze(2)))  # (B, K, P, 1)
        alpha = e.squeeze(-1).softmax(dim=-1)  # (B, K, P)
        context = torch.bmm(alpha, features)  # (B, K, C)
        return context, alpha


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim)
        if c.grid_dim:
            self.grid_proj = nn.Linear(c.encoder_dim, c.grid_dim)
            # a random projection that keeps the grid's scale (nn.Linear's default init shrinks it ~3x)
            nn.init.normal_(self.grid_proj.weight, std=c.encoder_dim ** -0.5)
            nn.init.zeros_(self.grid_proj.bias)
        self.attention = Attention(c.width, c.decoder_dim, c.attention_dim)
        if c.init_state == "mean":
            self.init_h = nn.Linear(c.width, c.decoder_dim)
            self.init_c = nn.Linear(c.width, c.decoder_dim)
        self.f_beta = nn.Linear(c.decoder_dim, c.width)  # gating scalar per channel
        self.lstm = nn.LSTMCell(c.embed_dim + c.width, c.decoder_dim)
        self.dropout = nn.Dropout(c.dropout)
        self.fc = nn.Linear(c.decoder_dim, c.vocab_size)

    def prepare(self, features, products=None):
        """The encoder's grid (B, P, C) -> the grid the decoder reads (B, P, width): projected once
        per photo when ``grid_dim`` is set, else unchanged. Every caller of ``init_state`` and
        ``step`` passes the prepared grid; ``forward`` prepares its own."""
        if not self.config.grid_dim:
            return features
        from .teacher import linear

        return linear(features, self.grid_proj.weight, self.grid_proj.bias, products)

    def init_state(self, features):
        """features (B, P, C), prepared (:meth:`prepare`) -> h, c (B, D) from the mean feature (or zeros), and the encoder projection."""
        if self.config.init_state == "zero":
            h = features.new_zeros(features.shape[0], self.config.decoder_dim)
            return h, h, self.attention.project(features)
        mean = features.mean(dim=1)
        return self.init_h(mean), self.init_c(mean), self.attention.project(features)

    def advance(self, features, enc_proj, emb, h, c, sample=None):
        """The recurrence without the output layer.

        features (B, P, C), enc_proj (B, P, A), emb (B, K, E) embedded previous words,
        h and c (B, K, D) -> h, c (B, K, D), alpha (B, K, P), and the log-probability (B, K)
        of the sampled locations (None unless ``sample``).

        ``sample`` (B,) bool, hard-attention training: those rows read one grid cell drawn from
        alpha instead of the expected context (the others keep the expected context).
        """
        B, K = emb.shape[:2]
        context, alpha = self.attention(features, enc_proj, h)  # (B, K, C), (B, K, P)
        loc_logp = None
        if sample is not None:
            loc = torch.multinomial(alpha.detach().reshape(B * K, -1), 1).view(B, K)
            context = torch.where(sample.view(B, 1, 1), pick_cells(features, loc), context)
            loc_logp = alpha.gather(2, loc.unsqueeze(-1)).squeeze(-1).clamp_min(1e-30).log()  # (B, K)
        elif self.config.argmax_context:
            context = pick_cells(features, alpha.argmax(dim=-1))
        context = torch.sigmoid(self.f_beta(h)) * context  # beta gate
        x = torch.cat([emb, context], dim=-1).reshape(B * K, -1)
        h, c = self.lstm(x, (h.reshape(B * K, -1), c.reshape(B * K, -1)))
        return h.view(B, K, -1), c.view(B, K, -1), alpha, loc_logp

    def step(self, features, enc_proj, tokens, h, c):
        """One word for K hypotheses per image.

        features (B, P, C), enc_proj (B, P, A), tokens (B, K), h and c (B, K, D)
        -> logits (B, K, V), h, c (B, K, D), alpha (B, K, P)
        """
        h, c, alpha, _ = self.advance(features, enc_proj, self.embedding(tokens), h, c)
        return self.fc(self.dropout(h)), h, c, alpha

    def forward(self, features, captions, lengths=None, sample=None, photo=None, products=None):
        """Teacher forcing. features (B, P, C), the encoder's grid; captions (B, T) starting with <start>.

        ``photo`` (B,) long: caption b describes photo ``photo[b]`` of features (I, P, C); the
        photo's grid is then projected once for all its captions (default: one photo a caption).

        ``lengths`` (caption lengths with <start> and <end>, sorted longest first) lets the batch
        shrink as captions end, so padding costs nothing. Returns the logits of the predicted
        positions only, (N, V) in row-major order of captions[:, 1:] (N = sum of lengths - 1),
        alphas (B, T-1, P), zero past a caption's end, and for hard-attention training
        (``sample``: (B,) bool, the rows that read sampled locations) the log-probability of each
        sampled location (B, T-1), else None. The output layer runs once, on all positions
        together, after the recurrence. ``products`` (soft attention): None, or torch.bfloat16 for
        the matrix products of teacher forcing and the output layer (fp32 accumulation; see
        :mod:`sat_cli.model.teacher`).
        """
        B, T = captions.shape
        steps = [T - 1] * B if lengths is None else [int(n) - 1 for n in lengths]
        T1 = max(steps)
        teacher = sample is None and self.config.attention == "soft" and steps == sorted(steps, reverse=True)
        if not teacher:
            products = None  # the step-by-step reference stays fp32
        features = self.prepare(features, products)  # once per photo
        if teacher:
            from .teacher import teacher_forcing

            hs, alphas = teacher_forcing(self, features, captions, steps, photo, products)
            loc_logps = None
        else:
            if photo is not None:
                features = features[photo]
            hs, alphas, loc_logps = self.stepwise(features, captions, steps, sample)
        mask = torch.arange(T1, device=captions.device).unsqueeze(0) < torch.tensor(steps, device=captions.device).unsqueeze(1)
        from .teacher import linear

        return linear(self.dropout(hs[mask]), self.fc.weight, self.fc.bias, products), alphas, loc_logps

    def stepwise(self, features, captions, steps: list[int], sample=None):
        """(features prepared) Teacher forcing one ``advance`` at a time (hard attention; the reference for
        :func:`sat_cli.model.teacher.teacher_forcing`): -> hs (B, T1, D), alphas (B, T1, P), loc_logps."""
        B, T1 = features.shape[0], max(steps)
        h, c, enc_proj = self.init_state(features)
        h, c = h.unsqueeze(1), c.unsqueeze(1)  # (B, 1, D)
        emb = self.embedding(captions[:, :T1])  # (B, T1, E)
        hs = features.new_zeros(B, T1, self.config.decoder_dim)
        alphas = features.new_zeros(B, T1, features.shape[1])
        loc_logps = features.new_zeros(B, T1) if sample is not None else None
        for t in range(T1):
            n = sum(1 for s in steps if s > t)  # rows still going (sorted longest first)
            h, c, alpha, loc_logp = self.advance(features[:n], enc_proj[:n], emb[:n, t : t + 1], h[:n], c[:n],
                                                 None if sample is None else sample[:n])
            hs[:n, t] = h[:, 0]
            alphas[:n, t] = alpha[:, 0]
            if loc_logp is not None:
                loc_logps[:n, t] = loc_logp[:, 0]
        return hs, alphas, loc_logps


def grow_grid_channels(decoder: Decoder, state: dict, old_blocks: list[tuple[int, int]],
                       new_blocks: list[tuple[int, int]]) -> None:
    """Load ``state``, a decoder trained on a grid of ``old_blocks`` ((layer, channels) of the
    encoder, in order), into ``decoder``, built for the wider grid of ``new_blocks``: each old
    channel keeps its weights at its new place, the added channels start at zero (so the grown
    decoder writes exactly what the old one wrote, and training teaches it to read them). Every
    old layer must be among the new ones, with the same channels."""
    import torch

    placed = {}
    offset = 0
    for layer, channels in new_blocks:
        placed[layer] = (offset, channels)
        offset += channels
    columns = []  # the new place of each old channel
    for layer, channels in old_blocks:
        if placed.get(layer, (0, None))[1] != channels:
            raise ValueError(f"the starting model reads layer {layer} ({channels} channels), which the new "
                             f"grid ({', '.join(str(k) for k, _ in new_blocks)}) does not hold as such")
        start = placed[layer][0]
        columns.extend(range(start, start + channels))
    old_dim, new_dim = sum(c for _, c in old_blocks), offset
    embed = decoder.config.embed_dim
    grown = decoder.state_dict()
    for name, target in grown.items():
        value = state[name]
        if value.shape == target.shape:
            grown[name] = value
            continue
        dims = [d for d, (a, b) in enumerate(zip(value.shape, target.shape)) if a != b]
        base = embed if name == "lstm.weight_ih" else 0  # the LSTM reads [word embedding, context]
        if len(dims) != 1 or value.shape[dims[0]] != base + old_dim or target.shape[dims[0]] != base + new_dim:
            raise ValueError(f"{name}: cannot grow {tuple(value.shape)} to {tuple(target.shape)}")
        index = torch.tensor(list(range(base)) + [base + c for c in columns])
        grown[name] = torch.zeros_like(target).index_copy_(dims[0], index, value.to(target.dtype))
    decoder.load_state_dict(grown)


def attention_regularizer(alphas, mask):
    """Doubly stochastic attention: sum over pixels of (1 - sum over steps of alpha)^2, batch mean.

    alphas (B, T, P); mask (B, T) true where a word is predicted.
    """
    coverage = (alphas * mask.unsqueeze(-1)).sum(dim=1)  # (B, P)
    return ((1.0 - coverage) ** 2).sum(dim=1).mean()


class InferenceStep:
    """``Decoder.step`` rearranged for decoding without gradients (dropout off): the same
    arithmetic, up to float rounding, in fewer and larger operations.

    - The three projections of h (LSTM hidden gates, beta gate, attention) are one matrix product.
    - On the CPU the attention energy relu(enc_proj + W h) . w is computed in slices of grid
      positions that stay in the cache, into one reused buffer, instead of materializing a
      (B, K, P, A) tensor at every step (tens of MB at batch 64, written and read three times).
    - When the caller expects more hypothesis-steps than there are words, the embedding's share of
      the LSTM input gates becomes a table with one row per word (both LSTM biases folded in): a
      row lookup instead of a matrix product at every step.

    Build one per decoding call, from the weights as they are then: nothing is cached across
    calls (fused optimizers update weights in place without bumping their version counters).
    """

    SLICE_FLOATS = 1 << 19  # CPU attention-energy slice: 2 MB of float32 (best of 0.25-4 MB measured on a 2-core Xeon)

    def __init__(self, decoder: Decoder, expected_steps: int = 0):
        c = decoder.config
        E, D, C = c.embed_dim, c.decoder_dim, c.width
        lstm, att = decoder.lstm, decoder.attention
        w_ih = lstm.weight_ih  # (4D, E + C)
        self.table = expected_steps > c.vocab_size
        if self.table:
            self.word_gates = F.linear(decoder.embedding.weight, w_ih[:, :E], lstm.bias_ih + lstm.bias_hh)  # (V, 4D)
            self.w_context = w_ih[:, E:]  # (4D, C), a strided view: BLAS takes it without a copy
        else:
            self.embedding, self.w_ih, self.b_ih = decoder.embedding, w_ih, lstm.bias_ih + lstm.bias_hh
        self.w_h = torch.cat([lstm.weight_hh, decoder.f_beta.weight, att.decoder_att.weight])  # (4D + C + A, D)
        self.b_h = torch.cat([torch.zeros_like(lstm.bias_hh), decoder.f_beta.bias, att.decoder_att.bias])
        self.splits = (4 * D, C, c.attention_dim)
        self.w_energy, self.b_energy = att.full_att.weight.view(-1), att.full_att.bias
        self.fc = decoder.fc
        self.argmax_context = c.argmax_context
        self._buffer = None

    def energy(self, enc_proj, att_h):
        """enc_proj (B, P, A), att_h (B, K, A) -> relu(enc_proj + att_h) . w + b, (B, K, P)."""
        B, P, A = enc_proj.shape
        K = att_h.shape[1]
        if enc_proj.device.type != "cpu" or not self.SLICE_FLOATS:  # whole: GPUs have the bandwidth
            return torch.matmul(F.relu(enc_proj.unsqueeze(1) + att_h.unsqueeze(2)), self.w_energy) + self.b_energy
        step = max(1, min(P, self.SLICE_FLOATS // (B * K * A)))
        if self._buffer is None or self._buffer.numel() < B * K * step * A or self._buffer.dtype != enc_proj.dtype:
            self._buffer = enc_proj.new_empty(B * K * step * A)
        out = enc_proj.new_empty(B, K, P)
        for s in range(0, P, step):
            n = min(step, P - s)
            buf = self._buffer[: B * K * n * A].view(B, K, n, A)
            torch.add(enc_proj[:, None, s : s + n], att_h[:, :, None], out=buf)
            buf.relu_()
            out[:, :, s : s + n] = torch.matmul(buf, self.w_energy)
        return out.add_(self.b_energy)

    def __call__(self, features, enc_proj, tokens, h, c):
        """Same contract as ``Decoder.step``: -> logits (B, K, V), h, c (B, K, D), alpha (B, K, P)."""
        gates_h, beta, att_h = F.linear(h, self.w_h, self.b_h).split(self.splits, dim=-1)
        alpha = self.energy(enc_proj, att_h).softmax(dim=-1)  # (B, K, P)
        read = pick_cells(features, alpha.argmax(dim=-1)) if self.argmax_context else torch.bmm(alpha, features)
        context = torch.sigmoid(beta) * read  # (B, K, C)
        if self.table:
            gates = F.linear(context, self.w_context).add_(gates_h).add_(self.word_gates[tokens])  # (B, K, 4D)
        else:
            gates = F.linear(torch.cat([self.embedding(tokens), context], dim=-1), self.w_ih, self.b_ih).add_(gates_h)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return self.fc(h), h, c, alpha
