"""From a topology to client token streams and per-round fixed-shape batches.

Sources of a leaf federation -> documents -> split into its clients (iid or
Dirichlet, every Dirichlet client above a minimum of text) -> each client's
validation text held out -> a tokenizer trained on the training text only ->
tokenised train/validation streams per client (a client short in tokens gets a
larger byte floor, and the split and tokenizer are redone). Each
round, the host samples the participating clients of every leaf federation
(full, fixed size or Poisson, from a round-indexed RNG) and cuts fixed-shape
windows.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np

from worldlm_jax.data import federated, tfds_builder
from worldlm_jax.data.tokenizer import (ByteTokenizer, SentencePieceTokenizer, get_tokenizer, training_digest,
                                        training_lines)
from worldlm_jax.tree.topology import Topology


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
    and cached under a digest of exactly the lines it is trained on, so reruns
    reuse it and a model trained on other text, e.g. before validation was held
    out, never is)."""
    if name == "byte":
        return ByteTokenizer()
    if name.startswith("spm:"):
        vocab = int(name.split(":", 1)[1])
        path = tokenizer_cache_path(texts, vocab, cache_dir, seed)
        if os.path.exists(path):
            return SentencePieceTokenizer.load(path)
        os.makedirs(cache_dir, exist_ok=True)
        return SentencePieceTokenizer.train(texts, vocab, path, seed=seed)
    return get_tokenizer(name)


def tokenizer_cache_path(texts: Sequence[str], vocab: int, cache_dir: str, seed: int = 0) -> str:
    """Where `spm:VOCAB` trained on `texts` is cached: keyed on the trainer's input lines."""
    lines = training_lines(texts, SentencePieceTokenizer.MAX_LINES, seed)
    return os.path.join(cache_dir, f"spm_{vocab}_{training_digest(lines, vocab)[:16]}.model")


# ---- validation first, in text ------------------------------------------------
class ClientText(NamedTuple):
    """One client's text split into training and validation, before any tokenizer
    exists (so a tokenizer trained on `train` never saw validation text). Pieces
    are (text, followed by a document end); only a document cut in two by the
    tail split has a piece without its end."""

    train: list
    validation: list

    def train_texts(self) -> list[str]:
        return [text for text, _ in self.train if text]


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def split_validation(docs: Sequence[str], val_fraction: float, seed: int, *, seq_len: int,
                     name: str = "client", floor: tuple[int, int] | None = None) -> ClientText:
    """Hold out about val_fraction of a client's text (UTF-8 bytes) for validation.

    Whole documents (picked with `seed`), so validation is text the model and the
    tokenizer never saw; when that cannot leave the training and the validation
    side `floor` bytes each (default seq_len + 1 both: few or very unequal
    documents), the tail of the client's text (its documents in order), cut at a
    character boundary. With byte tokens and the default floor this is exactly the
    split `federated.make_client_data` makes on tokens; `prepare` raises a
    client's floor where a merging tokenizer leaves it short in tokens.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction} for {name}")
    need = seq_len + 1
    train_floor, val_floor = floor or (need, need)
    sizes = [_utf8_len(doc) + 1 for doc in docs]  # + the document end
    total = sum(sizes)
    val_docs: set[int] = set()
    val_size = 0
    for i in np.random.default_rng(seed).permutation(len(docs)):
        if val_size >= max(val_fraction * total, val_floor):
            break
        val_docs.add(int(i))
        val_size += sizes[i]
    if total - val_size >= train_floor and val_size >= val_floor:
        return ClientText([(d, True) for i, d in enumerate(docs) if i not in val_docs],
                          [(docs[i], True) for i in sorted(val_docs)])
    n_val = max(int(np.ceil(val_fraction * total)), val_floor)
    if total - n_val < train_floor:
        raise ValueError(f"{name} has {total} bytes of text: too few for a train and a validation stream "
                         f"of at least seq_len + 1 = {need} tokens each (give it more documents or use a "
                         "shorter seq_len)")
    return _tail_split(docs, sizes, total - n_val)


def _tail_split(docs: Sequence[str], sizes: Sequence[int], cut: int) -> ClientText:
    """Bytes [0, cut) of the documents (each followed by its end) train, the rest
    validates; a document the cut falls in is split at the character boundary at
    or before it (validation grows by at most 3 bytes)."""
    start = 0
    for k, size in enumerate(sizes):
        if cut < start + size:
            break
        start += size
    raw = docs[k].encode("utf-8")
    offset = cut - start  # in [0, len(raw)]: at len(raw) the cut falls before the document end
    while offset > 0 and offset < len(raw) and (raw[offset] & 0xC0) == 0x80:
        offset -= 1  # a UTF-8 continuation byte: step back to its character's start
    head, tail = raw[:offset].decode("utf-8"), raw[offset:].decode("utf-8")
    return ClientText([(d, True) for d in docs[:k]] + [(head, False)],
                      [(tail, True)] + [(d, True) for d in docs[k + 1:]])


def _stream(pieces, tokenizer) -> np.ndarray:
    eos = np.array([tokenizer.eos_id], np.int32)
    parts = [part for text, end in pieces
             for part in ((tokenizer.encode(text).astype(np.int32), eos) if end else
                          (tokenizer.encode(text).astype(np.int32),))]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def client_data(text: ClientText, tokenizer, *, seq_len: int, name: str = "client") -> federated.ClientData:
    """A client's split text -> its train/validation token streams."""
    return _checked(_client_streams(text, tokenizer), seq_len, name)


def _client_streams(text: ClientText, tokenizer) -> federated.ClientData:
    return federated.ClientData(_stream(text.train, tokenizer), _stream(text.validation, tokenizer))


def _short(data: federated.ClientData, seq_len: int) -> bool:
    return min(len(data.train), len(data.validation)) < seq_len + 1


def _checked(data: federated.ClientData, seq_len: int, name: str) -> federated.ClientData:
    need = seq_len + 1
    if _short(data, seq_len):  # only a tokenizer that merges bytes
        raise ValueError(f"{name} has {len(data.train)} training and {len(data.validation)} validation tokens "
                         f"after tokenising: each needs at least seq_len + 1 = {need} (give it more documents, "
                         "raise data.val_fraction or use a shorter seq_len)")
    return data


# Resplits of the clients short in tokens (each retrains the tokenizer). On the embedded
# corpus one is enough (many-small, 5 seeds); a floor that still falls short after these
# is reported by the client's one-line error.
MAX_RESPLITS = 4
FLOOR_MARGIN = 1.25  # a raised floor asks this much more than the client's measured bytes per token say
# Bytes per token assumed before a tokenizer exists (the Dirichlet minimum): 1 for bytes; a
# merging tokenizer averages below 4 bytes a token on the embedded corpus (spm:1024 measures
# 1.8-2.7, Russian highest), and a client it leaves short is resplit below.
SUBWORD_BYTES_PER_TOKEN = 4


def min_client_bytes(tokenizer_name: str, seq_len: int) -> int:
    """Text a client needs before any tokenizer exists: a train and a validation stream of
    seq_len + 1 tokens at the assumed bytes per token (what `split_documents` gets as
    its Dirichlet minimum)."""
    return 2 * (seq_len + 1) * (1 if tokenizer_name == "byte" else SUBWORD_BYTES_PER_TOKEN)


def _raised_floor(text: ClientText, data: federated.ClientData, seq_len: int) -> tuple[int, int]:
    """The byte floor (train, validation) for a client short in tokens: each side
    seq_len + 1 tokens at that side's measured bytes per token, times FLOOR_MARGIN
    (a short side's floor thus exceeds its present size). Where the two exceed the
    client's text, they share it in that ratio (no margin, as much as the text holds)."""
    need = seq_len + 1
    wanted = []
    for pieces, tokens in ((text.train, data.train), (text.validation, data.validation)):
        size = sum(_utf8_len(t) + end for t, end in pieces)
        wanted.append(max(need, int(np.ceil(need * size / max(len(tokens), 1) * FLOOR_MARGIN))))
    total = sum(_utf8_len(t) + end for t, end in (*text.train, *text.validation))
    if sum(wanted) <= total:
        return wanted[0], wanted[1]
    val_floor = max(need, total * wanted[1] // sum(wanted))
    return max(need, total - val_floor), val_floor


def prepare(topology: Topology, tokenizer_name: str, seq_len: int, val_fraction: float, seed: int,
            max_bytes: int = 0, data_dir: str = "", cache_dir: str = "") -> FederatedData:
    """Client data for every client of the topology, deterministically from `seed`.

    Validation is held out in text before the tokenizer is trained on the training
    text, with a floor of seq_len + 1 bytes a side. A merging tokenizer can leave a
    client fewer than seq_len + 1 tokens a side; such a client's floor is raised to
    what its measured bytes per token ask (with a margin), it is split again and the
    tokenizer retrained on the new training text, at most MAX_RESPLITS times. So the
    tokenizer still never sees validation text, and a split where every client
    already has its tokens is the one made with the plain floor.
    """
    per_leaf = leaf_documents(topology, max_bytes, data_dir)
    client_docs: list[list[str]] = [[] for _ in range(topology.n_clients)]
    min_bytes = min_client_bytes(tokenizer_name, seq_len)
    for leaf, (docs, labels) in enumerate(per_leaf):
        members = np.flatnonzero(topology.client_parent == leaf)
        split, alpha = topology.leaf_split[leaf]
        parts = federated.split_documents(docs, len(members), split, alpha, seed + leaf,
                                          labels=labels.tolist() if len(set(labels.tolist())) > 1 else None,
                                          min_bytes=min_bytes, name=f"federation '{topology.leaf.names[leaf]}'")
        for client, indices in zip(members, parts):
            client_docs[client] = [docs[i] for i in indices]
    names = [f"client '{name}'" for name in topology.client_names]
    # validation first: the tokenizer is trained on what the clients train on, nothing else
    texts = [split_validation(docs, val_fraction, seed + c, seq_len=seq_len, name=names[c])
             for c, docs in enumerate(client_docs)]
    cache = cache_dir or os.path.expanduser("~/.cache/worldlm_jax/tokenizers")
    for resplit in range(MAX_RESPLITS + 1):
        tokenizer = make_tokenizer(tokenizer_name, [t for text in texts for t in text.train_texts()], cache, seed)
        streams = [_client_streams(text, tokenizer) for text in texts]
        short = [c for c, data in enumerate(streams) if _short(data, seq_len)]
        if not short or resplit == MAX_RESPLITS:
            break
        moved = False
        for c in short:
            floor = _raised_floor(texts[c], streams[c], seq_len)
            try:
                texts[c] = split_validation(client_docs[c], val_fraction, seed + c, seq_len=seq_len,
                                            name=names[c], floor=floor)
            except ValueError:
                continue  # its text cannot hold the raised floor: its split stays, and its error below
            moved = True
        if not moved:
            break
    clients = [_checked(data, seq_len, names[c]) for c, data in enumerate(streams)]
    val_texts = [t for text in texts for t, _ in text.validation if t]
    sample = val_texts[:: max(1, len(val_texts) // 200)]  # bits per byte are measured on validation text
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
