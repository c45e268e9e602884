"""Teacher forcing for soft attention, arranged for training speed on the CPU: the same arithmetic
as stepping ``Decoder.advance`` word by word, up to float rounding, in fewer and cheaper passes.

- Captions of one photo share its features: the encoder projection (the one large matrix product
  of a step, P x C x A per photo, forward and weight gradient) is computed once per photo, and the
  attention-weighted context reads each photo's grid once per word for all its captions.
- The word embeddings' share of the LSTM gates (both biases folded in) is one matrix product over
  all steps instead of one small product per step.
- The three projections of h (LSTM hidden gates, beta gate, attention) are one matrix product.
- The weight gradients of the per-step products are one large product each after the last step
  (:class:`_Bank`), instead of one thin, memory-bound product per step.
- The attention energy relu(enc_proj + W h) . w is a custom autograd function working in slices
  that stay in the cache: it never keeps the (rows, P, A) tensor for the backward pass (it is
  recomputed slice by slice) and adds its gradient for the encoder projection into one buffer
  shared by all steps.
- ``products=torch.bfloat16`` (CPUs with AMX, ``sat train --precision bf16``): the matrix
  products (encoder projection, word gates, the per-step products and their deferred weight
  gradients, the context read) take bf16 inputs and accumulate in fp32; weights are cast once per
  batch, the LSTM state, the attention energy and softmax stay fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SLICE_FLOATS = 1 << 19  # 2 MB of float32 per slice of the energy: stays in the L2 cache


def linear(x, weight, bias=None, products=None):
    """F.linear, or with ``products`` (a dtype) its product in that dtype, the bias added in fp32."""
    if products is None:
        return F.linear(x, weight, bias)
    out = F.linear(x.to(products), weight.to(products)).float()
    return out if bias is None else out + bias


class _Bank:
    """What the steps leave for a deferred gradient: the encoder projection's gradient summed over
    steps (``grad``), or the (input, output gradient) pairs of a per-step matrix product (kept in
    ``products``' dtype when given)."""

    def __init__(self, products=None):
        self.grad = None
        self.products = products
        self.inputs, self.grads = [], []


class _Collect(torch.autograd.Function):
    """Identity on a tensor the steps use through custom functions that return no gradient for
    it; its backward hands over what they left in the bank (after the last of them has run)."""

    @staticmethod
    def forward(ctx, x, bank, kind):
        ctx.bank, ctx.kind = bank, kind
        ctx.set_materialize_grads(False)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        bank = ctx.bank
        if ctx.kind == "weight":  # (out, in) = sum over steps of grad_t^T @ input_t, in one product
            total = torch.cat(bank.grads).t().mm(torch.cat(bank.inputs)) if bank.grads else None
            if total is not None and bank.products is not None:
                total = total.float()
            bank.inputs, bank.grads = [], []
        else:
            total, bank.grad = bank.grad, None
        if grad is not None:
            total = grad if total is None else total + grad
        return total, None, None


class _Linear(torch.autograd.Function):
    """x @ weight.T whose weight gradient is deferred to the weight's :class:`_Collect`; with the
    bank's ``products`` dtype, ``low`` is the weight already cast to it (once per batch)."""

    @staticmethod
    def forward(ctx, x, weight, low, bank):
        dt = bank.products
        if dt is not None:
            x, weight = x.to(dt), low
        ctx.save_for_backward(x, weight)
        ctx.bank = bank
        out = x.mm(weight.t())
        return out if dt is None else out.float()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dt = ctx.bank.products
        if dt is not None:
            grad = grad.to(dt)
        ctx.bank.inputs.append(x)
        ctx.bank.grads.append(grad)
        out = grad.mm(weight)
        return (out if dt is None else out.float()), None, None, None


class _Energy(torch.autograd.Function):
    """e = relu(enc_proj[photo] + att_h[:, None]) . w + b, (n, P), for rows showing ``photo`` (n,)."""

    @staticmethod
    def forward(ctx, enc_proj, att_h, w, b, photo, bank):
        P, A = enc_proj.shape[1:]
        n = att_h.shape[0]
        step = max(1, SLICE_FLOATS // (P * A))
        out = att_h.new_empty(n, P)
        buf = att_h.new_empty(min(step, n), P, A)
        for s in range(0, n, step):
            r = slice(s, min(n, s + step))
            pre = buf[: r.stop - s]
            torch.index_select(enc_proj, 0, photo[r], out=pre)
            out[r] = torch.matmul(pre.add_(att_h[r, None]).relu_(), w)
        ctx.save_for_backward(enc_proj, att_h, w, photo)
        ctx.bank = bank
        return out.add_(b)

    @staticmethod
    def backward(ctx, grad_e):
        enc_proj, att_h, w, photo = ctx.saved_tensors
        bank = ctx.bank
        P, A = enc_proj.shape[1:]
        n = att_h.shape[0]
        step = max(1, SLICE_FLOATS // (P * A))
        grad_h = torch.empty_like(att_h)
        grad_w = torch.zeros_like(w)
        buf = att_h.new_empty(min(step, n), P, A)
        if bank.grad is None:
            bank.grad = torch.zeros_like(enc_proj)
        for s in range(0, n, step):
            r = slice(s, min(n, s + step))
            pre = buf[: r.stop - s]
            torch.index_select(enc_proj, 0, photo[r], out=pre)
            pre.add_(att_h[r, None]).relu_()
            ge = grad_e[r]  # (rows, P)
            grad_w.addmv_(pre.view(-1, A).t(), ge.reshape(-1))  # d e / d w = relu(pre)
            g = pre.gt_(0).mul_(w).mul_(ge[..., None])  # d e / d pre, in place of pre
            grad_h[r] = g.sum(1)
            bank.grad.index_add_(0, photo[r], g)
        return None, grad_h, grad_w, grad_e.sum(), None, None


def teacher_forcing(decoder, features, captions, steps: list[int], photo=None, products=None):
    """Soft-attention teacher forcing -> hs (B, T1, D) hidden states, alphas (B, T1, P), zero
    past each caption's end.

    features (I, P, C), one grid per photo (prepared: ``Decoder.prepare``); captions (B, T); ``steps`` (B,): predicted words per
    caption, sorted longest first; ``photo`` (B,) long: which photo each caption describes
    (default: caption b describes photo b, I = B); ``products``: None (fp32) or torch.bfloat16,
    the dtype of the matrix products' inputs (see the module's docstring).
    """
    cfg = decoder.config
    B = captions.shape[0]
    T1 = max(steps)
    E, D, C = cfg.embed_dim, cfg.decoder_dim, cfg.width
    att, lstm = decoder.attention, decoder.lstm
    if photo is None:
        photo = torch.arange(B, device=features.device)
    if cfg.init_state == "zero":
        h = c = features.new_zeros(B, D)
    else:
        mean = features.mean(dim=1)[photo]
        h, c = decoder.init_h(mean), decoder.init_c(mean)
    proj_bank = _Bank()
    enc_proj = _Collect.apply(linear(features, att.encoder_att.weight, att.encoder_att.bias, products), proj_bank,
                              "grad")  # (I, P, A), once per photo
    grid_features = None if products is None else features.to(products)
    # each caption's slot among its photo's captions, so one (I, S, P) x (I, P, C) product reads every grid once
    slot = _slots(photo)
    S = int(slot.max()) + 1
    w_ih = lstm.weight_ih  # (4D, E + C)
    word_gates = linear(decoder.embedding(captions[:, :T1]).transpose(0, 1), w_ih[:, :E],
                        lstm.bias_ih + lstm.bias_hh, products).unbind(0)  # T1 x (B, 4D)
    ctx_bank, h_bank = _Bank(products), _Bank(products)
    w_context = _Collect.apply(w_ih[:, E:], ctx_bank, "weight")  # (4D, C)
    w_h = _Collect.apply(torch.cat([lstm.weight_hh, decoder.f_beta.weight, att.decoder_att.weight]), h_bank,
                         "weight")  # (4D + C + A, D)
    low_context, low_h = (None, None) if products is None else (w_context.detach().to(products),
                                                                 w_h.detach().to(products))
    b_h = torch.cat([torch.zeros_like(lstm.bias_hh), decoder.f_beta.bias, att.decoder_att.bias])
    splits = (4 * D, C, cfg.attention_dim)
    w_e, b_e = att.full_att.weight.view(-1), att.full_att.bias.view(())
    hs, alphas = [], []
    for t in range(T1):
        n = sum(1 for s in steps if s > t)  # rows still going (sorted longest first)
        rows = photo[:n]
        gates_h, beta, att_h = (_Linear.apply(h[:n], w_h, low_h, h_bank) + b_h).split(splits, dim=-1)
        alpha = _Energy.apply(enc_proj, att_h, w_e, b_e, rows, proj_bank).softmax(dim=-1)  # (n, P)
        grid = alpha.new_zeros(features.shape[0], S, alpha.shape[1]).index_put((rows, slot[:n]), alpha)
        if products is None:
            read = torch.bmm(grid, features)[rows, slot[:n]]  # (n, C)
        else:
            read = torch.bmm(grid.to(products), grid_features)[rows, slot[:n]].float()
        context = torch.sigmoid(beta) * read
        gates = _Linear.apply(context, w_context, low_context, ctx_bank) + gates_h + word_gates[t][:n]
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c[:n] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
        alphas.append(alpha)
    return _pad_steps(hs, B), _pad_steps(alphas, B)


def _slots(photo):
    """(B,) photo of each caption -> (B,) the caption's rank among the captions of its photo."""
    order = torch.argsort(photo, stable=True)
    sorted_photo = photo[order]
    first = torch.searchsorted(sorted_photo, sorted_photo)  # index of each photo's first caption
    slot = torch.empty_like(photo)
    slot[order] = torch.arange(len(photo), device=photo.device) - first
    return slot


def _pad_steps(rows: list, B: int):
    """Per-step (n_t, X) tensors, n_t shrinking -> (B, T1, X), zero where a caption has ended."""
    return torch.stack([F.pad(r, (0, 0, 0, B - r.shape[0])) if r.shape[0] < B else r for r in rows], dim=1)
