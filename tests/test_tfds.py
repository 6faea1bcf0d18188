"""tfds builder (array_record, random access without TensorFlow) and load_documents."""
import subprocess
import sys

import pytest

from worldlm_jax.data import corpus, tfds_builder as tb


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def test_builder_random_access_equals_embedded_documents(data_dir):
    docs = corpus.load_source("man_it")
    data_source = tb.prepare_source("man_it", data_dir).as_data_source()
    assert set(data_source) == {"train", "validation"}
    train, validation = data_source["train"], data_source["validation"]
    assert len(train) + len(validation) == len(docs) and len(validation) > 0
    for split, expect_validation in ((train, False), (validation, True)):
        for i in reversed(range(len(split))):  # random access, out of order
            record = split[i]
            assert record["text"].decode("utf-8") == docs[int(record["index"])]
            assert tb.is_validation(docs[int(record["index"])]) == expect_validation
    assert (data_dir / "worldlm_corpus" / "man_it").is_dir()
    assert any(p.name.endswith(".array_record-00000-of-00001")
               for p in (data_dir / "worldlm_corpus" / "man_it").rglob("*"))


def test_load_documents_paths_agree(data_dir):
    embedded = tb.load_documents("embedded:man_it")
    assert tb.load_documents("tfds:man_it", data_dir=data_dir) == embedded
    # generic tfds path (tfds.data_source by registered name), with split and field
    validation = tb.load_documents("tfds:worldlm_corpus/man_it:validation#text", data_dir=data_dir)
    assert validation == [d for d in embedded if tb.is_validation(d)]
    assert tb.load_documents("tfds:man_it:train", data_dir=data_dir) == [
        d for d in embedded if not tb.is_validation(d)]


def test_second_source_config_builds_separately(data_dir):
    docs = tb.load_documents("tfds:fortunes_es:validation", data_dir=data_dir)
    assert docs and set(docs) < set(corpus.load_source("fortunes_es"))


def test_dir_loader_reads_each_txt_file_as_a_document(tmp_path):
    (tmp_path / "b.txt").write_text("второй документ\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first document", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    assert tb.load_documents(f"dir:{tmp_path}") == ["first document", "второй документ\n", "third"]


@pytest.mark.parametrize("spec, message", [
    ("man_it", "bad data spec 'man_it'"),
    ("web:man_it", "bad data spec 'web:man_it'"),
    ("tfds:", "bad data spec 'tfds:'"),
    ("embedded:klingon", "'klingon'.*allowed"),
    ("tfds:man_it:test", "unknown split 'test'"),
])
def test_bad_specs_raise_clear_errors(spec, message, data_dir):
    with pytest.raises(ValueError, match=message):
        tb.load_documents(spec, data_dir=data_dir)


def test_empty_and_missing_dirs_name_the_spec(tmp_path):
    with pytest.raises(ValueError, match=rf"'dir:{tmp_path}': no non-empty .txt file"):
        tb.load_documents(f"dir:{tmp_path}")
    with pytest.raises(ValueError, match="not a directory"):
        tb.load_documents(f"dir:{tmp_path / 'nope'}")


def test_reading_through_tfds_does_not_import_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "from worldlm_jax.data import tfds_builder as tb\n"
        f"docs = tb.load_documents('tfds:man_it', data_dir={str(tmp_path)!r})\n"
        "assert docs\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
        "print(len(docs))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == corpus.source_info("man_it").n_documents


def test_stale_build_is_regenerated(tmp_path):
    builder = tb.prepare_source("man_it", tmp_path)
    info_file = tmp_path / "worldlm_corpus" / "man_it" / "1.0.0" / "dataset_info.json"
    assert not tb._is_stale(builder)
    info_file.write_text(info_file.read_text().replace("sha256", "sha256 OLD"))
    assert tb._is_stale(tb.WorldlmCorpus(config="man_it", data_dir=str(tmp_path), file_format="array_record"))
    assert tb.load_documents("tfds:man_it", data_dir=tmp_path) == corpus.load_source("man_it")
    assert "OLD" not in info_file.read_text()
