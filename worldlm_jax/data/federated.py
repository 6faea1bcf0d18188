"""Federated data: documents -> clients -> token streams -> fixed-shape round batches.

Three steps, each a pure function of explicit seeds:
  1. `split_documents`: which client holds which document (IID or Dirichlet skew);
  2. `make_client_data`: one client's documents -> train/validation token streams;
  3. `RoundSampler.sample`: random training windows for a round, shaped like the
     tree (any leading shape of client ids), and `validation_batches`: fixed
     evaluation windows.
A client's windows depend only on (seed, round, client id, salt), never on where
the client sits in the batch or on padding, so re-ordering or re-padding a
tree does not change what any client trains on.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from worldlm_jax.data.tokenizer import Tokenizer

SPLIT_METHODS = ("iid", "dirichlet")


# ------------------------------------------------------------------ partitioning


def _fill_empty_clients(clients: list[list[int]]) -> list[list[int]]:
    """Give every empty client one document from the currently largest client.

    Dirichlet draws with small alpha leave clients empty; a client without data
    cannot train, so we move the fewest documents that fix it (deterministic).
    """
    for client in clients:
        if not client:
            largest = max(clients, key=len)
            client.append(largest.pop())
    return clients


def _split_iid(n_docs: int, n_clients: int, rng: np.random.Generator) -> list[list[int]]:
    order = rng.permutation(n_docs)
    return [sorted(order[c::n_clients].tolist()) for c in range(n_clients)]


def _draw_dirichlet(labels_N: np.ndarray, n_clients: int, alpha: float,
                    rng: np.random.Generator) -> list[list[int]]:
    """Per label, share its documents across clients with proportions ~ Dir(alpha)."""
    clients: list[list[int]] = [[] for _ in range(n_clients)]
    for label in np.unique(labels_N):
        docs = rng.permutation(np.flatnonzero(labels_N == label))
        proportions_C = rng.dirichlet(np.full(n_clients, alpha))
        counts_C = rng.multinomial(len(docs), proportions_C)
        for client, part in zip(clients, np.split(docs, np.cumsum(counts_C)[:-1])):
            client.extend(part.tolist())
    return [sorted(client) for client in _fill_empty_clients(clients)]


# Draws before a Dirichlet split that starves a client is refused. In the mixed scenario
# (Dir(0.3), 4 clients, 2 labels, a 520-byte minimum) 5 of the 20 first draws of seeds 0-4
# starve a client and the second draw never does; 100 draws that all starve one mean the
# minimum does not fit the data.
MAX_DIRICHLET_DRAWS = 100


def _split_dirichlet(labels_N: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator,
                     sizes_N: np.ndarray, min_bytes: int, name: str) -> list[list[int]]:
    """Draws from `rng` until every client holds at least `min_bytes` (the first draw
    that does is returned, so a first draw that satisfies it is the split without a
    minimum)."""
    if sizes_N.sum() < n_clients * min_bytes:
        raise ValueError(f"{name}: {sizes_N.sum()} bytes of documents cannot give {n_clients} clients "
                         f"{min_bytes} bytes each, the least a train and a validation stream need (use fewer "
                         "clients, more documents or a shorter seq_len)")
    least = 0
    for _ in range(MAX_DIRICHLET_DRAWS):
        clients = _draw_dirichlet(labels_N, n_clients, alpha, rng)
        least = min(int(sizes_N[client].sum()) for client in clients)
        if least >= min_bytes:
            return clients
    raise ValueError(f"{name}: {MAX_DIRICHLET_DRAWS} Dirichlet({alpha}) draws each left a client fewer than "
                     f"{min_bytes} bytes, the least a train and a validation stream need (the last draw: {least}); "
                     "use a larger alpha, fewer clients, more documents or a shorter seq_len")


def split_documents(docs: Sequence[str], n_clients: int, method: str = "iid", alpha: float = 1.0,
                    seed: int = 0, labels: Sequence[int] | None = None, *, min_bytes: int = 0,
                    name: str = "federation") -> list[list[int]]:
    """Assign each document index to exactly one of n_clients; no client is empty.

    iid: shuffle, then round robin (sizes differ by at most one document).
    dirichlet: with labels (e.g. the sub-source of each document), each label's
      documents are spread by proportions ~ Dir(alpha) (small alpha: each client
      sees few labels); without labels, all documents share one label, which
      gives quantity skew (client sizes ~ Dir(alpha)). With `min_bytes`, the
      usual minimum-size practice: the proportions (and the shuffles) are redrawn
      from the same RNG until every client holds at least `min_bytes` of text
      (UTF-8 bytes plus one per document end, as `pipeline.split_validation`
      counts), at most MAX_DIRICHLET_DRAWS times, else a ValueError naming `name`.
      A first draw that already meets the minimum is returned as is, so the split
      equals the one without a minimum. (iid ignores `min_bytes`: a round robin
      has nothing to redraw.)
    """
    n_docs = len(docs)
    if method not in SPLIT_METHODS:
        raise ValueError(f"unknown split method {method!r}; allowed: {', '.join(SPLIT_METHODS)}")
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if n_docs < n_clients:
        raise ValueError(f"cannot give {n_clients} clients at least one document each: only {n_docs} "
                         "documents (use fewer clients or more documents)")
    rng = np.random.default_rng(seed)
    if method == "iid":
        return _split_iid(n_docs, n_clients, rng)
    if not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    labels_N = np.zeros(n_docs, dtype=np.int64) if labels is None else np.asarray(labels)
    if labels_N.shape != (n_docs,):
        raise ValueError(f"labels must have one entry per document ({n_docs}), got shape {labels_N.shape}")
    sizes_N = np.array([len(doc.encode("utf-8")) + 1 for doc in docs], np.int64)
    return _split_dirichlet(labels_N, n_clients, alpha, rng, sizes_N, int(min_bytes), name)


# ------------------------------------------------------------------ token streams


class ClientData(NamedTuple):
    """One client's token streams (documents joined by the tokenizer's eos_id)."""

    train: np.ndarray  # int32 [n_train_tokens]
    validation: np.ndarray  # int32 [n_validation_tokens]


def _stream(token_lists: Sequence[np.ndarray], eos_id: int) -> np.ndarray:
    eos = np.array([eos_id], dtype=np.int32)
    parts = [part for tokens in token_lists for part in (tokens.astype(np.int32), eos)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def make_client_data(docs: Sequence[str], tokenizer: Tokenizer, val_fraction: float = 0.1,
                     seed: int = 0, *, seq_len: int, name: str = "client") -> ClientData:
    """Tokenise a client's documents and hold out about val_fraction of tokens for validation.

    Validation is whole documents (picked with `seed`) so it measures text the
    model never saw; when that cannot leave both streams at least seq_len + 1
    tokens (few or very unequal documents), it falls back to the stream's tail.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction} for {name}")
    need = seq_len + 1
    tokens = [tokenizer.encode(doc) for doc in docs]
    total = sum(len(t) + 1 for t in tokens)
    val_docs: set[int] = set()
    val_tokens = 0
    for i in np.random.default_rng(seed).permutation(len(tokens)):
        if val_tokens >= max(val_fraction * total, need):
            break
        val_docs.add(int(i))
        val_tokens += len(tokens[i]) + 1
    train = _stream([t for i, t in enumerate(tokens) if i not in val_docs], tokenizer.eos_id)
    validation = _stream([tokens[i] for i in sorted(val_docs)], tokenizer.eos_id)
    if len(train) < need or len(validation) < need:  # fall back to a tail split
        stream = _stream(tokens, tokenizer.eos_id)
        n_val = max(int(np.ceil(val_fraction * len(stream))), need)
        if len(stream) - n_val < need:
            raise ValueError(f"{name} has {len(stream)} tokens: too few for a train and a validation "
                             f"stream of at least seq_len + 1 = {need} tokens each (give it more "
                             "documents or use a shorter seq_len)")
        train, validation = stream[:-n_val], stream[-n_val:]
    return ClientData(train, validation)


# ------------------------------------------------------------------ round batches


def _check_streams(streams: Sequence[np.ndarray], need: int, what: str) -> list[np.ndarray]:
    checked = []
    for client_id, stream in enumerate(streams):
        stream = np.asarray(stream, dtype=np.int32)
        if stream.ndim != 1 or len(stream) < need:
            raise ValueError(f"{what} stream of client {client_id} has shape {stream.shape}; need a 1-D "
                             f"stream of at least seq_len + 1 = {need} tokens")
        checked.append(stream)
    if not checked:
        raise ValueError(f"no {what} streams given")
    return checked


class RoundSampler:
    """Random training windows of seq_len + 1 tokens (inputs + shifted targets) per client."""

    def __init__(self, streams: Sequence[np.ndarray], seq_len: int, seed: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.seed = seed
        self.streams = _check_streams(streams, seq_len + 1, "training")

    @property
    def n_clients(self) -> int:
        return len(self.streams)

    def client_windows(self, round_index: int, client_id: int, steps: int, batch: int,
                       salt: int = 0) -> np.ndarray:
        """int32 [steps, batch, seq_len + 1] for one client; a pure function of its arguments."""
        stream = self.streams[client_id]
        rng = np.random.default_rng([self.seed, round_index, client_id, salt])
        starts_SB = rng.integers(0, len(stream) - self.seq_len, size=(steps, batch))
        return stream[starts_SB[..., None] + np.arange(self.seq_len + 1)]

    def sample(self, round_index: int, client_ids: np.ndarray, steps: int, batch: int,
               salt: int = 0) -> np.ndarray:
        """int32 [*client_ids.shape, steps, batch, seq_len + 1]; client id -1 is padding (zeros)."""
        ids = np.asarray(client_ids)
        if ids.size and (ids.min() < -1 or ids.max() >= self.n_clients):
            raise ValueError(f"client ids must be -1 (padding) or in [0, {self.n_clients}); "
                             f"got min {ids.min()}, max {ids.max()}")
        if min(round_index, salt, self.seed) < 0:
            raise ValueError(f"seed, round_index and salt must be >= 0; got {self.seed}, {round_index}, {salt}")
        out = np.zeros((ids.size, steps, batch, self.seq_len + 1), dtype=np.int32)
        for slot, client_id in enumerate(ids.reshape(-1).tolist()):
            if client_id >= 0:
                out[slot] = self.client_windows(round_index, client_id, steps, batch, salt)
        return out.reshape(ids.shape + (steps, batch, self.seq_len + 1))


def validation_batches(streams: Sequence[np.ndarray], seq_len: int, batch: int,
                       n_batches: int) -> np.ndarray:
    """Fixed evaluation windows int32 [n_clients, n_batches, batch, seq_len + 1].

    Window starts are evenly strided over each validation stream (no
    randomness), so every evaluation sees the same tokens and covers the
    stream end to end; short streams get overlapping windows.
    """
    streams = _check_streams(streams, seq_len + 1, "validation")
    n_windows = n_batches * batch
    out = np.empty((len(streams), n_windows, seq_len + 1), dtype=np.int32)
    for client_id, stream in enumerate(streams):
        starts_W = np.linspace(0, len(stream) - seq_len - 1, n_windows).round().astype(np.int64)
        out[client_id] = stream[starts_W[:, None] + np.arange(seq_len + 1)]
    return out.reshape(len(streams), n_batches, batch, seq_len + 1)
