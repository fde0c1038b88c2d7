"""GPT-2-style byte-level BPE with OPT's special tokens, via Hugging Face `tokenizers`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# OPT's special ids: <s>=0 <pad>=1 </s>=2 <unk>=3 (fairseq dictionary order).
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
BOS_ID, PAD_ID, EOS_ID, UNK_ID = range(4)
TOKENIZER_FILE = "tokenizer.json"


def padded_vocab_size(n: int, multiple: int = 8) -> int:
    """OPT pads 50265 to 50272: round the embedding rows up to a multiple of 8 for efficient matmuls."""
    return -(-n // multiple) * multiple


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Any:
    """Train a byte-level BPE on `texts`; the specials get ids 0-3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)
