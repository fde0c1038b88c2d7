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


class SelfAttention(nn.Module):
    def __init__(self, cfg: OPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, C) -> (B, H, T, C/H)
        q, k, v = (proj(x).view(B, T, self.n_head, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        # SDPA scales by 1/sqrt(head_dim), as OPT does before the q.k product.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        # -1, not C: under tensor parallelism this rank holds n_head / tp heads
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: OPTConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.activation_dropout(F.relu(self.fc1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x)))
            return x + self._ffn(self.final_layer_norm(x))
        # post-LN (OPT-350M): normalise after each residual add
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x)))
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

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids `idx` (B, T)."""
        return F.linear(self.hidden(idx), self.embed_tokens.weight)  # tied output embedding

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The last hidden states (B, T, E), before the tied output projection."""
        B, T = idx.shape
        if self.cfg.max_seq_len < T:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.embed_tokens(idx)  # (B, T, E)
        if self.project_in is not None:
            x = self.project_in(x)
        pos = torch.arange(POSITION_OFFSET, T + POSITION_OFFSET, device=idx.device)
        x = x + self.embed_positions(pos)  # (B, T, C)
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if self.cfg.activation_checkpointing and self.training else layer(x)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; targets equal to -100 are ignored."""
        logits = self(idx)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
