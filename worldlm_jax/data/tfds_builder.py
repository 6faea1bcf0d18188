"""tfds access to text: the embedded corpus as a real tfds dataset, plus one loader.

`WorldlmCorpus` is a `tfds.core.GeneratorBasedBuilder` with one config per
embedded source. It is written as `array_record` and read back with
`as_data_source()`: random access through `array_record`, no TensorFlow
(tfds' tfrecord format and `as_dataset` would need it; we never call them).

`load_documents(spec)` is the single entry point the trainer uses:
  embedded:<source>                         straight from corpus.py (fast path)
  tfds:<source>[:split]                     this builder, prepared into data_dir
                                            (no split: all documents, in corpus order)
  tfds:<dataset>[/<config>][:<split>][#<field>]  any other prepared tfds dataset
  dir:<path>                                every *.txt below path is a document
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from worldlm_jax.data import corpus

DEFAULT_DATA_DIR = Path("~/.cache/worldlm_jax/tfds")
VALIDATION_PERCENT = 5  # of documents, chosen by content hash (stable under reordering)
_SPEC_KINDS = ("embedded:", "tfds:", "dir:")


def is_validation(doc: str) -> bool:
    """Deterministic split by document content, so a document never changes side."""
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < VALIDATION_PERCENT


class WorldlmCorpus(tfds.core.GeneratorBasedBuilder):
    """The embedded WorldLM corpus; one config per source (e.g. `worldlm_corpus/man_ru`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: embedded corpus built by scripts/build_corpus.py."}
    BUILDER_CONFIGS = [
        # The content hash in the description lets prepare_source spot a stale build.
        tfds.core.BuilderConfig(name=name, description=f"embedded corpus source {name}, "
                                f"sha256 {corpus.source_sha256(name)}")
        for name in corpus.list_sources()
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                # Position in corpus.load_source(name): lets readers restore document order.
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=None,
            homepage="https://arxiv.org/abs/2405.14446",
            disable_shuffling=True,  # keep document order; key = document index
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is embedded in the package
        docs = corpus.load_source(self.builder_config.name)
        return {
            "train": self._generate_examples(docs, validation=False),
            "validation": self._generate_examples(docs, validation=True),
        }

    def _generate_examples(self, docs: list[str], validation: bool):
        for index, doc in enumerate(docs):
            if is_validation(doc) == validation:
                yield index, {"text": doc, "index": index}


def _data_dir(data_dir: str | os.PathLike | None) -> str:
    return str((Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR).expanduser())


def prepare_source(source: str, data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """Build (once) the array_record files of one embedded source; returns the builder."""
    if source not in corpus.list_sources():
        raise ValueError(f"unknown corpus source {source!r}; allowed: {', '.join(corpus.list_sources())}")
    builder = WorldlmCorpus(config=source, data_dir=_data_dir(data_dir), file_format="array_record")
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if _is_stale(builder)
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return builder


def _is_stale(builder: tfds.core.DatasetBuilder) -> bool:
    """True if a previous build was made from different corpus content (e.g. after a rebuild)."""
    info_file = Path(builder.data_dir) / "dataset_info.json"
    if not info_file.exists():
        return False
    stored = json.loads(info_file.read_text(encoding="utf-8")).get("configDescription")
    return stored != builder.builder_config.description


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _load_worldlm(source: str, split: str | None, data_dir) -> list[str]:
    """Documents of one source from the tfds build; no split = all, in corpus order."""
    data_source = prepare_source(source, data_dir).as_data_source()
    splits = [split] if split else ["train", "validation"]
    for name in splits:
        if name not in data_source:
            raise ValueError(f"unknown split {name!r} for tfds:{source}; allowed: {', '.join(data_source)}")
    records = [record for name in splits for record in data_source[name]]
    records.sort(key=lambda record: int(record["index"]))
    return [_decode(record["text"]) for record in records]


def _parse_tfds_spec(body: str) -> tuple[str, str | None, str]:
    """'name[/config][:split][#field]' -> (name[/config], split or None, field)."""
    body, _, field = body.partition("#")
    name, _, split = body.partition(":")
    return name, split or None, field or "text"


def _load_tfds(body: str, spec: str, data_dir) -> list[str]:
    name, split, field = _parse_tfds_spec(body)
    if not name:
        raise ValueError(f"bad data spec {spec!r}: expected tfds:<dataset>[/<config>][:<split>][#<field>]")
    if name in corpus.list_sources():
        if field != "text":
            raise ValueError(f"bad data spec {spec!r}: embedded sources only have the field 'text'")
        return _load_worldlm(name, split, data_dir)
    data_source = tfds.data_source(name, split=split or "train", data_dir=_data_dir(data_dir))
    docs = []
    for record in data_source:
        if field not in record:
            raise ValueError(f"data spec {spec!r}: no field {field!r}; fields: {', '.join(record)}")
        docs.append(_decode(record[field]))
    return docs


def _load_dir(path: str, spec: str) -> list[str]:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"data spec {spec!r}: {folder} is not a directory")
    files = sorted(folder.rglob("*.txt"))
    docs = [text for text in (f.read_text(encoding="utf-8") for f in files) if text.strip()]
    if not docs:
        raise ValueError(f"data spec {spec!r}: no non-empty .txt file under {folder.resolve()} "
                         f"({len(files)} .txt file(s) found); a dir: source reads every *.txt below the folder")
    return docs


def load_documents(spec: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Documents named by spec (see module docstring); raises ValueError if none come back."""
    kind, sep, body = spec.partition(":")
    if not sep or f"{kind}:" not in _SPEC_KINDS or not body:
        raise ValueError(f"bad data spec {spec!r}: expected one of "
                         f"{', '.join(k + '<...>' for k in _SPEC_KINDS)}")
    if kind == "embedded":
        docs = corpus.load_source(body)
    elif kind == "tfds":
        docs = _load_tfds(body, spec, data_dir)
    else:
        docs = _load_dir(body, spec)
    if not docs:
        raise ValueError(f"data spec {spec!r} produced no documents")
    return docs
