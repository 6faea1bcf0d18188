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


# ---- what the federated pipeline trains its tokenizer on ------------------------------------
# A rare word of its own per document (letters only: SentencePiece never merges digits with letters)
MARKERS = ["".join(np.random.default_rng(i).choice(list("zqxjkvw"), 7)) for i in range(24)]


def _marked_documents() -> list[str]:
    """English documents, each carrying its marker, repeated so BPE learns it."""
    return [f"{doc}\n" + " ".join([m] * 60) + "\n" for m, doc in zip(MARKERS, _sample("man_en", len(MARKERS)))]


def _markers(text: str) -> set[str]:
    return {m for m in MARKERS if m in text}


@pytest.fixture
def marked_pipeline(monkeypatch):
    """pipeline.prepare on one federation of two clients whose documents carry markers,
    with every line the SentencePiece trainer is given recorded."""
    spm = pytest.importorskip("sentencepiece")
    from worldlm_jax.data import pipeline
    from worldlm_jax.topology import build_topology

    docs = _marked_documents()
    monkeypatch.setattr(pipeline, "_documents", lambda source, max_bytes, data_dir: list(docs))
    seen: list[str] = []
    real_train = spm.SentencePieceTrainer.train

    def recording_train(*args, sentence_iterator=None, **kwargs):
        lines = list(sentence_iterator)
        seen.extend(lines)
        return real_train(*args, sentence_iterator=iter(lines), **kwargs)

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", recording_train)
    topology = build_topology({"name": "w", "children": [{"name": "a", "clients": 2, "sources": ["man_en"]}]},
                              known_sources=corpus.list_sources())

    def prepare(cache_dir, val_fraction=0.25, seed=0):
        return pipeline.prepare(topology, "spm:1000", seq_len=32, val_fraction=val_fraction, seed=seed,
                                cache_dir=str(cache_dir))
    return prepare, seen


def test_tokenizer_never_trains_on_validation_text(marked_pipeline, tmp_path):
    prepare, seen = marked_pipeline
    data = prepare(tmp_path)
    tok = data.tokenizer
    validation = set().union(*(_markers(tok.decode(c.validation)) for c in data.clients))
    training = set().union(*(_markers(tok.decode(c.train)) for c in data.clients))
    assert validation and training and not validation & training  # whole documents are held out
    trained_on = _markers("\n".join(seen))
    assert trained_on == training, sorted(validation & trained_on)  # the trainer saw no validation document
    pieces = [tok._sp.id_to_piece(i) for i in range(tok.vocab_size)]
    learned = {m for m in MARKERS if any(m in p for p in pieces)}
    # the vocabulary learned training markers, and none seen only in validation
    assert learned & training and not learned & validation, sorted(learned & validation)


def test_tokenizer_cache_is_keyed_on_its_training_text(marked_pipeline, tmp_path):
    prepare, seen = marked_pipeline
    first = prepare(tmp_path)
    trained = len(seen)
    again = prepare(tmp_path)  # the same split: the cached model, no training
    assert len(seen) == trained and again.tokenizer.path == first.tokenizer.path
    other = prepare(tmp_path, val_fraction=0.4)  # another split: other training text, another model
    assert other.tokenizer.path != first.tokenizer.path and len(seen) > trained
    assert len(list(tmp_path.glob("spm_1000_*.model"))) == 2
