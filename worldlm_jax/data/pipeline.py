"""From a topology to client token streams and per-round fixed-shape batches.

Sources of a leaf federation -> documents -> split into its clients (iid or
Dirichlet) -> tokenised train/validation streams per client. Each round, the
host samples the participating clients of every leaf federation (full, fixed
size or Poisson, from a round-indexed RNG) and cuts fixed-shape windows.
"""
from __future__ import annotations

import hashlib
import os
from typing import NamedTuple, Sequence

import numpy as np

from worldlm_jax.data import federated, tfds_builder
from worldlm_jax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, get_tokenizer
from worldlm_jax.topology import Topology


class FederatedData(NamedTuple):
    clients: list  # ClientData per client of the topology
    tokenizer: object
    bytes_per_token: float  # UTF-8 bytes per token on validation text (for bits per byte)


def source_spec(source: str) -> str:
    """Bare corpus names mean the embedded corpus; `dir:` and `tfds:` pass through."""
    return source if ":" in source else f"embedded:{source}"


def _documents(source: str, max_bytes: int, data_dir: str) -> list[str]:
    docs = tfds_builder.load_documents(source_spec(source), data_dir or None)
    if max_bytes > 0:
        kept, total = [], 0
        for doc in docs:
            if total >= max_bytes:
                break
            kept.append(doc)
            total += len(doc.encode("utf-8"))
        docs = kept
    return docs


def leaf_documents(topology: Topology, max_bytes: int = 0, data_dir: str = ""):
    """Per leaf federation: its documents and the index of the source of each."""
    out = []
    for leaf in range(topology.leaf.size):
        first_client = int(np.flatnonzero(topology.client_parent == leaf)[0])
        docs, labels = [], []
        for label, source in enumerate(topology.client_sources[first_client]):
            source_docs = _documents(source, max_bytes, data_dir)
            docs += source_docs
            labels += [label] * len(source_docs)
        out.append((docs, np.asarray(labels)))
    return out


def make_tokenizer(name: str, texts: Sequence[str], cache_dir: str, seed: int = 0):
    """`byte`, a SentencePiece model path, or `spm:VOCAB` (trained once on `texts`
    and cached by a hash of the training text, so reruns reuse it)."""
    if name == "byte":
        return ByteTokenizer()
    if name.startswith("spm:"):
        vocab = int(name.split(":", 1)[1])
        digest = hashlib.sha256()
        for t in texts:
            digest.update(t.encode("utf-8", "replace"))
        path = os.path.join(cache_dir, f"spm_{vocab}_{digest.hexdigest()[:12]}.model")
        if os.path.exists(path):
            return SentencePieceTokenizer.load(path)
        os.makedirs(cache_dir, exist_ok=True)
        return SentencePieceTokenizer.train(texts, vocab, path, seed=seed)
    return get_tokenizer(name)


def prepare(topology: Topology, tokenizer_name: str, seq_len: int, val_fraction: float, seed: int,
            max_bytes: int = 0, data_dir: str = "", cache_dir: str = "") -> FederatedData:
    """Client data for every client of the topology, deterministically from `seed`."""
    per_leaf = leaf_documents(topology, max_bytes, data_dir)
    client_docs: list[list[str]] = [[] for _ in range(topology.n_clients)]
    for leaf, (docs, labels) in enumerate(per_leaf):
        members = np.flatnonzero(topology.client_parent == leaf)
        split, alpha = topology.leaf_split[leaf]
        parts = federated.split_documents(docs, len(members), split, alpha, seed + leaf,
                                          labels=labels.tolist() if len(set(labels.tolist())) > 1 else None)
        for client, indices in zip(members, parts):
            client_docs[client] = [docs[i] for i in indices]
    train_texts = [d for docs in client_docs for d in docs]
    cache = cache_dir or os.path.expanduser("~/.cache/worldlm_jax/tokenizers")
    tokenizer = make_tokenizer(tokenizer_name, train_texts, cache, seed)
    clients = [federated.make_client_data(docs, tokenizer, val_fraction, seed + c, seq_len=seq_len,
                                          name=f"client '{topology.client_names[c]}'")
               for c, docs in enumerate(client_docs)]
    sample = train_texts[:: max(1, len(train_texts) // 200)]
    bpt = federated_bytes_per_token(tokenizer, sample)
    return FederatedData(clients, tokenizer, bpt)


def federated_bytes_per_token(tokenizer, texts) -> float:
    if isinstance(tokenizer, ByteTokenizer):
        return 1.0
    from worldlm_jax.data.tokenizer import bytes_per_token
    return float(bytes_per_token(tokenizer, texts))


# ---- per-round participation --------------------------------------------------
def sample_slots(topology: Topology, round_index: int, salt: int, seed: int):
    """(slot_client (S,), slot_weight (S,)) for one innermost round.

    Each leaf federation fills its own slots by its own sampling rule; the RNG
    depends only on (seed, round, salt, federation), not on other federations.
    """
    slot_client = np.full(topology.n_slots, -1, np.int32)
    slot_weight = np.zeros(topology.n_slots, np.float32)
    for leaf, policy in enumerate(topology.leaf.policies):
        members = np.flatnonzero(topology.client_parent == leaf)
        slots = topology.leaf_slots(leaf)
        rng = np.random.default_rng([seed, round_index, salt, leaf, 17])
        if policy.sampling == "fixed" and policy.clients_per_round:
            chosen = np.sort(rng.choice(members, size=len(slots), replace=False))
            present = np.ones(len(slots), bool)
        elif policy.sampling == "poisson":
            rate = min(1.0, (policy.clients_per_round or len(members)) / len(members))
            take = rng.random(len(members)) < rate
            # Takers first, dealt across the device blocks in turn: every device
            # gets an even share, and the absent slots gather at the ends of the
            # blocks, where whole chunks of them are skipped by the round.
            order = np.argsort(~take, kind="stable")
            chosen, present = members[order], take[order]
            block = topology.n_slots // max(topology.slot_multiple, 1)
            slots = slots[np.lexsort((slots // block, slots % block))]
        else:
            chosen, present = members, np.ones(len(members), bool)
        slot_client[slots] = chosen
        slot_weight[slots] = np.where(present, topology.client_weight[chosen], 0.0)
    return slot_client, slot_weight


def sampling_rate(topology: Topology, leaf: int) -> float:
    """Probability that a given client of leaf federation `leaf` takes part in a round."""
    policy = topology.leaf.policies[leaf]
    n = int(np.sum(topology.client_parent == leaf))
    if policy.sampling == "full" or not policy.clients_per_round:
        return 1.0
    return min(1.0, policy.clients_per_round / n)
