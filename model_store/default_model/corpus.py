"""The bundled default model's corpus: fetched from Debian's archive, pinned and hash-checked, cleaned, split.

Sources (both public-domain English prose; see `SOURCES` for versions and hashes):
- Jane Austen's six novels, from `r-cran-janeaustenr` (CRAN's janeaustenr, MIT; the texts are Project
  Gutenberg's, public domain). The novels are R character vectors, read without R by `rdata`.
- The King James Bible, from `bible-kjv-text` (public domain), dumped verse by verse with the `bible`
  program of `bible-kjv` (run from the extracted package, never installed).

Owns fetching, extraction, cleaning and the train / held-out split. The split is deterministic: the last
`HELDOUT_FRACTION` of every document (a novel or a book of the Bible), cut at a paragraph boundary, is
held out, so held-out text is never seen in training and every document contributes to both.
"""

import hashlib
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .rdata import read_lazyload

HELDOUT_FRACTION = 0.05


@dataclass(frozen=True)
class DebianPackage:
    name: str
    version: str
    arch: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version}_{self.arch}.deb"


AUSTEN = DebianPackage(
    "r-cran-janeaustenr", "1.0.0-1", "all", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
)
KJV_TEXT = DebianPackage(
    "bible-kjv-text", "4.38", "all", "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"
)
KJV_PROGRAM = DebianPackage(
    "bible-kjv", "4.38", "amd64", "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d"
)
SOURCES = (AUSTEN, KJV_TEXT, KJV_PROGRAM)
LICENSE = (
    "Public domain texts: Jane Austen's six novels (as packaged by CRAN's janeaustenr 1.0.0, MIT, from "
    "Project Gutenberg) and the King James Version of the Bible (1611; Debian bible-kjv-text 4.38)."
)
_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


@dataclass(frozen=True)
class Document:
    source: str  # e.g. "austen/emma", "kjv/Ge"
    paragraphs: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


def fetch(package: DebianPackage, cache: Path) -> Path:
    """`apt-get download` the pinned version into `cache` (once) and check its sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / package.filename
    if not path.is_file():
        arch = "" if package.arch == "all" else f":{package.arch}"
        spec = f"{package.name}{arch}={package.version}"
        result = subprocess.run(["apt-get", "download", spec], cwd=cache, capture_output=True, text=True)
        if result.returncode != 0 or not path.is_file():
            raise RuntimeError(
                f"apt-get download {spec} failed (run `apt-get update` first; the {package.arch} package is "
                f"needed): {result.stderr.strip()[-500:]}"
            )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != package.sha256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {package.sha256}")
    return path


def extract(deb: Path, into: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return into


def austen_documents(root: Path) -> list[Document]:
    novels = read_lazyload(root / "usr/lib/R/site-library/janeaustenr/data")
    return [Document(f"austen/{name}", tuple(_austen_paragraphs(novels[name]))) for name in _NOVELS]


def _austen_paragraphs(lines: list[str | None]) -> list[str]:
    """Unwrap Gutenberg's hard-wrapped lines into paragraphs; drop `_italic_` marks and double spaces."""
    paragraphs, current = [], []
    for line in [*lines, ""]:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(" ".join(current).replace("_", "").split()))
            current = []
    return paragraphs


def kjv_documents(root: Path) -> list[Document]:
    """One document per book, one paragraph per chapter, verse numbers dropped."""
    result = subprocess.run(
        [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-f", "Gen1:1-Rev22:21"],
        capture_output=True,
        text=True,
        check=True,
    )
    books: dict[str, dict[int, list[str]]] = {}
    for line in result.stdout.splitlines():
        match = _VERSE.match(line.strip())
        if match:
            book, chapter, _, text = match.groups()
            books.setdefault(book, {}).setdefault(int(chapter), []).append(" ".join(text.split()))
    if sum(len(v) for chapters in books.values() for v in chapters.values()) != 31102:
        raise RuntimeError("the KJV dump does not have the 31,102 verses of the KJV")
    return [
        Document(f"kjv/{book}", tuple(" ".join(verses) for verses in chapters.values()))
        for book, chapters in books.items()
    ]


def split(document: Document, fraction: float = HELDOUT_FRACTION) -> tuple[Document, Document | None]:
    """(train, held-out): the held-out part is the document's last `fraction` of characters, by paragraph."""
    total = sum(len(p) for p in document.paragraphs)
    kept, cut = 0, len(document.paragraphs)
    while cut > 1 and kept + len(document.paragraphs[cut - 1]) <= fraction * total:
        kept += len(document.paragraphs[cut - 1])
        cut -= 1
    train = Document(document.source, document.paragraphs[:cut])
    heldout = Document(document.source, document.paragraphs[cut:]) if cut < len(document.paragraphs) else None
    return train, heldout


def prepare_corpus(out: Path, cache: Path) -> dict:
    """Fetch, extract, clean and split; writes train/heldout .jsonl and heldout.txt; returns the facts."""
    debs = {p.name: fetch(p, cache) for p in SOURCES}
    with tempfile.TemporaryDirectory() as tmp:
        austen = austen_documents(extract(debs[AUSTEN.name], Path(tmp) / "austen"))
        kjv_root = Path(tmp) / "kjv"
        extract(debs[KJV_TEXT.name], kjv_root)
        kjv = kjv_documents(extract(debs[KJV_PROGRAM.name], kjv_root))
    train, heldout = [], []
    for document in austen + kjv:
        part, held = split(document)
        train.append(part)
        heldout += [held] if held else []
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train), ("heldout", heldout)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for doc in docs:
                fh.write(json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False) + "\n")
    (out / "heldout.txt").write_text("\n\n".join(d.text for d in heldout) + "\n", encoding="utf-8")
    facts = {
        "sources": [{"package": p.name, "version": p.version, "arch": p.arch, "sha256": p.sha256} for p in SOURCES],
        "license": LICENSE,
        "heldout_fraction": HELDOUT_FRACTION,
        "documents": {"train": len(train), "heldout": len(heldout)},
        "bytes": {
            "train": sum(len(d.text.encode()) for d in train),
            "heldout_txt": (out / "heldout.txt").stat().st_size,
        },
        "files_sha256": {
            f: hashlib.sha256((out / f).read_bytes()).hexdigest()
            for f in ("train.jsonl", "heldout.jsonl", "heldout.txt")
        },
    }
    (out / "corpus.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
