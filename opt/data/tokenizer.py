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


def from_gpt2_files(vocab_file: str, merges_file: str) -> Any:
    """GPT-2 byte-level BPE from `vocab.json` + `merges.txt` (local or s3://), with OPT's special ids.

    OPT's own vocab.json (Hugging Face `facebook/opt-*`) already holds `<s> <pad> </s> <unk>` at 0-3
    and is used as is. GPT-2's original file does not; there every id moves up by 4 to make room, as
    fairseq's dictionary did.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from opt import storage
    from opt.data.manifest import DatasetError

    vocab: dict[str, int] = json.loads(storage.read_text(vocab_file))
    merges: list[tuple[str, str]] = []
    for n, line in enumerate(storage.read_text(merges_file).splitlines(), start=1):
        if not line or line.startswith("#version"):
            continue
        left, sep, right = line.partition(" ")
        if not sep or not right or " " in right:
            raise DatasetError(f"{merges_file}:{n}: expected two tokens separated by one space, got {line!r}")
        merges.append((left, right))
    if [vocab.get(t) for t in SPECIAL_TOKENS] != list(range(4)):
        shifted = {tok: i + len(SPECIAL_TOKENS) for tok, i in vocab.items() if tok not in SPECIAL_TOKENS}
        vocab = {**{t: i for i, t in enumerate(SPECIAL_TOKENS)}, **shifted}
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise DatasetError(f"{vocab_file}: token ids are not 0..{len(ids) - 1} without gaps")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def load_tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)
