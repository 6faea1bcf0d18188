"""Tokenizers: bytes by default, optional SentencePiece BPE trained offline.

Bytes need no training, so no federation's text leaks into a shared vocabulary
and every language costs the same machinery; SentencePiece is there for runs
that want shorter sequences. Both expose the same small API:
`encode(str) -> int32 array`, `decode(ids) -> str`, `vocab_size`, `eos_id`
(the document separator used when documents are concatenated into a stream).
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


def _check_ids(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    ids_N = np.asarray(ids)
    if ids_N.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of token ids, got shape {ids_N.shape}")
    if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got min {ids_N.min()}, max {ids_N.max()}")
    return ids_N


class ByteTokenizer:
    """UTF-8 bytes as tokens. NUL (id 0) never occurs in the corpus, so it marks document ends."""

    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        # errors="replace": a window cut mid-character must still print.
        return _check_ids(ids, 256).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise ImportError("SentencePieceTokenizer needs the optional dependency sentencepiece: "
                          "pip install sentencepiece (a dependency of worldlm_jax; or use the 'byte' tokenizer)") from None
    return sentencepiece


def training_lines(texts: Iterable[str], max_lines: int, seed: int) -> list[str]:
    """Non-empty lines of texts, subsampled with an explicit seed.

    SentencePiece's BPE trainer is deterministic given its input, so the seed
    (which lines are used) is the whole of the randomness.
    """
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if len(lines) > max_lines:
        keep = np.random.default_rng(seed).choice(len(lines), size=max_lines, replace=False)
        lines = [lines[i] for i in np.sort(keep)]
    return lines


# What the trainer is given besides its lines (see SentencePieceTokenizer.train): part
# of a cached model's key, so a change here never reuses a model trained otherwise.
_TRAINER_OPTIONS = dict(model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                        remove_extra_whitespaces=False, user_defined_symbols=["\n"], character_coverage=0.9995,
                        unk_id=0, bos_id=-1, eos_id=1, pad_id=-1)


def training_digest(lines: Sequence[str], vocab_size: int) -> str:
    """SHA-256 (hex) of exactly what a SentencePiece model is trained from: its
    lines (length-prefixed: ["ab", "c"] and ["a", "bc"] differ), the vocabulary
    size and the trainer's options."""
    digest = hashlib.sha256(repr((sorted(_TRAINER_OPTIONS.items()), int(vocab_size))).encode())
    for line in lines:
        raw = line.encode("utf-8", "surrogatepass")
        digest.update(len(raw).to_bytes(8, "little") + raw)
    return digest.hexdigest()


class SentencePieceTokenizer:
    """SentencePiece BPE with byte fallback, so any text round-trips exactly."""

    MAX_LINES = 200_000  # lines the trainer sees at most (a seeded subsample beyond)

    def __init__(self, model_proto: bytes, path: str | None = None):
        spm = _sentencepiece()
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.path = path
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_path: str | Path, seed: int = 0,
              max_lines: int = MAX_LINES) -> "SentencePieceTokenizer":
        """Train BPE offline on texts and save the model to model_path."""
        spm = _sentencepiece()
        lines = training_lines(texts, max_lines, seed)
        if not lines:
            raise ValueError("SentencePieceTokenizer.train got no non-empty text")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, minloglevel=2,
            # byte_fallback: unseen characters become bytes instead of <unk>; identity
            # normalisation: an exact round trip (no NFKC); "\n" a symbol: lines are
            # trained separately, newlines stay a token
            **_TRAINER_OPTIONS)
        path = Path(model_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model.getvalue())
        return cls(model.getvalue(), str(path))

    @classmethod
    def load(cls, path: str | Path) -> "SentencePieceTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {path}; train one with SentencePieceTokenizer.train")
        return cls(path.read_bytes(), str(path))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode(_check_ids(ids, self.vocab_size).tolist())

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def get_tokenizer(name_or_path: str | Path) -> ByteTokenizer | SentencePieceTokenizer:
    """'byte' -> ByteTokenizer; a path to a .model file -> SentencePieceTokenizer."""
    if str(name_or_path) == "byte":
        return ByteTokenizer()
    path = Path(name_or_path)
    if path.suffix == ".model" and path.is_file():
        return SentencePieceTokenizer.load(path)
    raise ValueError(f"unknown tokenizer {str(name_or_path)!r}: use 'byte' or the path of an existing "
                     "SentencePiece .model file")


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Mean UTF-8 bytes per token over texts.

    bits per byte = (loss in nats per token) / ln(2) / bytes_per_token, which
    makes losses comparable across tokenizers.
    """
    n_bytes = n_tokens = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tokenizer.encode(text))
    if n_tokens == 0:
        raise ValueError("bytes_per_token needs at least one non-empty text")
    return n_bytes / n_tokens
