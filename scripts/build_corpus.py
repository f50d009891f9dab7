#!/usr/bin/env python
"""Build the bundled four-class demo corpus from offline sources (no hub, no network).

Classes and sources (see skipprofiler/demo/corpus/SOURCES.md for licences):
  fiction    Jane Austen's six novels   Debian r-cran-janeaustenr (read with PyPI `rdata`)
  scripture  World English Bible        Debian sword-text-web     (read with PyPI `pysword`)
  docs       Python documentation prose Debian python3.11-doc     (_sources/**/*.rst.txt)
  code       CPython standard library   this interpreter's Lib/*.py

Usage:
  apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb /tmp/austen
  apt-get install -y sword-text-web python3.11-doc
  python scripts/build_corpus.py --austen-root /tmp/austen

Output: OUT/{train,calibration,heldout}.jsonl.gz with records {"text", "class", "source"}, plus SOURCES.md.
The split is a seeded shuffle of whole documents, so the three splits never share a document. The output folder is
built in a temporary sibling and renamed into place, so a failed run never leaves a half-built corpus.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import warnings
import zlib
from pathlib import Path

CLASSES = ("fiction", "scripture", "docs", "code")
CHUNK_CHARS = 1800  # ~450 BPE tokens: long enough for a prompt plus a continuation at seq-len 512


class SourceMissing(Exception):
    pass


def _chunk_paragraphs(paragraphs: list[str], limit: int = CHUNK_CHARS, joiner: str = "\n\n") -> list[str]:
    """Greedily pack paragraphs into documents of about `limit` characters, never splitting a paragraph."""
    docs, cur, size = [], [], 0
    for p in paragraphs:
        p = p.strip("\n")
        if not p.strip():
            continue
        if cur and size + len(p) > limit:
            docs.append(joiner.join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
    if cur:
        docs.append(joiner.join(cur))
    return [d for d in docs if len(d) >= 200]


def read_austen(root: str) -> list[str]:
    try:
        import rdata
    except ImportError as e:
        raise SourceMissing("fiction needs the PyPI package `rdata` (pip install rdata)") from e
    hits = glob.glob(os.path.join(root, "**/janeaustenr/data/Rdata.rdx"), recursive=True)
    if not hits:
        raise SourceMissing(
            f"fiction needs the Debian package r-cran-janeaustenr extracted under {root} "
            "(apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb DIR; pass --austen-root DIR)"
        )
    base = hits[0][: -len(".rdx")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_file(base + ".rdx"))
        blob = Path(base + ".rdb").read_bytes()
        docs = []
        for name in sorted(index["variables"]):
            off, length = (int(v) for v in index["variables"][name])
            # R lazy-load chunks: 4-byte big-endian raw length, then a zlib stream of the serialized object.
            lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[off + 4 : off + length])))
            paragraphs = "\n".join(str(x) for x in lines).split("\n\n")
            paragraphs = [" ".join(p.split()) for p in paragraphs]
            docs += _chunk_paragraphs(paragraphs)
    return docs


def read_web_bible(sword_root: str) -> list[str]:
    try:
        from pysword.modules import SwordModules
    except ImportError as e:
        raise SourceMissing("scripture needs the PyPI package `pysword` (pip install pysword)") from e
    if not os.path.isdir(os.path.join(sword_root, "modules/texts/ztext/engWEB2015eb")):
        raise SourceMissing(f"scripture needs the Debian package sword-text-web (apt-get install sword-text-web); "
                            f"no engWEB2015eb module under {sword_root}")
    modules = SwordModules(sword_root)
    modules.parse_modules()
    bible = modules.get_bible_from_module("engWEB2015eb")
    structure = bible.get_structure()
    docs = []
    for testament in ("ot", "nt"):
        for book in structure.get_books()[testament]:
            for chapter in range(1, book.num_chapters + 1):
                raw = bible.get(books=[book.osis_name], chapters=[chapter], clean=False, join="\n")
                text = re.sub(r"<note\b.*?</note>", " ", raw, flags=re.S)  # footnotes -> a space, not glued words
                text = re.sub(r"<[^>]+>", "", text)
                verses = [" ".join(v.split()) for v in text.split("\n")]
                verses = [v for v in verses if v]
                if not verses:  # a few chapters are empty in this module's versification
                    continue
                verses[0] = f"{book.name} {chapter}\n{verses[0]}"
                docs += _chunk_paragraphs(verses, CHUNK_CHARS, joiner=" ")
    return [d for d in docs if len(d) >= 200]


def read_python_docs(doc_root: str) -> list[str]:
    src = os.path.join(doc_root, "_sources")
    files = sorted(glob.glob(os.path.join(src, "**/*.rst.txt"), recursive=True))
    if not files:
        raise SourceMissing(f"docs needs the Debian package python3.11-doc (apt-get install python3.11-doc); "
                            f"no *.rst.txt under {src}")
    docs = []
    for f in files:
        if "/whatsnew/" in f or "/c-api/" in f:  # changelogs and C API tables are lists, not prose
            continue
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        docs += _chunk_paragraphs(text.split("\n\n"))
    return docs


def read_stdlib_code(lib_root: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(lib_root, "*.py")) + glob.glob(os.path.join(lib_root, "*/*.py")))
    files = [f for f in files if "/test" not in f and "site-packages" not in f and "/idlelib/" not in f]
    if not files:
        raise SourceMissing(f"code needs CPython's standard library sources; no *.py under {lib_root}")
    docs = []
    for f in files:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        docs += _chunk_paragraphs(re.split(r"\n(?=\S)", text))  # split at top-level statements
    return docs


def split_documents(docs: list[str], n_cal: int, n_held: int, max_train: int, seed: int):
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    cal = [docs[i] for i in order[:n_cal]]
    held = [docs[i] for i in order[n_cal : n_cal + n_held]]
    # Sources repeat some passages verbatim (e.g. a docstring in two modules): a training document identical to a
    # calibration or held-out one would leak it, so such duplicates are dropped from train.
    evaluation = set(cal) | set(held)
    train = [docs[i] for i in order[n_cal + n_held :] if docs[i] not in evaluation][:max_train]
    return train, cal, held


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    # mtime=0 makes the gzip bytes reproducible
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode())


SOURCES_MD = """# Demo corpus: sources, licences, provenance

Built by `python scripts/build_corpus.py` (seed {seed}) from offline sources; no network, no hub.

| class | source | licence | documents (train / calibration / heldout) |
|---|---|---|---|
| fiction | Jane Austen, six novels, Debian `r-cran-janeaustenr` | texts public domain; package MIT | {fiction} |
| scripture | World English Bible (engWEB2015eb), Debian `sword-text-web` | public domain | {scripture} |
| docs | Python 3.11 documentation `_sources/*.rst.txt`, Debian `python3.11-doc` | PSF-2.0 | {docs} |
| code | CPython {pyver} standard library `Lib/*.py`, `Lib/*/*.py` (tests, idlelib excluded) | PSF-2.0 | {code} |

Documents are ~{chunk} characters, packed from whole paragraphs (verses for scripture, top-level statements for
code). Each class's documents are shuffled with the seed and cut into calibration, heldout and train, so no
document appears in two splits. Records: `{{"text": ..., "class": ..., "source": ...}}`.

SHA-256 of the split files:
{hashes}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "skipprofiler/demo/corpus"))
    ap.add_argument("--austen-root", default="/tmp/austen", help="where r-cran-janeaustenr was extracted (dpkg-deb -x)")
    ap.add_argument("--sword-root", default="/usr/share/sword")
    ap.add_argument("--python-doc-root", default="/usr/share/doc/python3.11/html")
    ap.add_argument("--stdlib-root", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--calibration", type=int, default=300, help="calibration documents per class")
    ap.add_argument("--heldout", type=int, default=150, help="held-out documents per class")
    ap.add_argument("--max-train", type=int, default=6000, help="cap on training documents per class")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)

    readers = {
        "fiction": lambda: read_austen(args.austen_root),
        "scripture": lambda: read_web_bible(args.sword_root),
        "docs": lambda: read_python_docs(args.python_doc_root),
        "code": lambda: read_stdlib_code(args.stdlib_root),
    }
    splits = {"train": [], "calibration": [], "heldout": []}
    counts = {}
    try:
        for i, cls in enumerate(CLASSES):
            docs = readers[cls]()
            if len(docs) < args.calibration + args.heldout + 100:
                raise SourceMissing(f"{cls}: only {len(docs)} documents found, too few for the requested splits")
            train, cal, held = split_documents(docs, args.calibration, args.heldout, args.max_train, args.seed + i)
            counts[cls] = f"{len(train)} / {len(cal)} / {len(held)}"
            for name, part in (("train", train), ("calibration", cal), ("heldout", held)):
                splits[name] += [{"text": t, "class": cls, "source": name} for t in part]
            print(f"{cls:10s} {counts[cls]}", file=sys.stderr)
    except SourceMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".corpus-", dir=out.parent))
    try:
        hashes = []
        for name, records in splits.items():
            path = tmp / f"{name}.jsonl.gz"
            write_jsonl_gz(path, records)
            hashes.append(f"- `{path.name}`: {hashlib.sha256(path.read_bytes()).hexdigest()}")
        (tmp / "SOURCES.md").write_text(SOURCES_MD.format(
            seed=args.seed, chunk=CHUNK_CHARS, pyver=sys.version.split()[0], hashes="\n".join(hashes), **counts))
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
