"""The embedded corpus: present, diverse, checksum-verified, with clear errors."""
import hashlib
import lzma
import shutil

import pytest

from worldlm_jax.data import corpus


def test_every_source_is_non_empty_and_matches_its_manifest_entry():
    for name in corpus.list_sources():
        docs = corpus.load_source(name)
        info = corpus.source_info(name)
        assert len(docs) == info.n_documents > 0
        assert sum(len(d.encode("utf-8")) for d in docs) == info.n_bytes >= 150_000
        assert all(d.strip() for d in docs), name
        assert "\x00" not in "".join(docs)  # the byte tokenizer uses NUL as document separator


def test_corpus_spans_seven_languages_and_three_english_domains():
    infos = [corpus.source_info(name) for name in corpus.list_sources()]
    assert {"en", "de", "fr", "es", "it", "pl", "ru"} <= {i.language for i in infos}
    assert len({i.domain for i in infos if i.language == "en"}) >= 3


def test_sources_are_really_in_their_language():
    assert sum("Я" <= ch <= "я" for ch in "".join(corpus.load_source("man_ru"))) > 100_000
    assert "def " in "".join(corpus.load_source("code_py"))
    german = "".join(corpus.load_source("man_de"))
    assert german.count(" und ") > german.count(" and ")


def test_documents_are_unique_within_a_source():
    for name in corpus.list_sources():
        docs = corpus.load_source(name)
        assert len(set(docs)) == len(docs), name


def test_man_pages_have_no_roff_markup_left():
    # A few hits are legitimate: man-pages(7) and groff pages quote roff markup.
    for name in [n for n in corpus.list_sources() if n.startswith("man_")]:
        text = "".join(corpus.load_source(name))
        for markup in ("\\fB", "\\fI", "\\fR", "\\(em", "\n.TH ", "\n.SH ", "\n.PP", '.\\"'):
            assert text.count(markup) <= 3, (name, markup)
        assert "\n\n\n" not in text


def test_verify_corpus_passes_on_the_committed_files():
    assert set(corpus.verify_corpus()) == set(corpus.list_sources())


@pytest.fixture
def corpus_copy(tmp_path):
    root = tmp_path / "embedded"
    shutil.copytree(corpus.EMBEDDED_DIR, root)
    return root


def test_missing_source_file_names_the_source_and_the_fix(corpus_copy):
    (corpus_copy / "man_it.jsonl.xz").unlink()
    with pytest.raises(corpus.CorpusError, match=r"'man_it'.*missing.*build_corpus\.py"):
        corpus.verify_corpus(corpus_copy)
    with pytest.raises(corpus.CorpusError, match="man_it"):
        corpus.load_source("man_it", root=corpus_copy)


def test_corrupt_source_file_is_detected(corpus_copy):
    path = corpus_copy / "fortunes_es.jsonl.xz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(corpus.CorpusError, match=r"'fortunes_es'.*build_corpus\.py"):
        corpus.verify_corpus(corpus_copy)


def test_edited_content_fails_the_checksum(corpus_copy):
    path = corpus_copy / "lit_en.jsonl.xz"
    content = lzma.decompress(path.read_bytes()).replace(b"Hamlet", b"Omelet")
    path.write_bytes(lzma.compress(content))
    with pytest.raises(corpus.CorpusError, match=r"'lit_en'.*sha256"):
        corpus.verify_corpus(corpus_copy)


def test_empty_source_file_is_detected(corpus_copy):
    (corpus_copy / "code_py.jsonl.xz").write_bytes(lzma.compress(b""))
    with pytest.raises(corpus.CorpusError, match=r"'code_py'.*empty"):
        corpus.verify_corpus(corpus_copy)


def test_missing_manifest_is_a_corpus_error(tmp_path):
    with pytest.raises(corpus.CorpusError, match=r"MANIFEST\.json.*missing"):
        corpus.list_sources(tmp_path)


def test_unknown_source_names_value_and_allowed_names():
    with pytest.raises(ValueError, match=r"'klingon'.*man_en.*fortunes_en"):
        corpus.load_source("klingon")
    with pytest.raises(ValueError, match="klingon"):
        corpus.source_info("klingon")


def test_load_source_returns_a_fresh_list_each_call():
    first = corpus.load_source("man_it")
    first.clear()
    assert len(corpus.load_source("man_it")) == corpus.source_info("man_it").n_documents


def _build_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "build_corpus.py"
    spec = importlib.util.spec_from_file_location("build_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_roff_stripper_keeps_visible_text_and_drops_markup():
    build = _build_script()
    roff = "\n".join([
        '.\\" a comment that must vanish',
        '.TH LS 1 "2022" "GNU" "User Commands"',
        ".SH NAME",
        "ls \\- list directory contents",
        ".SH DESCRIPTION",
        "List information about the \\fIFILE\\fPs",
        "(the current directory by default).",
        ".TP",
        ".BR \\-a \", \" \\-\\-all",
        "do not ignore entries \\(em even hidden ones",
        ".de XX",
        "secret macro body",
        "..",
        ".nf",
        "code line one",
        "code line two",
        ".fi",
    ])
    text = build.normalise_prose(build.roff_to_text(roff))
    assert text == (
        "LS(1)\n\nNAME\n\nls - list directory contents\n\nDESCRIPTION\n\n"
        "List information about the FILEs (the current directory by default).\n\n"
        "-a, --all\ndo not ignore entries \u2014 even hidden ones\n"
        "code line one\ncode line two"
    )


def _recompress_edited(path, old=b" the ", new=b" teh "):
    """Valid xz whose content differs from the manifest's: only the sha256 can tell."""
    content = lzma.decompress(path.read_bytes())
    assert old in content
    path.write_bytes(lzma.compress(content.replace(old, new, 1)))


def test_damaged_source_fails_to_load_naming_file_hashes_and_fix(corpus_copy):
    """Loading (not only verify_corpus) checks the manifest: a one-line error with the
    file, the expected and the actual sha256 and how to restore it; other sources load."""
    path = corpus_copy / "man_fr.jsonl.xz"
    _recompress_edited(path)
    expected = corpus.source_sha256("man_fr", root=corpus_copy)
    with pytest.raises(corpus.CorpusError) as err:
        corpus.load_source("man_fr", root=corpus_copy)
    message = str(err.value)
    assert "\n" not in message
    assert "'man_fr'" in message and str(path) in message
    assert f"expected {expected}" in message
    actual = hashlib.sha256(lzma.decompress(path.read_bytes())).hexdigest()
    assert f"is {actual}" in message and actual != expected
    assert str(corpus.EMBEDDED_DIR / "man_fr.jsonl.xz") in message and "build_corpus.py" in message
    docs = corpus.load_source("man_de", root=corpus_copy)  # the others still load
    assert len(docs) == corpus.source_info("man_de").n_documents


def test_truncated_source_fails_to_load_by_name(corpus_copy):
    path = corpus_copy / "fortunes_pl.jsonl.xz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(corpus.CorpusError, match=r"'fortunes_pl'.*fortunes_pl\.jsonl\.xz is not valid xz"):
        corpus.load_source("fortunes_pl", root=corpus_copy)
    assert corpus.load_source("fortunes_it", root=corpus_copy)


def test_fix_hint_of_a_checkout_names_the_git_command():
    hint = corpus._fix_hint(corpus.EMBEDDED_DIR, "man_en.jsonl.xz")
    if any((p / ".git").exists() for p in corpus.EMBEDDED_DIR.parents):
        assert "git -C" in hint and "checkout -- worldlm_jax/data/embedded/man_en.jsonl.xz" in hint
    else:  # an installed package: reinstall it
        assert "reinstall" in hint


def test_each_source_is_hashed_once_per_process(corpus_copy, monkeypatch):
    """The sha256 is computed on the first load only; a failed load is retried."""
    calls = []
    read_checked = corpus._read_checked
    monkeypatch.setattr(corpus, "_read_checked", lambda *a: calls.append(a[0]) or read_checked(*a))
    for _ in range(3):
        corpus.load_source("man_es", root=corpus_copy)
    assert calls == ["man_es"]
    good = (corpus_copy / "man_pl.jsonl.xz").read_bytes()
    (corpus_copy / "man_pl.jsonl.xz").write_bytes(b"garbage")
    with pytest.raises(corpus.CorpusError, match="man_pl"):
        corpus.load_source("man_pl", root=corpus_copy)
    (corpus_copy / "man_pl.jsonl.xz").write_bytes(good)
    assert corpus.load_source("man_pl", root=corpus_copy)
