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


# GPT-2's pre-tokenizer pattern, which HF's ByteLevel(use_regex=True) applies too.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (printable stand-ins for the 256 byte values)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class BatchEncoder:
    """Encodes documents to ids with the dataset tokenizer, through tiktoken's BPE where it gives the same ids.

    tiktoken's byte-pair merge loop is about 3x faster per core than HF tokenizers' here. Both apply
    merges by rank, and our vocabularies are rank-ordered (ids follow merge order), so they agree;
    `verify` proves it on a sample before tiktoken is trusted, else HF tokenizers encodes.
    """

    def __init__(self, tokenizer_json: str, engine: str = "auto") -> None:
        import json

        self.hf = load_tokenizer(tokenizer_json)
        self.tiktoken: Any = None
        if engine in ("auto", "tiktoken"):
            try:
                import tiktoken
            except ImportError:
                return
            dec = _byte_decoder()
            vocab: dict[str, int] = json.loads(self.hf.to_str())["model"]["vocab"]
            ranks = {bytes(dec[ch] for ch in tok): i for tok, i in vocab.items() if tok not in SPECIAL_TOKENS}
            self.tiktoken = tiktoken.Encoding("opt-dataset", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})

    @property
    def engine(self) -> str:
        return "tiktoken" if self.tiktoken is not None else "hf"

    def verify(self, texts: list[str]) -> bool:
        """Keep tiktoken only if it encodes every sample text exactly as HF tokenizers does."""
        if self.tiktoken is not None and self.tiktoken.encode_ordinary_batch(texts, num_threads=1) != [
            e.ids for e in self.hf.encode_batch(texts)
        ]:
            self.tiktoken = None
        return self.tiktoken is not None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.tiktoken is not None:
            # one thread: parallelism comes from the worker processes
            return self.tiktoken.encode_ordinary_batch(texts, num_threads=1)
        return [e.ids for e in self.hf.encode_batch(texts)]
