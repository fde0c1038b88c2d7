"""OPT model configuration and the presets of the OPT paper (arXiv 2205.01068, table 1)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# GPT-2's 50257 BPE tokens plus OPT's specials, padded to a multiple of 8 as metaseq did.
OPT_VOCAB_SIZE = 50272
# OPT's learned position table has 2 extra rows: fairseq reserved ids 0-1 and started positions at 2.
POSITION_OFFSET = 2


@dataclass(frozen=True)
class OPTConfig:
    """Shape and regularisation of an OPT decoder-only transformer."""

    n_layer: int = 12
    """Number of decoder layers."""
    n_head: int = 12
    """Attention heads per layer; `d_model` must divide evenly."""
    d_model: int = 768
    """Hidden size of the residual stream."""
    d_ffn: int = 0
    """Feed-forward inner size; 0 means OPT's 4 x d_model."""
    vocab_size: int = OPT_VOCAB_SIZE
    """Rows of the (tied) token embedding."""
    max_seq_len: int = 2048
    """Longest sequence; the position table has `max_seq_len + 2` rows (OPT's offset)."""
    word_embed_dim: int = 0
    """Width of the token embedding; 0 means d_model. OPT-350M uses 512 with project_in/out."""
    pre_ln: bool = True
    """Pre-LayerNorm with a final LayerNorm (every OPT size but 350M, which is post-LN)."""
    dropout: float = 0.1
    """Residual dropout after attention and after the feed-forward block (not on embeddings)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    activation_dropout: float = 0.0
    """Dropout after the ReLU inside the feed-forward block."""
    init_std: float = 0.006
    """Std of the Normal init; output projections are further scaled by 1/sqrt(2 * n_layer)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass to save activation memory."""
    pad_token_id: int = 1
    """Row of the token embedding that gets no gradient (OPT: pad=1)."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"OPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"OPTConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"OPTConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"OPTConfig.pad_token_id ({self.pad_token_id}) must be < vocab_size ({self.vocab_size})")

    @property
    def ffn_dim(self) -> int:
        return self.d_ffn or 4 * self.d_model

    @property
    def embed_dim(self) -> int:
        return self.word_embed_dim or self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def replace(self, **changes: Any) -> OPTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown OPTConfig fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> OPTConfig:
        """The named preset (`125m` ... `175b`, or `debug`), with field overrides."""
        key = name.lower().removeprefix("opt-")
        if key not in PRESETS:
            raise ValueError(f"unknown OPT preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})


# name -> fields; batch tokens and peak LR live with the training recipe (opt.config.RECIPES).
PRESETS: dict[str, dict[str, Any]] = {
    # A laptop-sized model every test uses: same architecture, tiny shapes.
    "debug": dict(n_layer=2, n_head=4, d_model=64, vocab_size=512, max_seq_len=128, dropout=0.0),
    "125m": dict(n_layer=12, n_head=12, d_model=768),
    "350m": dict(n_layer=24, n_head=16, d_model=1024, word_embed_dim=512, pre_ln=False),
    "1.3b": dict(n_layer=24, n_head=32, d_model=2048),
    "2.7b": dict(n_layer=32, n_head=32, d_model=2560),
    "6.7b": dict(n_layer=32, n_head=32, d_model=4096),
    "13b": dict(n_layer=40, n_head=40, d_model=5120),
    "30b": dict(n_layer=48, n_head=56, d_model=7168),
    "66b": dict(n_layer=64, n_head=72, d_model=9216),
    "175b": dict(n_layer=96, n_head=96, d_model=12288),
}
