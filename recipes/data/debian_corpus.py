r"""A real-text corpus of English prose and technical text built from Debian packages.

python recipes/data/debian_corpus.py --out data/debian-corpus [--packages a,b,c] [--validation-fraction 0.05] \
    [--validation-longest 2] [--seed 0] [--from-debs DIR] [--cache DIR] [--max-bytes N] [--max-doc-bytes N]

The packages' .deb files are fetched with `apt-get download` into a cache folder (or taken from --from-debs:
a folder of .deb files and/or folders of already-extracted packages, named PKG or PKG_VERSION...), extracted
with `dpkg-deb -x`, and their documents collected: plain text, gzip'd text (.gz, dictd .dz) and HTML (turned
into text with the standard library's html.parser), one document per file; the King James Bible of
bible-kjv-text (a compressed database read with the `bible` program of bible-kjv) gives one document per book.
Binaries, images, PDFs, code, changelogs and copyright files are skipped. Texts are lightly normalised
(line ends, trailing spaces, runs of blank lines), de-duplicated, and split into train and validation BY
DOCUMENT with the seed (--validation-longest N also holds out the N longest documents, for loss by context
position far beyond the training length: benchmarks.perplexity). Written to OUT: train.jsonl and
validation.jsonl (one {"text", "source", "path"} per line, readable as a training source:
data.source=OUT/train.jsonl, data.text_field=text) and SOURCES.md (package, version, documents, bytes and
licence, the License: lines of its copyright file).

--max-bytes caps the output (documents are taken in the shuffled order while they fit; the validation split
gets its fraction of the cap) and --max-doc-bytes cuts longer documents at a paragraph break: that is how the
small shipped sample recipes/data/sample was made (see its SOURCES.md).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import logging
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("debian_corpus")

# Free-licence packages of Debian 12 (main): scripture, a hacker lexicon, a satirical dictionary, GNU and
# Debian manuals, the Python documentation.
DEFAULT_PACKAGES = ("bible-kjv-text", "jargon-text", "dict-devil", "gnu-standards", "bash-doc",
                    "debian-reference-en", "developers-reference", "python3.11-doc", "dict-foldoc")
HELPERS = {"bible-kjv-text": ("bible-kjv",)}  # packages needed to read another one, not corpus sources
TEXT_SUFFIXES = {".txt", ".text", ".dict", ".rst", ".md", ""}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
COMPRESSED = {".gz", ".dz"}
SKIP_NAMES = re.compile(r"^(changelog|changes|copyright|news\.debian|readme\.debian|todo|install|authors|"
                        r"thanks|credits|licen[cs]e|copying|presubj|buildinfo)(\..*)?$", re.I)
SKIP_DIRS = {"man", "info", "locale", "examples", "_static", "_images", "_downloads", "_sources", "bug",
             "lintian", "doc-base", "applications", "menu", "bin", "sbin", "icons", "pixmaps", "common-licenses"}
SKIP_HTML = {"script", "style", "head", "nav", "footer", "noscript", "svg"}
SKIP_HTML_CLASSES = {"related", "sphinxsidebar", "sphinxsidebarwrapper", "footer", "navigation", "navfooter",
                     "navheader", "toc", "breadcrumbs", "mobile-nav", "headerlink"}
BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "pre", "table", "tr", "h1", "h2", "h3", "h4",
              "h5", "h6", "section", "article", "blockquote", "hr", "title", "body", "tbody", "thead"}
BIBLE_RANGE = "Gen1:1-Rev22:21"


class CorpusError(RuntimeError):
    """A corpus that cannot be built, with what to do about it."""


@dataclass
class Document:
    """One document: its text, package and path inside the package."""

    text: str
    source: str
    path: str

    def line(self) -> str:
        return json.dumps({"text": self.text, "source": self.source, "path": self.path}, ensure_ascii=False) + "\n"


@dataclass
class Package:
    """An extracted package: its name, version, root folder and licence."""

    name: str
    version: str
    root: Path
    licence: str = "unknown"
    documents: list[Document] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ text extraction
class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page: scripts, styles, heads and navigation left out, blocks on their own lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip: list[tuple[str, int]] = []  # (tag, nesting) of the element being skipped
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip:
            name, depth = self.skip[-1]
            if tag == name:
                self.skip[-1] = (name, depth + 1)
            return
        classes = set((dict(attrs).get("class") or "").split())
        role = dict(attrs).get("role")
        if tag in SKIP_HTML or classes & SKIP_HTML_CLASSES or role == "navigation":
            if tag not in ("br", "hr", "img", "meta", "link", "input"):
                self.skip.append((tag, 1))
            return
        if tag == "pre":
            self.pre += 1
        if tag in BLOCK_TAGS:
            self.parts.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "section") else "\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            name, depth = self.skip[-1]
            if tag == name:
                self.skip[-1] = (name, depth - 1)
                if depth == 1:
                    self.skip.pop()
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """The visible text of an HTML document, paragraphs separated by blank lines."""
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return "".join(parser.parts)


def normalise(text: str) -> str:
    """Light whitespace normalisation: unix line ends, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n").replace("\x00", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n" if text.strip() else ""


def decode(data: bytes) -> str | None:
    """UTF-8 (or Latin-1) text, or None for binary data."""
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
        controls = sum(1 for c in text[:8192] if ord(c) < 32 and c not in "\n\r\t\f")
        return None if controls > 8 else text


def looks_like_prose(text: str) -> bool:
    """Mostly letters and spaces (not a script, table of numbers or encoded data)."""
    sample = text[:20000]
    if not sample:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in sample)
    return letters / len(sample) >= 0.8


def read_document(path: Path) -> str | None:
    """The text of one file, or None when it is no document (binary, code, skipped name or folder)."""
    name = path.name.lower()
    stem = name
    compressed = path.suffix.lower() in COMPRESSED
    if compressed:
        stem = name[: -len(path.suffix)]
    if SKIP_NAMES.match(stem):
        return None
    suffix = Path(stem).suffix.lower()
    if suffix not in TEXT_SUFFIXES and suffix not in HTML_SUFFIXES:
        return None
    data = path.read_bytes()
    if compressed:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return None
    text = decode(data)
    if text is None:
        return None
    if suffix in HTML_SUFFIXES:
        text = html_to_text(text)
    elif suffix == "" and not looks_like_prose(text):
        return None
    return normalise(text)


def bible_books(package: Path, helpers: list[Path]) -> list[Document]:
    """The King James Bible of an extracted bible-kjv-text, one document per book, read with the `bible`
    program (of an extracted bible-kjv among `helpers`, or on PATH); verse numbers dropped, chapters headed."""
    data = package / "usr/lib/bible.data"
    programs = [h / "usr/bin/bible" for h in helpers if (h / "usr/bin/bible").is_file()]
    program = str(programs[0]) if programs else shutil.which("bible")
    if program is None:
        raise CorpusError("bible-kjv-text is a compressed database: its text needs the `bible` program of "
                          "bible-kjv (put bible-kjv's .deb next to it for --from-debs, or install bible-kjv)")
    out = subprocess.run([program, "-p", str(data.parent), BIBLE_RANGE], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0 or not out.stdout.strip():
        raise CorpusError(f"{program} could not read {data}: {out.stderr.strip() or 'no output'}")
    books: dict[str, list[tuple[int, list[str]]]] = {}
    lines = out.stdout.split("\n")
    verse: list[str] | None = None
    for i, line in enumerate(lines):
        heading = re.fullmatch(r"(\S.*\S) (\d+)", line)
        if heading and (i == 0 or not lines[i - 1].strip()):
            chapter: list[str] = []
            books.setdefault(heading.group(1), []).append((int(heading.group(2)), chapter))
            verse = None
            continue
        start = re.match(r"\s+\d+ (.*)", line)
        if start and books:
            verse = [start.group(1).strip()]
            chapter.append(verse)  # type: ignore[arg-type]
        elif line.strip() and verse is not None:
            verse.append(line.strip())
    documents = []
    for book, chapters in books.items():
        body = "\n\n".join(f"Chapter {n}\n\n" + "\n".join(" ".join(v) for v in verses) for n, verses in chapters)
        documents.append(Document(normalise(f"{book}\n\n{body}"), "bible-kjv-text", f"{data.relative_to(package)}#"
                                  f"{book}"))
    return documents


LICENCE_PHRASES = (("public domain", "public domain"),
                   ("copyright for the King James Version text of the Bible is expired", "public domain"),
                   ("GNU Free Documentation License", "GFDL"), ("GNU General Public License", "GPL"),
                   ("PSF LICENSE AGREEMENT", "PSF"),
                   ("Python Software Foundation License", "PSF"))


def licence_of(root: Path, name: str) -> str:
    """The short License: names of the package's copyright file, in order; for a copyright file that is not
    machine-readable, the licences it names (public domain, GFDL, GPL, PSF) and where to read it."""
    candidates = [root / "usr/share/doc" / name / "copyright"] + sorted(root.glob("usr/share/doc/*/copyright"))
    for path in candidates:
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            values = (m.strip() for m in re.findall(r"^License:[ \t]*(\S.*)$", text, re.M))
            licences = list(dict.fromkeys(v for v in values if re.fullmatch(r"[\w.+\-]+( [\w.+\-]+){0,5}", v)))
            if licences:
                return "; ".join(licences[:8])
            named = list(dict.fromkeys(short for phrase, short in LICENCE_PHRASES if phrase.lower() in text.lower()))
            where = f"/{path.relative_to(root)}"
            return f"{', '.join(named)} (free text, not machine-readable: see {where})" if named else f"see {where}"
    return "unknown (no copyright file)"


def collect(package: Package, helpers: list[Path], min_chars: int) -> list[Document]:
    """The documents of an extracted package."""
    if package.name == "bible-kjv-text" and (package.root / "usr/lib/bible.data").is_file():
        return bible_books(package.root, helpers)
    documents = []
    files = sorted(p for p in package.root.rglob("*") if p.is_file() and not p.is_symlink())
    for path in tqdm(files, desc=package.name, unit="file", leave=False, disable=None):
        rel = path.relative_to(package.root)
        if rel.parts[0] == "DEBIAN" or SKIP_DIRS & set(rel.parts[:-1]):
            continue
        text = read_document(path)
        if text and len(text) >= min_chars:
            documents.append(Document(text, package.name, str(rel)))
    return documents


# ------------------------------------------------------------------------------------------- packages
def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


def deb_field(deb: Path, name: str) -> str:
    """A control field of a .deb file."""
    out = _run(["dpkg-deb", "-f", str(deb), name])
    if out.returncode != 0:
        raise CorpusError(f"dpkg-deb cannot read {deb}: {out.stderr.strip()}")
    return out.stdout.strip()


def download(names: list[str], cache: Path) -> list[Path]:
    """The .deb files of `names` in cache/debs, fetched with apt-get download where missing."""
    folder = cache / "debs"
    folder.mkdir(parents=True, exist_ok=True)
    missing = [n for n in names if not list(folder.glob(f"{n}_*.deb"))]
    if missing and shutil.which("apt-get") is None:
        raise CorpusError("apt-get is not available here: download the .deb files elsewhere (apt-get download "
                          f"{' '.join(missing)}) and pass their folder with --from-debs DIR")
    for name in tqdm(missing, desc="apt-get download", unit="pkg", disable=None):
        out = _run(["apt-get", "download", name], cwd=folder)
        if out.returncode != 0 or not list(folder.glob(f"{name}_*.deb")):
            reason = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "no .deb file appeared"
            if "Unable to locate" in out.stderr or "has no installation candidate" in out.stderr:
                reason = "no such package in the configured apt sources (check the name with apt-cache search)"
            raise CorpusError(f"package {name!r}: apt-get download failed: {reason}")
    debs = []
    for name in names:
        found = sorted(folder.glob(f"{name}_*.deb"))
        debs.append(found[-1])
    return debs


def extract(deb: Path, cache: Path) -> Package:
    """An extracted .deb (dpkg-deb -x into cache/extracted, once)."""
    if shutil.which("dpkg-deb") is None:
        raise CorpusError("dpkg-deb is not available: pass extracted package folders with --from-debs instead")
    name, version = deb_field(deb, "Package"), deb_field(deb, "Version")
    root = cache / "extracted" / f"{name}_{version}"
    done = root / ".extracted"
    if not done.exists():
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        out = _run(["dpkg-deb", "-x", str(deb), str(root)])
        if out.returncode != 0:
            raise CorpusError(f"dpkg-deb -x {deb} failed: {out.stderr.strip()}")
        done.touch()
    return Package(name, version, root)


def folder_package(folder: Path) -> Package:
    """An already-extracted package folder named PKG or PKG_VERSION[_ARCH] (a DEBIAN/control wins)."""
    name, _, rest = folder.name.partition("_")
    version = rest.split("_")[0] if rest else "unknown"
    control = folder / "DEBIAN" / "control"
    if control.is_file():
        fields = dict(re.findall(r"^(\S+):[ \t]*(.*)$", control.read_text(errors="replace"), re.M))
        name, version = fields.get("Package", name), fields.get("Version", version)
    return Package(name, version, folder)


def gather(args: argparse.Namespace, cache: Path) -> tuple[list[Package], list[Path]]:
    """The corpus packages and the helper package folders, extracted."""
    wanted = [p.strip() for p in args.packages.split(",") if p.strip()] if args.packages else None
    if args.from_debs:
        source = Path(args.from_debs)
        if not source.is_dir():
            raise CorpusError(f"--from-debs {source}: no such folder")
        found: dict[str, Package] = {}
        entries = sorted(source.iterdir())
        for entry in tqdm(entries, desc="extract", unit="pkg", disable=None):
            if entry.suffix == ".deb" and entry.is_file():
                package = extract(entry, cache)
            elif entry.is_dir():
                package = folder_package(entry)
            else:
                continue
            found[package.name] = package
        helper_names = {h for p in (wanted or found) for h in HELPERS.get(p, ())}
        names = wanted if wanted is not None else [n for n in found if n not in helper_names]
        absent = [n for n in names if n not in found]
        if absent:
            raise CorpusError(f"--from-debs {source} holds no package {', '.join(map(repr, absent))} (found: "
                              f"{', '.join(sorted(found)) or 'none'}; give a .deb file or a folder named PKG or "
                              "PKG_VERSION)")
        helpers = [found[h].root for h in helper_names if h in found]
        return [found[n] for n in names], helpers
    names = list(wanted or DEFAULT_PACKAGES)
    helper_names = [h for n in names for h in HELPERS.get(n, ()) if h not in names]
    debs = download(names + helper_names, cache)
    packages = [extract(deb, cache) for deb in tqdm(debs, desc="extract", unit="pkg", disable=None)]
    return packages[:len(names)], [p.root for p in packages[len(names):]]


# ------------------------------------------------------------------------------------------- the corpus
def cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes at a paragraph (else line) break."""
    if len(text.encode("utf-8")) <= limit:
        return text
    head = text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
    for sep in ("\n\n", "\n"):
        at = head.rfind(sep)
        if at > limit // 4:
            return head[:at].rstrip() + "\n"
    return head.rstrip() + "\n"


def split(documents: list[Document], fraction: float, seed: int,
          longest: int = 0) -> tuple[list[Document], list[Document]]:
    """Train and validation documents: the `longest` longest documents (by bytes) and round(fraction * n) of the
    others drawn with the seed (at least one when fraction > 0 and there are two or more) go to validation, as
    long as one document stays for training; both lists in the shuffled order."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    by_length = sorted(order, key=lambda i: -len(documents[i].text.encode("utf-8")))
    held = set(by_length[:min(longest, len(documents) - 1)])
    rest = [i for i in order if i not in held]
    n_val = round(fraction * len(documents))
    if fraction > 0 and len(documents) > 1:
        n_val = max(1, n_val)
    val = held | set(rest[:max(0, min(n_val, len(documents) - 1 - len(held)))])
    return ([documents[i] for i in order if i not in val], [documents[i] for i in order if i in val])


def cap(documents: list[Document], budget: int) -> list[Document]:
    """The documents, in order, that fit in `budget` bytes of jsonl (those that do not fit are skipped)."""
    kept, used = [], 0
    for doc in documents:
        size = len(doc.line().encode("utf-8"))
        if used + size <= budget:
            kept.append(doc)
            used += size
    return kept


def write_sources(out: Path, packages: list[Package], train: list[Document], val: list[Document],
                  command: str) -> None:
    """SOURCES.md: every package with its version, documents, bytes and licence."""
    rows = ["| package | version | documents (train / validation) | bytes of text | licence |",
            "|---|---|---|---|---|"]
    for p in packages:
        t = [d for d in train if d.source == p.name]
        v = [d for d in val if d.source == p.name]
        size = sum(len(d.text.encode("utf-8")) for d in t + v)
        rows.append(f"| {p.name} | {p.version} | {len(t) + len(v)} ({len(t)} / {len(v)}) | {size:,} | {p.licence} |")
    total = sum(len(d.text.encode("utf-8")) for d in train + val)
    longest = max(train + val, key=lambda d: len(d.text), default=None)
    text = ["# Sources", "",
            "Built from Debian packages by recipes/data/debian_corpus.py:", "", f"    {command}", "",
            f"{len(train) + len(val)} documents ({len(train)} train, {len(val)} validation), {total:,} bytes of "
            "text" + (f"; the longest: {longest.source} {longest.path}, {len(longest.text.encode('utf-8')):,} "
                      "bytes." if longest else "."), "",
            "Licences are the License: fields of each package's /usr/share/doc/PKG/copyright (the text of the",
            "King James Bible is in the public domain: its copyright, its copyright file says, has expired).", "",
            *rows, ""]
    (out / "SOURCES.md").write_text("\n".join(text))


def build(args: argparse.Namespace) -> dict:
    """Build the corpus; returns its statistics."""
    if not 0.0 <= args.validation_fraction < 1.0:
        raise CorpusError(f"--validation-fraction must lie in [0, 1), got {args.validation_fraction}")
    if args.validation_longest < 0:
        raise CorpusError(f"--validation-longest must be >= 0, got {args.validation_longest}")
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out.parent / (out.name + "-cache")
    packages, helpers = gather(args, cache)
    documents: list[Document] = []
    seen: set[str] = set()
    for package in tqdm(packages, desc="collect", unit="pkg", disable=None):
        package.licence = licence_of(package.root, package.name)
        docs = collect(package, helpers, args.min_chars)
        if args.max_doc_bytes:
            docs = [Document(cut(d.text, args.max_doc_bytes), d.source, d.path) for d in docs]
        kept = 0
        for doc in docs:
            digest = hashlib.sha256(doc.text.encode("utf-8")).hexdigest()
            if digest not in seen:
                seen.add(digest)
                documents.append(doc)
                kept += 1
        log.info("%s %s: %d documents (%d duplicates dropped), licence %s", package.name, package.version, kept,
                 len(docs) - kept, package.licence)
        if not kept:
            log.warning("%s gave no documents", package.name)
    if not documents:
        raise CorpusError("no documents found in the packages")
    train, val = split(documents, args.validation_fraction, args.seed, args.validation_longest)
    if args.max_bytes:
        val_budget = int(args.max_bytes * args.validation_fraction)
        val = cap(val, val_budget)
        train = cap(train, args.max_bytes - sum(len(d.line().encode("utf-8")) for d in val))
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train.jsonl", train), ("validation.jsonl", val)):
        with (out / name).open("w", encoding="utf-8") as f:
            f.writelines(d.line() for d in docs)
    command = "python recipes/data/debian_corpus.py " + " ".join(args.argv)
    write_sources(out, packages, train, val, command)
    everything = train + val
    stats = {"documents": len(everything), "train": len(train), "validation": len(val),
             "bytes": sum(len(d.text.encode("utf-8")) for d in everything),
             "longest": max((len(d.text.encode("utf-8")), d.source, d.path) for d in everything)}
    log.info("wrote %s: %s", out, stats)
    return stats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (train.jsonl, validation.jsonl, SOURCES.md)")
    parser.add_argument("--packages", help=f"comma-separated Debian packages (default: {','.join(DEFAULT_PACKAGES)};"
                                           " with --from-debs: every package found there)")
    parser.add_argument("--validation-fraction", type=float, default=0.05, help="fraction of documents held out")
    parser.add_argument("--validation-longest", type=int, default=2,
                        help="also hold out this many of the longest documents (long-context evaluation; with the "
                             "default packages: FOLDOC, 5.6 MB, and the Jargon File, 1.6 MB)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    parser.add_argument("--from-debs", help="a folder of downloaded .deb files and/or extracted package folders "
                                            "(no apt-get needed)")
    parser.add_argument("--cache", help="where .deb files are downloaded and extracted (default: OUT-cache)")
    parser.add_argument("--max-bytes", type=int, help="cap the output at this many bytes of jsonl")
    parser.add_argument("--max-doc-bytes", type=int, help="cut longer documents at a paragraph break")
    parser.add_argument("--min-chars", type=int, default=200, help="drop shorter documents")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return build(args)
    except CorpusError as err:
        log.error("%s", err)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
