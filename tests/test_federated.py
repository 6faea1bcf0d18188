"""Partitioning, client streams and round sampling: invariants, not golden numbers."""
import numpy as np
import pytest

from worldlm_jax.data import corpus
from worldlm_jax.data.federated import (
    RoundSampler, make_client_data, split_documents, validation_batches)
from worldlm_jax.data.tokenizer import ByteTokenizer

DOCS = [f"document {i} " * (1 + i % 7) for i in range(400)]
LABELS = [i % 4 for i in range(400)]


def _assert_partition(clients, n_docs, n_clients):
    assert len(clients) == n_clients and all(clients)
    flat = [i for client in clients for i in client]
    assert len(flat) == len(set(flat)) == n_docs and set(flat) == set(range(n_docs))


@pytest.mark.parametrize("method, labels", [("iid", None), ("dirichlet", LABELS), ("dirichlet", None)])
@pytest.mark.parametrize("alpha", [1e-4, 1.0, 1e3])
def test_every_document_in_exactly_one_non_empty_client(method, labels, alpha):
    clients = split_documents(DOCS, 10, method=method, alpha=alpha, seed=3, labels=labels)
    _assert_partition(clients, len(DOCS), 10)
    assert clients == split_documents(DOCS, 10, method=method, alpha=alpha, seed=3, labels=labels)


def test_iid_sizes_are_balanced_and_seed_changes_assignment():
    clients = split_documents(DOCS, 7, "iid", seed=0)
    sizes = [len(c) for c in clients]
    assert max(sizes) - min(sizes) <= 1
    assert clients != split_documents(DOCS, 7, "iid", seed=1)


def _mean_max_label_share(clients, labels):
    shares = [np.bincount(np.asarray(labels)[c], minlength=4).max() / len(c) for c in clients]
    return float(np.mean(shares))


def test_dirichlet_label_skew_grows_as_alpha_shrinks():
    skew = {alpha: np.mean([_mean_max_label_share(
        split_documents(DOCS, 8, "dirichlet", alpha=alpha, seed=s, labels=LABELS), LABELS) for s in range(5)])
        for alpha in (0.01, 0.3, 100.0)}
    assert skew[0.01] > skew[0.3] > skew[100.0]
    assert skew[0.01] > 0.9 and skew[100.0] < 0.4  # 4 balanced labels: IID share is 0.25


def test_dirichlet_without_labels_skews_quantity():
    def size_spread(alpha):
        sizes = [len(c) for c in split_documents(DOCS, 8, "dirichlet", alpha=alpha, seed=0)]
        return max(sizes) / min(sizes)
    assert size_spread(0.1) > 5 * size_spread(1000.0)


def test_split_errors_name_the_problem():
    with pytest.raises(ValueError, match="10 clients.*only 3 documents"):
        split_documents(DOCS[:3], 10)
    with pytest.raises(ValueError, match=r"'shards'.*iid, dirichlet"):
        split_documents(DOCS, 2, method="shards")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        split_documents(DOCS, 2, method="dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="one entry per document"):
        split_documents(DOCS, 2, method="dirichlet", labels=[0, 1])


def _least_bytes(clients, docs=DOCS) -> int:
    return min(sum(len(docs[i].encode("utf-8")) + 1 for i in client) for client in clients)


def test_dirichlet_redraws_a_draw_that_starves_a_client():
    # Dir(0.3) over 4 clients: seed 0's first draw leaves a client 437 bytes, below the minimum
    first = split_documents(DOCS, 4, "dirichlet", alpha=0.3, seed=0, labels=LABELS)
    assert _least_bytes(first) < 2000
    clients = split_documents(DOCS, 4, "dirichlet", alpha=0.3, seed=0, labels=LABELS, min_bytes=2000)
    _assert_partition(clients, len(DOCS), 4)
    assert _least_bytes(clients) >= 2000 and clients != first
    assert clients == split_documents(DOCS, 4, "dirichlet", alpha=0.3, seed=0, labels=LABELS, min_bytes=2000)
    # without labels (quantity skew) too: the first draw leaves a client 27 bytes
    assert _least_bytes(split_documents(DOCS, 4, "dirichlet", alpha=0.3, seed=0)) < 1000
    sizes = split_documents(DOCS, 4, "dirichlet", alpha=0.3, seed=0, min_bytes=1000)
    _assert_partition(sizes, len(DOCS), 4)
    assert _least_bytes(sizes) >= 1000


def test_dirichlet_first_draw_that_meets_the_minimum_is_unchanged():
    first = split_documents(DOCS, 4, "dirichlet", alpha=0.3, seed=2, labels=LABELS)
    assert _least_bytes(first) >= 2000  # seed 2's first draw already gives every client 2517 bytes
    assert split_documents(DOCS, 4, "dirichlet", alpha=0.3, seed=2, labels=LABELS, min_bytes=2000) == first
    assert split_documents(DOCS, 4, "iid", seed=2, min_bytes=10 ** 6) == split_documents(DOCS, 4, "iid", seed=2)


def test_dirichlet_minimum_that_cannot_be_met_names_the_federation():
    total = sum(len(d) + 1 for d in DOCS)
    with pytest.raises(ValueError, match=rf"^federation 'a': {total} bytes of documents cannot give 4 clients"):
        split_documents(DOCS, 4, "dirichlet", alpha=0.3, labels=LABELS, min_bytes=total, name="federation 'a'")
    # feasible in total, but no draw gives every one of 8 clients an equal share at Dir(0.05)
    with pytest.raises(ValueError, match=r"^federation 'b': 100 Dirichlet\(0.05\) draws each left a client"):
        split_documents(DOCS, 8, "dirichlet", alpha=0.05, labels=LABELS, min_bytes=total // 8,
                        name="federation 'b'")


def test_client_data_holds_out_whole_documents():
    docs = corpus.load_source("fortunes_ru")[:200]
    tok = ByteTokenizer()
    data = make_client_data(docs, tok, val_fraction=0.1, seed=0, seq_len=64)
    n_tokens = sum(len(d.encode("utf-8")) + 1 for d in docs)
    assert data.train.dtype == data.validation.dtype == np.int32
    assert len(data.train) + len(data.validation) == n_tokens
    assert 0.1 * n_tokens <= len(data.validation) < 0.2 * n_tokens
    val_docs = tok.decode(data.validation).split("\x00")[:-1]
    train_docs = tok.decode(data.train).split("\x00")[:-1]
    assert sorted(val_docs + train_docs) == sorted(docs) and not set(val_docs) & set(train_docs)
    again = make_client_data(docs, tok, val_fraction=0.1, seed=0, seq_len=64)
    assert np.array_equal(again.validation, data.validation)


def test_client_data_falls_back_to_tail_split_for_a_single_document():
    data = make_client_data(["x" * 1000], ByteTokenizer(), val_fraction=0.1, seed=0, seq_len=32)
    assert len(data.validation) == 101 and len(data.train) == 900
    assert len(data.train) >= 33


def test_client_data_too_short_names_the_client():
    with pytest.raises(ValueError, match=r"client 7 has 11 tokens.*seq_len \+ 1 = 65"):
        make_client_data(["tiny text."], ByteTokenizer(), 0.1, 0, seq_len=64, name="client 7")


@pytest.fixture
def sampler():
    rng = np.random.default_rng(0)
    streams = [rng.integers(0, 256, size=n).astype(np.int32) for n in (500, 2000, 65, 10_000)]
    return RoundSampler(streams, seq_len=64, seed=11)


def test_sample_shape_follows_client_id_shape(sampler):
    ids = np.array([[0, 1, -1], [3, 2, 2]])
    out = sampler.sample(round_index=0, client_ids=ids, steps=4, batch=2)
    assert out.shape == (2, 3, 4, 2, 65) and out.dtype == np.int32
    assert not out[0, 2].any()  # padding slot is zeros
    assert sampler.sample(0, np.array(1), 4, 2).shape == (4, 2, 65)


def test_windows_are_contiguous_slices_of_the_client_stream(sampler):
    out = sampler.sample(5, np.array([3, 2]), steps=3, batch=4)
    for slot, client_id in enumerate([3, 2]):
        stream = sampler.streams[client_id].tolist()
        for window in out[slot].reshape(-1, 65).tolist():
            starts = [s for s in range(len(stream) - 64) if stream[s:s + 65] == window]
            assert starts, "window is not a slice of its client's stream"


def test_batch_depends_on_round_and_client_not_position_or_padding(sampler):
    a = sampler.sample(7, np.array([0, 1, 3]), steps=2, batch=3)
    b = sampler.sample(7, np.array([[-1, 3], [1, -1], [0, 2]]), steps=2, batch=3)
    np.testing.assert_array_equal(a[0], b[2, 0])
    np.testing.assert_array_equal(a[1], b[1, 0])
    np.testing.assert_array_equal(a[2], b[0, 1])
    assert not np.array_equal(a, sampler.sample(8, np.array([0, 1, 3]), 2, 3))
    assert not np.array_equal(a, sampler.sample(7, np.array([0, 1, 3]), 2, 3, salt=1))
    other_seed = RoundSampler(sampler.streams, seq_len=64, seed=12)
    assert not np.array_equal(a, other_seed.sample(7, np.array([0, 1, 3]), 2, 3))


def test_sampler_rejects_bad_ids_and_short_streams(sampler):
    with pytest.raises(ValueError, match=r"\[0, 4\).*max 4"):
        sampler.sample(0, np.array([4]), 1, 1)
    with pytest.raises(ValueError, match="client 1 .*seq_len \\+ 1 = 65"):
        RoundSampler([np.zeros(100, np.int32), np.zeros(64, np.int32)], seq_len=64, seed=0)


def test_validation_windows_are_fixed_and_cover_the_stream(sampler):
    streams = sampler.streams
    out = validation_batches(streams, seq_len=64, batch=4, n_batches=3)
    assert out.shape == (4, 3, 4, 65) and out.dtype == np.int32
    np.testing.assert_array_equal(out, validation_batches(streams, 64, 4, 3))
    for client_id, stream in enumerate(streams):
        windows = out[client_id].reshape(12, 65)
        np.testing.assert_array_equal(windows[0], stream[:65])  # starts at the beginning
        np.testing.assert_array_equal(windows[-1], stream[-65:])  # ends at the end
    with pytest.raises(ValueError, match="validation stream of client 0"):
        validation_batches([np.zeros(10, np.int32)], seq_len=64, batch=1, n_batches=1)


def test_end_to_end_source_to_round_batch():
    docs = corpus.load_source("man_es")
    tok = ByteTokenizer()
    clients = split_documents(docs, 4, "iid", seed=0)
    data = [make_client_data([docs[i] for i in c], tok, 0.1, seed=c_id, seq_len=128, name=f"client {c_id}")
            for c_id, c in enumerate(clients)]
    batch = RoundSampler([d.train for d in data], seq_len=128, seed=0).sample(0, np.arange(4), 2, 8)
    assert batch.shape == (4, 2, 8, 129)
    assert "á" in tok.decode(batch.reshape(-1)) or "é" in tok.decode(batch.reshape(-1))
