"""The embedded corpus: naturally heterogeneous text that ships with the package.

Each source (a language or an English domain) is one `<name>.jsonl.xz` file in
`data/embedded/` (one JSON string per line, one document per line) described by
`MANIFEST.json` (language, domain, counts, sha256 of the decompressed content).
The manifest is the single source of truth for which sources exist, so this
module hard-codes no source names. `scripts/build_corpus.py` rebuilds it all.
"""
from __future__ import annotations

import functools
import hashlib
import json
import lzma
from pathlib import Path
from typing import NamedTuple

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
REBUILD_COMMAND = "python scripts/build_corpus.py"


class CorpusError(RuntimeError):
    """The embedded corpus is missing, empty or corrupt (the message says how to fix it)."""


class SourceInfo(NamedTuple):
    name: str
    language: str  # ISO 639-1 code; code_py counts as "en" (English identifiers/comments)
    domain: str  # technical | informal | code | literature
    n_documents: int
    n_bytes: int  # UTF-8 bytes of all documents (separators excluded)


def _fix_hint(root: Path, file: str | None = None) -> str:
    """How to get a good copy back: from git in a source checkout, else by reinstalling;
    rebuilding from the Debian sources always works (and rewrites the manifest)."""
    target = root / file if file else root
    repo = next((p for p in (root, *root.parents) if (p / ".git").exists()), None)
    if repo is not None:
        restore = f"`git -C {repo} checkout -- {target.relative_to(repo)}`"
    elif root == EMBEDDED_DIR:
        restore = "a reinstall of worldlm_jax (`pip install --force-reinstall --no-deps` its wheel or source)"
    else:
        restore = f"a copy of {EMBEDDED_DIR / target.name}"
    return f"restore it with {restore}, or rebuild the corpus with `{REBUILD_COMMAND}`"


def _read_manifest(root: Path) -> dict:
    path = root / "MANIFEST.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorpusError(f"corpus manifest {path} is missing; {_fix_hint(root, path.name)}") from None
    except json.JSONDecodeError as err:
        raise CorpusError(f"corpus manifest {path} is corrupt ({err}); {_fix_hint(root, path.name)}") from None
    if not manifest.get("sources"):
        raise CorpusError(f"corpus manifest {path} lists no sources; {_fix_hint(root, path.name)}")
    return manifest


# Cached: the package's files do not change while a run is going; verify_corpus
# bypasses the caches because its job is to look at the disk.
_manifest = functools.lru_cache(maxsize=8)(_read_manifest)


def _entry(name: str, root: Path, manifest: dict | None = None) -> dict:
    sources = (manifest or _manifest(root))["sources"]
    if name not in sources:
        raise ValueError(f"unknown corpus source {name!r}; allowed: {', '.join(sources)}")
    return sources[name]


def _root(root: Path | str | None) -> Path:
    return EMBEDDED_DIR if root is None else Path(root).resolve()


def list_sources(root: Path | str | None = None) -> tuple[str, ...]:
    """Names of all embedded sources, in manifest order."""
    return tuple(_manifest(_root(root))["sources"])


def source_info(name: str, root: Path | str | None = None) -> SourceInfo:
    """Language, domain and size of one source (from the manifest; reads no text)."""
    entry = _entry(name, _root(root))
    return SourceInfo(name, entry["language"], entry["domain"], entry["n_documents"], entry["n_bytes"])


def source_sha256(name: str, root: Path | str | None = None) -> str:
    """sha256 of a source's decompressed content, as recorded in the manifest."""
    return _entry(name, _root(root))["sha256"]


def _read_checked(name: str, root: Path, manifest: dict | None = None) -> bytes:
    """Decompressed content of one source, verified against the manifest checksum.

    Raises a one-line CorpusError naming the source, its file, what is wrong (for a
    checksum mismatch: expected and actual sha256) and how to restore the file."""
    entry = _entry(name, root, manifest)
    path = root / entry["file"]
    problem = None
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        problem = "is missing"
    else:
        try:
            content = lzma.decompress(raw)
        except lzma.LZMAError as err:
            problem = (f"is not valid xz data ({_one_line(err)}), so its content cannot match "
                       f"the expected sha256 {entry['sha256']}")
        else:
            actual = hashlib.sha256(content).hexdigest()
            if not content.strip():
                problem = "is empty"
            elif actual != entry["sha256"]:
                problem = (f"does not match MANIFEST.json (corrupt or edited): sha256 of its "
                           f"content is {actual}, expected {entry['sha256']}")
    if problem:
        raise CorpusError(f"corpus source {name!r}: {path} {problem}; {_fix_hint(root, entry['file'])}")
    return content


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


# Verified once per process per (source, directory): the sha256 is computed on the
# first load only; a failed load is not cached, so a restored file loads on retry.
@functools.lru_cache(maxsize=64)
def _load(name: str, root: Path) -> tuple[str, ...]:
    content = _read_checked(name, root)
    return tuple(json.loads(line) for line in content.decode("utf-8").splitlines())


def load_source(name: str, root: Path | str | None = None) -> list[str]:
    """All documents of one source, checksum-verified against MANIFEST.json on the
    first load in this process (cached; returns a fresh list). A damaged file raises
    CorpusError naming it, the expected and actual sha256 and how to restore it."""
    return list(_load(name, _root(root)))


def verify_corpus(root: Path | str | None = None) -> dict[str, SourceInfo]:
    """Check every source file against the manifest; raise CorpusError on the first problem.

    Returns the verified sources' info so callers can log what they checked.
    """
    root = _root(root)
    manifest = _read_manifest(root)
    verified = {}
    for name, entry in manifest["sources"].items():
        content = _read_checked(name, root, manifest)  # existence, xz integrity, sha256
        n_documents = content.count(b"\n")
        if n_documents != entry["n_documents"]:
            raise CorpusError(f"corpus source {name!r} has {n_documents} documents, manifest says "
                              f"{entry['n_documents']}; {_fix_hint(root, 'MANIFEST.json')}")
        verified[name] = SourceInfo(name, entry["language"], entry["domain"], n_documents, entry["n_bytes"])
    return verified
