"""Byte and SentencePiece tokenizers: exact round trips on every corpus language."""
import numpy as np
import pytest

from worldlm_jax.data import corpus
from worldlm_jax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, bytes_per_token, get_tokenizer


def _sample(name: str, n: int = 5) -> list[str]:
    return corpus.load_source(name)[:n]


def test_byte_round_trip_on_every_source():
    tok = ByteTokenizer()
    for name in corpus.list_sources():
        for doc in _sample(name):
            ids = tok.encode(doc)
            assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < tok.vocab_size == 256
            assert len(ids) == len(doc.encode("utf-8"))
            assert tok.decode(ids) == doc


def test_byte_tokenizer_russian_is_two_bytes_per_letter():
    tok = ByteTokenizer()
    assert tok.encode("мир").tolist() == list("мир".encode("utf-8")) and len(tok.encode("мир")) == 6
    assert tok.decode(tok.encode("Привет, мир")) == "Привет, мир"
    assert bytes_per_token(tok, ["мир", "abc"]) == 1.0


def test_byte_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        ByteTokenizer().decode([65, 300])


def test_get_tokenizer_errors_name_the_value(tmp_path):
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match=r"'gpt2'.*'byte'"):
        get_tokenizer("gpt2")
    with pytest.raises(ValueError, match="missing.model"):
        get_tokenizer(tmp_path / "missing.model")


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    texts = [doc for name in ("man_en", "man_ru", "fortunes_de", "code_py") for doc in _sample(name, 8)]
    path = tmp_path_factory.mktemp("spm") / "bpe.model"
    return SentencePieceTokenizer.train(texts, vocab_size=800, model_path=path, seed=0), texts, path


def test_sentencepiece_round_trips_every_language(spm_tokenizer):
    tok, _, _ = spm_tokenizer
    for name in corpus.list_sources():
        for doc in _sample(name, 3):
            assert tok.decode(tok.encode(doc)) == doc, name
    tricky = "  leading\n\n\ttabs  und Übermut — 漢字 ☃\n"
    assert tok.decode(tok.encode(tricky)) == tricky


def test_sentencepiece_compresses_and_reloads(spm_tokenizer):
    tok, texts, path = spm_tokenizer
    assert tok.vocab_size == 800 and 0 <= tok.eos_id < 800
    assert bytes_per_token(tok, texts) > 1.5  # BPE merges beat raw bytes on its training text
    loaded = get_tokenizer(path)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert np.array_equal(loaded.encode(texts[0]), tok.encode(texts[0]))


def test_sentencepiece_training_is_deterministic(spm_tokenizer, tmp_path):
    tok, texts, path = spm_tokenizer
    again = SentencePieceTokenizer.train(texts, vocab_size=800, model_path=tmp_path / "again.model", seed=0)
    assert (tmp_path / "again.model").read_bytes() == path.read_bytes()
    assert np.array_equal(again.encode(texts[1]), tok.encode(texts[1]))
