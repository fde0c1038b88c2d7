"""OPT decoder-only transformer in pure torch (no distributed code here).

Shapes: B = batch, T = sequence length, C = d_model, E = token-embedding width, H = heads.
Parameter names follow metaseq / Hugging Face (`self_attn.q_proj`, `fc1`, ...), so conversion is a
renaming and stays lossless.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from opt.model.config import POSITION_OFFSET, OPTConfig


class _TiedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits `h @ weight.T` (fp32), with the softmax gradient formed in place.

    Same result as `F.cross_entropy(F.linear(h, weight), targets, ignore_index=-100)` up to float rounding,
    without the log-softmax output, the NLL gradient and the log-softmax gradient: three (N, vocab) buffers
    fewer, and a weight gradient that is a plain tensor, so autograd adds the token embedding's gradient
    to it in place rather than into a new (vocab, E) tensor.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = torch.mm(h, weight.t())  # (N, vocab)
        keep = targets != -100
        safe = targets.masked_fill(~keep, 0)
        rows = max(1, (1 << 22) // logits.size(1))  # logsumexp's temporary stays ~16 MB
        lse = torch.cat([torch.logsumexp(chunk, dim=1) for chunk in logits.split(rows)])
        n = keep.sum().clamp(min=1)  # no targets at all: loss 0, no gradient (not 0/0)
        loss = ((lse - logits.gather(1, safe.unsqueeze(1)).squeeze(1)) * keep).sum() / n
        ctx.save_for_backward(h, weight, lse, safe, keep, n)
        ctx.logits = logits  # becomes the gradient in backward
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        if ctx.logits is None:
            raise RuntimeError("OPT.loss: backward ran twice through the same loss (retain_graph is unsupported)")
        h, weight, lse, safe, keep, n = ctx.saved_tensors
        g, ctx.logits = ctx.logits, None
        g.sub_(lse.unsqueeze(1)).exp_()  # softmax
        g[torch.arange(g.size(0), device=g.device), safe] -= 1.0
        g.mul_((keep * (grad / n)).unsqueeze(1))  # ignored positions get no gradient
        grad_h = torch.mm(g, weight) if ctx.needs_input_grad[0] else None
        grad_w = torch.mm(g.t(), h) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None


class _Dropout(nn.Dropout):
    """nn.Dropout; on CPU the mask comes from 16-bit slices of 64-bit random words (bernoulli_ is ~4x slower there).

    Drop probability round(p * 65536) / 65536 (0.1 -> 0.100006), kept values scaled by its inverse complement.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        q = round(self.p * 65536)
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= q - 32768  # int16 lanes are uniform
        return x * keep.to(x.dtype).mul_(65536 / (65536 - q))


class SelfAttention(nn.Module):
    def __init__(self, cfg: OPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention; `attn_mask` (B, 1, T, T) bool, True = may attend, replaces the causal mask."""
        B, T, _ = x.shape
        # (B, T, C) -> (B, H, T, C/H)
        q, k, v = (proj(x).view(B, T, self.n_head, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        # SDPA scales by 1/sqrt(head_dim), as OPT does before the q.k product.
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=attn_mask is None)
        # -1, not C: under tensor parallelism this rank holds n_head / tp heads
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: OPTConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.dropout = _Dropout(cfg.dropout)
        self.activation_dropout = _Dropout(cfg.activation_dropout)
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.activation_dropout(F.relu(self.fc1(x)))))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), attn_mask))
            return x + self._ffn(self.final_layer_norm(x))
        # post-LN (OPT-350M): normalise after each residual add
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, attn_mask)))
        return self.final_layer_norm(x + self._ffn(x))


class OPT(nn.Module):
    """OPT causal language model with tied input and output embeddings."""

    def __init__(self, cfg: OPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.pad_token_id)
        self.embed_positions = nn.Embedding(cfg.max_seq_len + POSITION_OFFSET, cfg.d_model)
        # OPT-350M embeds in 512 dims and projects to and from the 1024-wide residual stream.
        self.project_in = nn.Linear(cfg.embed_dim, cfg.d_model, bias=False) if cfg.embed_dim != cfg.d_model else None
        self.project_out = nn.Linear(cfg.d_model, cfg.embed_dim, bias=False) if cfg.embed_dim != cfg.d_model else None
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.final_layer_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_ln else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """OPT init: Normal(0, init_std); out_proj and fc2 scaled by 1/sqrt(2L); zero biases."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, out_std if name.endswith(("out_proj", "fc2")) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.embed_tokens.weight[self.cfg.pad_token_id].zero_()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids `idx` (B, T); with `targets`, the loss of `loss` instead.

        The loss is computed here, not in `loss`, so that it runs inside the module call (FSDP2's hooks).
        """
        h = self.hidden(idx)
        w = self.embed_tokens.weight
        if targets is None:
            return F.linear(h, w)  # tied output embedding
        if torch.is_grad_enabled() and h.dtype == w.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
            return _TiedHeadCrossEntropy.apply(h.reshape(-1, h.size(-1)), w, targets.reshape(-1))
        logits = F.linear(h, w).float().view(-1, w.size(0))
        total = F.cross_entropy(logits, targets.reshape(-1), ignore_index=-100, reduction="sum")
        return total / (targets != -100).sum().clamp(min=1)

    def hidden(self, idx: torch.Tensor, positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden states (B, T, E), before the tied output projection.

        By default token t sits at position t and sees tokens 0..t. Evaluation packs several sequences that share a
        prefix into one row: `positions` (B, T) gives each token its own position, and `attn_mask` (B, 1, T, T) bool
        says what each token may see (True = attend), e.g. the shared context and its own continuation only.
        """
        B, T = idx.shape
        if self.cfg.max_seq_len < T and positions is None:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.embed_tokens(idx)  # (B, T, E)
        if self.project_in is not None:
            x = self.project_in(x)
        if positions is None:
            pos = torch.arange(POSITION_OFFSET, T + POSITION_OFFSET, device=idx.device)
        else:
            if int(positions.max()) >= self.cfg.max_seq_len:
                raise ValueError(f"position {int(positions.max())} exceeds max_seq_len={self.cfg.max_seq_len}")
            pos = positions + POSITION_OFFSET
        x = x + self.embed_positions(pos)  # (B, T, C)
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; targets equal to -100 are ignored (loss 0 if all are)."""
        return self(idx, targets)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
