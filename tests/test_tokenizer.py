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
    from worldlm_jax.tree.topology import build_topology

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


# ---- a byte floor that a merging tokenizer leaves short in tokens ---------------------------
@pytest.fixture
def man_en_pipeline(monkeypatch, tmp_path):
    """pipeline.prepare on one federation of 12 IID clients of man_en's first 160 KB (the
    many-small scenario's English federation) with spm:1024, recording every split it
    makes and the texts of every tokenizer it builds."""
    pytest.importorskip("sentencepiece")
    from worldlm_jax.data import pipeline
    from worldlm_jax.tree.topology import build_topology

    splits: list[tuple[str, object, object]] = []  # (client, floor, ClientText) in call order
    trained: list[list[str]] = []
    real_split, real_make = pipeline.split_validation, pipeline.make_tokenizer

    def recording_split(docs, *args, name="client", floor=None, **kwargs):
        text = real_split(docs, *args, name=name, floor=floor, **kwargs)
        splits.append((name, floor, text))
        return text

    def recording_make(name, texts, cache_dir, seed=0):
        trained.append(list(texts))
        return real_make(name, texts, cache_dir, seed)

    monkeypatch.setattr(pipeline, "split_validation", recording_split)
    monkeypatch.setattr(pipeline, "make_tokenizer", recording_make)
    topology = build_topology({"name": "w", "children": [{"name": "en", "clients": 12, "sources": ["man_en"]}]},
                              known_sources=corpus.list_sources())

    def prepare(seed, seq_len=64):
        splits.clear(), trained.clear()
        return pipeline.prepare(topology, "spm:1024", seq_len, 0.1, seed, max_bytes=160_000, cache_dir=str(tmp_path))
    return prepare, splits, trained, tmp_path


def _final_splits(splits) -> dict:
    return {name: text for name, _, text in splits}  # the last split of each client


def test_client_short_in_tokens_gets_a_raised_byte_floor_and_a_retrained_tokenizer(man_en_pipeline):
    from worldlm_jax.data import pipeline

    prepare, splits, trained, cache = man_en_pipeline
    data = prepare(seed=1)  # one client holds a single 337-byte page: 65 bytes of validation, 33 tokens
    resplit = [(name, floor) for name, floor, _ in splits if floor is not None]
    assert resplit and all(min(floor) >= 65 and max(floor) > 65 for _, floor in resplit)
    first_tokenizer = SentencePieceTokenizer.load(pipeline.tokenizer_cache_path(trained[0], 1024, str(cache), 1))
    first = {name: text for name, floor, text in splits if floor is None}
    name = resplit[0][0]
    before = pipeline._client_streams(first[name], first_tokenizer)
    assert min(len(before.train), len(before.validation)) < 65  # the byte floor held, the token count not
    assert len(trained) >= 2  # retrained on the new training text
    for client in data.clients:
        assert len(client.train) >= 65 and len(client.validation) >= 65
    # the tokenizer in use was trained on exactly the final split's training text, and none of its validation
    final = _final_splits(splits)
    train_texts = [t for text in final.values() for t in text.train_texts()]
    assert trained[-1] == train_texts
    assert data.tokenizer.path == pipeline.tokenizer_cache_path(train_texts, 1024, str(cache), 1)
    validation = {t for text in final.values() for t, _ in text.validation if t}
    assert not validation & set(train_texts)
    for client, text in zip(data.clients, final.values()):
        streams = pipeline._client_streams(text, data.tokenizer)
        assert np.array_equal(client.train, streams.train) and np.array_equal(client.validation, streams.validation)


def test_split_whose_clients_have_their_tokens_is_unchanged(man_en_pipeline):
    from worldlm_jax.data import pipeline

    prepare, splits, trained, cache = man_en_pipeline
    data = prepare(seed=3)  # every client has 65 tokens a side at the plain floor
    assert len(trained) == 1 and all(floor is None for _, floor, _ in splits)
    tokenizer = pipeline.make_tokenizer("spm:1024", trained[0], str(cache), 3)
    assert data.tokenizer.path == tokenizer.path
    for client, text in zip(data.clients, _final_splits(splits).values()):
        plain = pipeline.client_data(text, tokenizer, seq_len=64)
        assert np.array_equal(client.train, plain.train) and np.array_equal(client.validation, plain.validation)


def test_client_that_cannot_reach_the_floor_gets_the_one_line_error(man_en_pipeline):
    prepare, _, _, _ = man_en_pipeline
    with pytest.raises(ValueError, match=r"^client 'en/\d+' has \d+ training and \d+ validation tokens after "
                                         r"tokenising: each needs at least seq_len \+ 1 = 101") as error:
        prepare(seed=1, seq_len=100)  # the 337-byte page is about 170 tokens: not 2 x 101
    assert "\n" not in str(error.value)
