"""The station's own manuals, searchable offline: documents cut into passages along their
structure, kept in SQLite with two FTS5 indexes (words, and trigrams for Chinese and other
text without spaces), searched with BM25 and the two rankings fused by reciprocal rank.
When an embedding GGUF is configured, each passage also has its vector, and the nearest
passages to the question's vector are a third ranking in the fusion.

The standard library's sqlite3, PDF text through pypdf; llama-cpp-python and numpy only for
the optional vectors. `edgeagent kb` works beside a running daemon, which opens the same file
and sees what was added or removed at its next search.
"""

from __future__ import annotations

import hashlib
import html.parser
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from edgeagent.config import state_dir

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("edgeagent.kb")

FORMATS = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".text": "text",
           ".html": "html", ".htm": "html", ".pdf": "pdf"}  # fmt: skip
MAX_DOCUMENT_BYTES = 64 << 20
CHUNK_TOKENS = 240  # a passage's budget (estimated tokens), what a citation shows
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al.)
CANDIDATES = 50  # ranked per index before fusion
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
SCRIPT_RUNS = re.compile(f"(?:{CJK.pattern})+|(?:(?!{CJK.pattern})\\w)+")
MAX_QUERY_CHARS = 2000
MAX_TERMS = 48
WORD = re.compile(r"\w+")
_STOP = (
    "a an and are as at be by can do does for from how i if in is it its of on or should that "
    "the this to what when where which who why will with you your my me we our there their "
    "then than into about set"
)
STOPWORDS = frozenset(_STOP.split())
TABLES = ("words", "grams")  # the two FTS5 indexes: SQL names, never from input
DENSE = "dense"  # the vectors' ranking, beside TABLES in `indexes`
EMBED_CTX = 512  # tokens of a passage an embedding reads (the rest is cut)
QUESTION_TOKENS = 128  # ... and of a question (its start says what it is about)
SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    id INTEGER PRIMARY KEY, collection TEXT NOT NULL, path TEXT NOT NULL, title TEXT NOT NULL,
    sha256 TEXT NOT NULL, bytes INTEGER NOT NULL, added REAL NOT NULL, passages INTEGER NOT NULL,
    UNIQUE (collection, path)
);
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY, doc INTEGER NOT NULL REFERENCES docs(id) ON DELETE CASCADE,
    n INTEGER NOT NULL, section TEXT NOT NULL, page INTEGER, text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS passages_doc ON passages(doc);
CREATE VIRTUAL TABLE IF NOT EXISTS words USING fts5(
    section, text, tokenize='porter unicode61 remove_diacritics 2'
);
CREATE VIRTUAL TABLE IF NOT EXISTS grams USING fts5(section, text, tokenize='trigram');
CREATE TABLE IF NOT EXISTS vectors (
    id INTEGER PRIMARY KEY REFERENCES passages(id) ON DELETE CASCADE, v BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class KbError(Exception):
    """A document that cannot be added (its path, format or text), with the reason."""


def estimate_tokens(text: str) -> int:
    """About how many model tokens `text` is: a CJK character is about one, other text about
    four bytes per token. Good enough to size passages without loading a tokenizer."""
    cjk = len(CJK.findall(text))
    return cjk + max(0, len(text.encode()) - 3 * cjk) // 4 + 1


# --- reading documents ----------------------------------------------------------------------


@dataclass
class Block:
    """A paragraph, a list of steps, a table or a code block: never cut in two if it fits."""

    section: str
    text: str
    page: Optional[int] = None
    whole: bool = False  # a table or numbered steps: kept in one passage up to twice the budget


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)


def _section(path: list[str]) -> str:
    return " > ".join(p for p in path if p)


def read_markdown(text: str, title: str) -> Document:
    doc = Document("")
    headings: list[str] = []
    para: list[str] = []
    fence: Optional[str] = None

    def flush(whole: bool = False) -> None:
        body = "\n".join(para).strip()
        para.clear()
        if body:
            doc.blocks.append(Block(_section(headings), body, whole=whole or _is_steps(body)))

    for line in text.splitlines():
        stripped = line.strip()
        if fence is not None:
            para.append(line)
            if stripped.startswith(fence):
                fence = None
                flush(whole=True)
            continue
        if stripped.startswith(("```", "~~~")):
            flush()
            fence = stripped[:3]
            para.append(line)
            continue
        heading = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", stripped)
        if heading:
            flush()
            level = len(heading.group(1))
            headings[level - 1 :] = [heading.group(2)]
            if level == 1 and doc.title == "":
                doc.title = heading.group(2)
            continue
        if not stripped:
            flush()
            continue
        if para and (stripped.startswith("|") != para[-1].lstrip().startswith("|")):
            flush()  # a table starts or ends
        para.append(line)
    flush()
    for block in doc.blocks:
        if block.text.lstrip().startswith("|"):
            block.whole = True
    doc.title = doc.title or title
    return doc


def _is_steps(text: str) -> bool:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return len(lines) >= 2 and all(re.match(r"(\d+[.)]|[-*•])\s", ln) for ln in lines[:2])


def read_text(text: str, title: str) -> Document:
    """Plain text: blank lines part blocks; a line underlined with === or ---, or a short
    line in capitals alone (a man page's NAME, OPTIONS), is a heading."""
    doc = Document(title)
    heading = ""
    lines = text.splitlines()
    para: list[str] = []

    def flush() -> None:
        body = "\n".join(para).strip()
        para.clear()
        if body:
            doc.blocks.append(Block(heading, body, whole=_is_steps(body)))

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.strip() and re.fullmatch(r"(=+|-+)", nxt) and len(nxt) >= 3:
            flush()
            heading = line.strip()
            i += 2
            continue
        if line and not line[0].isspace() and len(line) <= 60 and line.upper() == line \
                and re.search(r"[A-Z]", line) and not para:  # fmt: skip
            flush()
            heading = line.strip()
            i += 1
            continue
        if not line.strip():
            flush()
        else:
            para.append(line)
        i += 1
    flush()
    return doc


class _HtmlReader(html.parser.HTMLParser):
    BLOCKS: ClassVar[frozenset[str]] = frozenset(
        {"p", "li", "dt", "dd", "pre", "blockquote", "div", "br", "tr", "td", "th", "table",
         "ul", "ol", "dl", "section", "article"}
    )  # fmt: skip
    SKIP: ClassVar[frozenset[str]] = frozenset({"script", "style", "head", "title", "nav"})

    def __init__(self, title: str) -> None:
        super().__init__(convert_charrefs=True)
        self.doc = Document(title)
        self.headings: list[str] = []
        self.heading_level = 0
        self.heading_text: list[str] = []
        self.buf: list[str] = []
        self.skip = 0
        self.table_depth = 0
        self.table_rows: list[str] = []
        self.cells: list[str] = []
        self.title_text: list[str] = []
        self.in_title = False
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        if tag == "body":  # a <head> HTML5 lets go unclosed ends here
            self.skip = 0
        if tag == "title":
            self.in_title = True
        if tag in self.SKIP:
            self.skip += 1
            return
        if re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self.heading_level = int(tag[1])
            self.heading_text = []
            return
        if tag == "table":
            self._flush()
            self.table_depth += 1
            return
        if tag == "pre":
            self._flush()
            self.pre += 1
            return
        if self.table_depth and tag in ("td", "th"):
            self.cells.append("")
            return
        if tag in self.BLOCKS and not self.table_depth and not self.pre:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
            return
        if re.fullmatch(r"h[1-6]", tag) and self.heading_level:
            text = " ".join("".join(self.heading_text).split())
            level = self.heading_level
            self.headings[level - 1 :] = [text]
            if not self.doc.title and level == 1:
                self.doc.title = text
            self.heading_level = 0
            return
        if self.table_depth:
            if tag == "tr" and self.cells:
                self.table_rows.append(" | ".join(c.strip() for c in self.cells))
                self.cells = []
            elif tag == "table":
                self.table_depth -= 1
                if not self.table_depth:
                    rows = [r for r in self.table_rows if r.strip(" |")]
                    if rows:
                        self.doc.blocks.append(
                            Block(_section(self.headings), "\n".join(rows), whole=True)
                        )
                    self.table_rows = []
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
            self._flush(keep_lines=True)
            return
        if tag in self.BLOCKS and not self.pre:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title_text.append(data)
        if self.skip:
            return
        if self.heading_level:
            self.heading_text.append(data)
        elif self.table_depth:
            if self.cells:
                self.cells[-1] += data
            else:
                self.cells.append(data)
        else:
            self.buf.append(data)

    def _flush(self, keep_lines: bool = False) -> None:
        raw = "".join(self.buf)
        self.buf = []
        text = raw.strip("\n") if keep_lines else " ".join(raw.split())
        if text.strip():
            self.doc.blocks.append(Block(_section(self.headings), text, whole=keep_lines))

    def close(self) -> None:
        super().close()
        self._flush()
        if not self.doc.title and self.title_text:
            self.doc.title = " ".join("".join(self.title_text).split())


def read_html(text: str, title: str) -> Document:
    reader = _HtmlReader("")
    reader.feed(text)
    reader.close()
    reader.doc.title = reader.doc.title or title
    return _merge_short(reader.doc)


def _merge_short(doc: Document) -> Document:
    """Join a lone term line (a man page's option name in its own <p>) to the text after it in
    the same section, so the option and its meaning stay in one passage."""
    out: list[Block] = []
    for block in doc.blocks:
        prev = out[-1] if out else None
        if (prev is not None and prev.section == block.section and not prev.whole
                and not block.whole and estimate_tokens(prev.text) < 12):  # fmt: skip
            prev.text = f"{prev.text}\n{block.text}"
            continue
        out.append(block)
    doc.blocks = out
    return doc


def read_pdf(path: Path, title: str) -> Document:
    try:
        import pypdf  # noqa: PLC0415
    except ImportError:
        raise KbError("PDF needs the pypdf package (pip install pypdf)") from None
    try:
        reader = pypdf.PdfReader(str(path))
        doc = Document(title)
        meta_title = reader.metadata.title if reader.metadata else None
        doc.title = str(meta_title) if meta_title else title
        for number, page in enumerate(reader.pages, start=1):
            text = page.extract_text() or ""
            for part in read_text(text, title).blocks:
                part.page = number
                part.section = part.section or f"page {number}"
                doc.blocks.append(part)
    except KbError:
        raise
    except Exception as exc:  # pypdf raises many kinds on a damaged file
        raise KbError(f"cannot read the PDF: {exc}") from None
    return doc


def read_document(path: Path) -> tuple[Document, bytes]:
    """The document at `path` with its bytes; raises KbError saying why it cannot be read."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise KbError(f"unknown format {path.suffix or '(no suffix)'}: "
                      f"takes {', '.join(sorted(FORMATS))}")  # fmt: skip
    try:
        if not path.is_file():
            raise KbError("not a regular file")
        if path.stat().st_size > MAX_DOCUMENT_BYTES:
            raise KbError(f"larger than {MAX_DOCUMENT_BYTES >> 20} MiB")
        data = path.read_bytes()
    except OSError as exc:
        raise KbError(f"cannot read: {exc.strerror or exc}") from None
    title = path.stem
    if kind == "pdf":
        return read_pdf(path, title), data
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise KbError(f"not UTF-8 text (byte {exc.start})") from None
    if kind == "markdown":
        return read_markdown(text, title), data
    if kind == "html":
        return read_html(text, title), data
    return read_text(text, title), data


@dataclass(frozen=True)
class Passage:
    section: str
    page: Optional[int]
    text: str


def passages(doc: Document, budget: int = CHUNK_TOKENS) -> list[Passage]:
    """The document's blocks packed into passages of at most `budget` estimated tokens, within
    one section and page; a longer block is cut at sentence ends (a table or a list of steps
    only past twice the budget, between lines)."""
    out: list[Passage] = []
    cur: list[str] = []
    cur_tokens = 0
    key: tuple[str, Optional[int]] = ("", None)

    def flush() -> None:
        nonlocal cur_tokens
        if cur:
            out.append(Passage(key[0], key[1], "\n".join(cur)))
        cur.clear()
        cur_tokens = 0

    for block in doc.blocks:
        if (block.section, block.page) != key:
            flush()
            key = (block.section, block.page)
        size = estimate_tokens(block.text)
        limit = 2 * budget if block.whole else budget
        pieces = [block.text] if size <= limit else list(_cut(block.text, budget, block.whole))
        for piece in pieces:
            n = estimate_tokens(piece)
            if cur and cur_tokens + n > budget:
                flush()
            cur.append(piece)
            cur_tokens += n
            if block.whole and n > budget:
                flush()
    flush()
    return out


def _cut(text: str, budget: int, by_lines: bool) -> Iterator[str]:
    units = text.splitlines() if by_lines else re.split(r"(?<=[.!?。！？；])\s*", text)  # noqa: RUF001
    cur: list[str] = []
    size = 0
    for whole in units:
        if not whole.strip():
            continue
        unit = whole
        n = estimate_tokens(unit)
        if n > budget:  # one sentence longer than a passage: cut by characters, in one pass
            if cur:
                yield ("\n" if by_lines else " ").join(cur)
                cur, size = [], 0
            take = max(1, len(unit) * budget // n)
            pieces = [unit[i : i + take] for i in range(0, len(unit), take)]
            yield from pieces[:-1]
            unit = pieces[-1]
            n = estimate_tokens(unit)
        if cur and size + n > budget:
            yield ("\n" if by_lines else " ").join(cur)
            cur, size = [], 0
        cur.append(unit)
        size += n
    if cur:
        yield ("\n" if by_lines else " ").join(cur)


# --- the store --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    id: int
    doc: str  # the document's title
    path: str
    collection: str
    section: str
    page: Optional[int]
    text: str
    score: float  # fused reciprocal-rank score, higher is better
    matched: float  # share of the question's keywords found in the passage (0-1)

    def citation(self, n: int) -> dict[str, Any]:
        return {"n": n, "doc": self.doc, "section": self.section, "page": self.page,
                "score": round(self.score, 4), "text": self.text}  # fmt: skip


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Embedder:
    """An embedding GGUF through llama-cpp-python: text to a unit vector. A model whose file
    sets no pooling (an instruct model) gives a vector per token: their mean is taken. Known in
    the knowledge base by its file's SHA-256 (not its name: a copy elsewhere is the same
    model), so passages and questions are never compared across models. The daemon loads it
    at start, beside its model: llama-cpp-python silences the process's output while a model
    loads."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        from llama_cpp import Llama  # noqa: PLC0415 (only when vectors are configured)

        self.path = path
        self.fingerprint = "sha256:" + file_sha256(path)
        self._llm = Llama(model_path=str(path), embedding=True, n_ctx=EMBED_CTX,
                          n_batch=EMBED_CTX, n_ubatch=EMBED_CTX, n_threads=threads,
                          n_threads_batch=threads, verbose=False)  # fmt: skip

    def embed(self, text: str, max_tokens: int = EMBED_CTX) -> np.ndarray:
        import numpy as np  # noqa: PLC0415

        text = text.strip() or "."
        tokens = self._llm.tokenize(text.encode("utf-8", "replace"), add_bos=False)
        if len(tokens) > max_tokens:
            text = self._llm.detokenize(tokens[:max_tokens]).decode("utf-8", "ignore")
        v = np.asarray(self._llm.embed(text, truncate=True), dtype=np.float32)
        if v.ndim == 2:
            v = v.mean(axis=0)
        norm = float(np.linalg.norm(v))
        return v / norm if norm > 0 else v

    def close(self) -> None:
        self._llm.close()


def passage_text(section: str, text: str) -> str:
    """What a passage's vector is made from: its section's path, then its text."""
    return f"{section}\n{text}"


def default_kb_path() -> Path:
    return state_dir() / "kb.sqlite"


class KnowledgeBase:
    """One SQLite file. Writers (`edgeagent kb add`) and the daemon's reader are separate
    processes. The file keeps SQLite's rollback journal, not WAL: a WAL file's reader must be
    able to write beside it (its -shm), and the daemon may read a file it cannot write. A
    search waits out a commit (`timeout`)."""

    def __init__(self, path: Path, *, readonly: bool = False,
                 embedder: Optional[Embedder] = None) -> None:  # fmt: skip
        """`embedder`: each passage added gets its vector (`[kb] embedding_model`)."""
        self.path = path
        self.embedder = embedder
        # The vectors read for `_nearest`: ((data_version, dim), ids, collections, matrix)
        self._dense: Optional[tuple[tuple[int, int], Any, Any, Any]] = None
        if readonly:
            uri = f"file:{path}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, timeout=10, check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=30, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=DELETE")
            self.db.executescript(SCHEMA)
        self.db.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        self.db.close()

    # --- writing ------------------------------------------------------------------------

    def add(self, path: Path, collection: str = "default", budget: int = CHUNK_TOKENS,
            *, again: bool = False) -> tuple[str, int, bool]:  # fmt: skip
        """Index one document (again, when it changed or `again`); returns (title, passages,
        changed). The vectors are made first, outside the write lock (the slow part); the
        checks that every vector comes from one model run again inside it."""
        path = path.resolve()
        doc, data = read_document(path)
        digest = hashlib.sha256(data).hexdigest()
        row = self.db.execute(
            "SELECT sha256, title, passages FROM docs WHERE collection = ? AND path = ?",
            (collection, str(path)),
        ).fetchone()
        if row is not None and row[0] == digest and not again:
            return row[1], row[2], False
        parts = passages(doc, budget)
        if not parts:
            raise KbError("no text found in it")
        if not again:
            self._check_vectors()  # before the slow part: a refusal comes at once
        vectors = (
            [self.embedder.embed(passage_text(p.section, p.text)) for p in parts]
            if self.embedder is not None
            else []
        )
        self._dense = None  # this connection's own writes do not change its data_version
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if not again:
                self._check_vectors()  # another `kb add` may have written meanwhile
            if self.db.execute("SELECT 1 FROM docs WHERE collection = ? AND path = ?",
                               (collection, str(path))).fetchone():  # fmt: skip
                self._delete(collection, str(path))
            cur = self.db.execute(
                "INSERT INTO docs (collection, path, title, sha256, bytes, added, passages) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (collection, str(path), doc.title or path.stem, digest, len(data), time.time(),
                 len(parts)),
            )  # fmt: skip
            doc_id = cur.lastrowid
            for n, p in enumerate(parts):
                pid = self.db.execute(
                    "INSERT INTO passages (doc, n, section, page, text) VALUES (?, ?, ?, ?, ?)",
                    (doc_id, n, p.section, p.page, p.text),
                ).lastrowid
                if vectors:
                    assert pid is not None
                    self._store_vector(pid, vectors[n])
                for table in TABLES:
                    section, text = p.section, p.text
                    if table == "words":  # CJK as overlapping pairs: its words have no spaces
                        section, text = with_bigrams(section), with_bigrams(text)
                    self.db.execute(f"INSERT INTO {table} (rowid, section, text) "  # noqa: S608
                                    "VALUES (?, ?, ?)", (pid, section, text))  # fmt: skip
        return doc.title or path.stem, len(parts), True

    def _meta(self, key: str) -> Optional[str]:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:  # a file from before vectors, opened read-only
            return None
        return row[0] if row else None

    def embedding(self) -> Optional[str]:
        """The model the passages' vectors come from (its fingerprint); None while no passage
        has a vector (none configured, or every document removed)."""
        try:
            if not self.db.execute("SELECT 1 FROM vectors LIMIT 1").fetchone():
                return None
        except sqlite3.OperationalError:
            return None
        return self._meta("embedding")

    def _model_name(self) -> str:
        """The vectors' model as an operator knows it: its file's name when it was used."""
        return self._meta("embedding_model") or str(self._meta("embedding"))

    def _check_vectors(self) -> None:
        """Every passage has a vector from the same model, or none has one."""
        stored = self.embedding()
        if self.embedder is None:
            if stored is not None:
                raise KbError(f"its passages have vectors from {self._model_name()}: set [kb] "
                              "embedding_model to that model, or run `edgeagent kb reindex` "
                              "without one to drop them")  # fmt: skip
            return
        if stored is None and self.db.execute("SELECT 1 FROM passages LIMIT 1").fetchone():
            raise KbError("its passages have no vectors yet: `edgeagent kb reindex` with "
                          "[kb] embedding_model set gives them theirs")  # fmt: skip
        if stored is not None and stored != self.embedder.fingerprint:
            raise KbError(f"its passages have vectors from another model "
                          f"({self._model_name()}): `edgeagent kb reindex` makes them again "
                          "with this one")  # fmt: skip

    def _set_model(self) -> None:
        """In a write transaction: the vectors written now come from the embedder's model."""
        fingerprint = self.embedder.fingerprint if self.embedder is not None else None
        self.db.execute("DELETE FROM meta WHERE key IN ('embedding', 'embedding_model')")
        if self.embedder is not None:
            self.db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                [("embedding", fingerprint),
                                 ("embedding_model", self.embedder.path.name)])  # fmt: skip

    def _store_vector(self, pid: int, vector: np.ndarray) -> None:
        assert self.embedder is not None
        if self.embedding() is None:
            self._set_model()
        self.db.execute("INSERT OR REPLACE INTO vectors (id, v) SELECT ?, ? "
                        "WHERE EXISTS (SELECT 1 FROM passages WHERE id = ?)",
                        (pid, vector.astype("<f4").tobytes(), pid))  # fmt: skip

    def remove(self, key: str, collection: Optional[str] = None) -> int:
        """Remove documents by path, file name or title; returns how many."""
        exact = str(Path(key).resolve()) if os.sep in key else key
        rows = [
            (coll, path) for coll, path, title in self.db.execute(
                "SELECT collection, path, title FROM docs"
            )
            if (path == exact or title == key or Path(path).name == key)
            and (collection is None or coll == collection)
        ]  # fmt: skip
        self._dense = None
        with self.db:
            for coll, path in rows:
                self._delete(coll, path)
        return len(rows)

    def _delete(self, collection: str, path: str) -> None:
        ids = [r[0] for r in self.db.execute(
            "SELECT p.id FROM passages p JOIN docs d ON p.doc = d.id "
            "WHERE d.collection = ? AND d.path = ?", (collection, path))]  # fmt: skip
        for table in TABLES:
            self.db.executemany(f"DELETE FROM {table} WHERE rowid = ?",  # noqa: S608
                                [(i,) for i in ids])  # fmt: skip
        self.db.execute("DELETE FROM docs WHERE collection = ? AND path = ?", (collection, path))

    def reindex(self, budget: int = CHUNK_TOKENS) -> list[tuple[str, str]]:
        """Read every document again from its path; returns (path, problem) for those that
        could not be read (they keep their old passages). The vectors follow the model
        configured now: made again with another, dropped without one; a document that cannot
        be read again gets its vectors from the passages it keeps."""
        problems = []
        fingerprint = self.embedder.fingerprint if self.embedder is not None else None
        self._dense = None
        if self._meta("embedding") != fingerprint:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("DELETE FROM vectors")
                self._set_model()
        for collection, path in self.db.execute("SELECT collection, path FROM docs").fetchall():
            try:
                self.add(Path(path), collection, budget, again=True)
            except KbError as exc:
                problems.append((path, str(exc)))
        if self.embedder is not None:
            missing = self.db.execute(
                "SELECT id, section, text FROM passages WHERE id NOT IN (SELECT id FROM vectors)"
            ).fetchall()
            made = [(pid, self.embedder.embed(passage_text(sec, text)))
                    for pid, sec, text in missing]  # fmt: skip
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                for pid, vector in made:
                    self._store_vector(pid, vector)
        self._dense = None
        return problems

    # --- reading ------------------------------------------------------------------------

    def documents(self) -> list[dict[str, Any]]:
        cols = ("collection", "path", "title", "passages", "bytes", "added", "sha256")
        rows = self.db.execute(
            "SELECT collection, path, title, passages, bytes, added, sha256 FROM docs "
            "ORDER BY collection, path"
        )
        return [dict(zip(cols, r)) for r in rows]

    def stats(self) -> dict[str, int]:
        docs, parts = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(passages), 0) FROM docs"
        ).fetchone()
        return {"documents": docs, "passages": parts}

    def search(self, query: str, k: int = 4, collections: Optional[Iterable[str]] = None,
               indexes: tuple[str, ...] = (*TABLES, DENSE),
               vector: Optional[np.ndarray] = None) -> list[Hit]:  # fmt: skip
        """The `k` best passages for `query`: the BM25 rankings of `indexes` and, given the
        question's `vector` (from the passages' model), the nearest passages, fused."""
        ranks: dict[int, float] = {}
        names = sorted(set(collections)) if collections is not None else []
        # Only the asked collections are ranked (a filter after the ranking would miss a
        # small collection's passages behind a large one's).
        only = f"AND d.collection IN ({', '.join('?' * len(names))})" if names else ""
        self.db.execute("BEGIN")  # one read transaction: the rows found are the rows read
        try:
            for table, match in zip(TABLES, (words_query(query), grams_query(query))):
                if not match or table not in indexes:
                    continue
                # Every term is quoted: an error here is the file's (locked, damaged,
                # unreadable), and the caller reports it rather than "not covered".
                rows = self.db.execute(
                    f"SELECT t.rowid FROM {table} t JOIN passages p ON p.id = t.rowid "  # noqa: S608
                    f"JOIN docs d ON d.id = p.doc WHERE {table} MATCH ? {only} "
                    f"ORDER BY bm25({table}, 2.0, 1.0) LIMIT {CANDIDATES}",
                    (match, *names),
                ).fetchall()
                for rank, (rowid,) in enumerate(rows):
                    ranks[rowid] = ranks.get(rowid, 0.0) + 1.0 / (RRF_K + rank + 1)
            if vector is not None and DENSE in indexes:
                for rank, rowid in enumerate(self._nearest(vector, names)):
                    ranks[rowid] = ranks.get(rowid, 0.0) + 1.0 / (RRF_K + rank + 1)
            return self._hits(query, ranks, k)
        finally:
            self.db.rollback()

    def _nearest(self, vector: np.ndarray, collections: list[str]) -> list[int]:
        """The CANDIDATES passages whose vectors are nearest `vector` (cosine), in the named
        collections (all when none). The vectors are read once, and again when another
        process changed the file."""
        import numpy as np  # noqa: PLC0415

        dim = int(vector.shape[0])
        # Another process's commit changes data_version; this connection's own writes reset
        # the cache where they are made.
        version = (self.db.execute("PRAGMA data_version").fetchone()[0], dim)
        if self._dense is None or self._dense[0] != version:
            rows = self.db.execute(
                "SELECT v.id, d.collection, v.v FROM vectors v JOIN passages p ON p.id = v.id "
                "JOIN docs d ON d.id = p.doc WHERE length(v.v) = ?", (4 * dim,)
            ).fetchall()  # fmt: skip
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            colls = np.array([r[1] for r in rows], dtype=object)
            matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(-1, dim)
            self._dense = (version, ids, colls, matrix)
        _, ids, colls, matrix = self._dense
        if not len(ids):
            return []
        scores = matrix @ vector
        if collections:
            scores = np.where(np.isin(colls, collections), scores, -np.inf)
        n = min(CANDIDATES, len(ids))
        best = np.argpartition(-scores, n - 1)[:n]
        best = best[np.argsort(-scores[best])]
        return [int(ids[i]) for i in best if np.isfinite(scores[i])]

    def _hits(self, query: str, ranks: dict[int, float], k: int) -> list[Hit]:
        ordered = sorted(ranks.items(), key=lambda item: -item[1])
        keywords = query_keywords(query)
        hits: list[Hit] = []
        for rowid, score in ordered:
            row = self.db.execute(
                "SELECT p.id, d.title, d.path, d.collection, p.section, p.page, p.text "
                "FROM passages p JOIN docs d ON p.doc = d.id WHERE p.id = ?", (rowid,)
            ).fetchone()  # fmt: skip
            if row is None:
                continue
            pid, title, path, coll, section, page, text = row
            hits.append(Hit(pid, title, path, coll, section, page, text, score,
                            matched(keywords, section, text)))  # fmt: skip
            if len(hits) >= k:
                break
        return hits


class Reader:
    """The daemon's read-only view of the knowledge base: the file opened when first needed
    (a search, or its size for the status; manuals loaded after the start are found), and
    again when it was replaced (removed and loaded anew, or copied over). One thread uses
    it."""

    def __init__(self, path: Path, embedder: Optional[Embedder] = None) -> None:
        """`embedder`: the question's vector is searched too, when the passages have vectors
        from its model. The reader closes it."""
        self.path = path
        self._base: Optional[KnowledgeBase] = None
        self._ident = (0, 0)  # the open file's device and inode
        self._embedder = embedder
        self._warned: Optional[str] = None

    def _open(self) -> KnowledgeBase:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise KbError(f"this box has no knowledge base yet ({self.path}); "
                          "load manuals with `edgeagent kb add FILE...`") from None  # fmt: skip
        if self._base is not None and self._ident != (st.st_dev, st.st_ino):
            self._base.close()  # replaced: opened anew (the embedder stays)
            self._base = None
        if self._base is None:
            self._base = KnowledgeBase(self.path, readonly=True)
            self._ident = (st.st_dev, st.st_ino)
        return self._base

    def search(self, query: str, k: int, collections: Optional[Iterable[str]]) -> list[Hit]:
        base = self._open()
        return base.search(query, k, collections, vector=self._vector(base, query))

    EMPTY: ClassVar[dict[str, Any]] = {"documents": 0, "passages": 0, "vectors": None}

    def info(self) -> dict[str, Any]:
        """What the box holds, for its status: documents, passages, the vectors' model."""
        out: dict[str, Any] = {"path": str(self.path), **self.EMPTY}
        try:
            base = self._open()
        except KbError:
            return out
        out.update(base.stats())
        if base.embedding() is not None:
            out["vectors"] = base._model_name()
        return out

    def _vector(self, base: KnowledgeBase, query: str) -> Optional[np.ndarray]:
        """The question's vector, when the passages have vectors from the configured model;
        None (the words alone) otherwise, or when embedding fails (logged once)."""
        stored = base.embedding() if self._embedder is not None else None
        if self._embedder is None or stored is None:
            return None
        if stored != self._embedder.fingerprint:
            if self._warned != stored:  # once per file's model, not per question
                log.warning("the knowledge base's vectors come from %s, not %s: searching "
                            "without them until `edgeagent kb reindex`", base._model_name(),
                            self._embedder.path)  # fmt: skip
                self._warned = stored
            return None
        try:
            return self._embedder.embed(query[:MAX_QUERY_CHARS], QUESTION_TOKENS)
        except Exception:
            if self._warned != "embed":
                log.exception("embedding a question failed; searching by its words")
                self._warned = "embed"
            return None

    def close(self) -> None:
        """At the daemon's stop: the file, and the embedding model."""
        if self._base is not None:
            self._base.close()
            self._base = None
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None


def query_keywords(query: str) -> list[str]:
    """The question's words that carry meaning (lower case, no stop words, two characters or
    more) and its CJK runs, split where the script changes (`F17报警`); at most MAX_TERMS of
    them from the first MAX_QUERY_CHARS characters (a long question costs no more)."""
    text = query[:MAX_QUERY_CHARS].lower()
    out: list[str] = []
    for word in WORD.findall(text):
        for part in SCRIPT_RUNS.findall(word):
            cjk = bool(CJK.match(part))
            if cjk or (len(part) > 1 and part not in STOPWORDS):
                out.append(part)
    return list(dict.fromkeys(out))[:MAX_TERMS]


def cjk_bigrams(run: str) -> list[str]:
    """The overlapping character pairs of a CJK run (a single character alone): most Chinese
    words are two characters, and text has no spaces to find them by."""
    return [run] if len(run) < 2 else [run[i : i + 2] for i in range(len(run) - 1)]


def with_bigrams(text: str) -> str:
    """`text` for the words index: each CJK run replaced by its pairs, spaced."""
    return re.sub(f"(?:{CJK.pattern})+", lambda m: " " + " ".join(cjk_bigrams(m.group())) + " ",
                  text)  # fmt: skip


def words_query(query: str) -> str:
    terms: list[str] = []
    for w in query_keywords(query):
        terms += cjk_bigrams(w) if CJK.search(w) else [w]
    return " OR ".join(f'"{t}"' for t in dict.fromkeys(terms))


def grams_query(query: str) -> str:
    """Substrings for the trigram index: each word of three or more characters, and every
    three-character piece of a CJK run (a Chinese question has no spaces to split at)."""
    parts: list[str] = []
    for term in query_keywords(query):
        if CJK.search(term):
            parts += [term[i : i + 3] for i in range(max(1, len(term) - 2))] if len(term) >= 3 \
                else []  # fmt: skip
        elif len(term) >= 3:
            parts.append(term)
    parts = list(dict.fromkeys(p.replace('"', "") for p in parts if len(p) >= 3))
    return " OR ".join(f'"{p}"' for p in parts)


def matched(keywords: list[str], section: str, text: str) -> float:
    """Share of the question's keywords in the passage (a CJK run counts by its bigrams)."""
    if not keywords:
        return 0.0
    hay = f"{section}\n{text}".lower()
    found = 0.0
    for kw in keywords:
        if CJK.search(kw) and len(kw) > 2:
            grams = [kw[i : i + 2] for i in range(len(kw) - 1)]
            found += sum(g in hay for g in grams) / len(grams)
        else:  # a whole word, or the word with a short ending (bolt, bolts; torque, torques)
            found += bool(re.search(rf"\b{re.escape(kw[:-1] if len(kw) > 4 else kw)}\w{{0,3}}\b",
                                    hay))  # fmt: skip
    return found / len(keywords)


# --- grounded answers -------------------------------------------------------------------------

GROUNDING = (
    "Answer the question from these passages of the station's manuals only, in a few "
    "sentences. Cite the passages you use by their numbers, like [1]. If they do not answer "
    "the question, say that the manuals do not cover it."
)


def where(hit: Hit) -> str:
    return f"{hit.doc} - {hit.section}" + (f", page {hit.page}" if hit.page else "")


def fitting(hits: list[Hit], room: int) -> list[Hit]:
    """As many of `hits`, best first, as fit in `room` estimated tokens (at least one)."""
    used, out = 0, list[Hit]()
    for hit in hits:
        used += estimate_tokens(hit.text) + 16  # its number, document and section line
        if out and used > room:
            break
        out.append(hit)
    return out


def grounded_question(numbered: list[tuple[int, Hit]], question: str) -> str:
    """The user's question as the model reads it: the instruction, the passages under their
    citation numbers (kept when private ones are left out), then the question. The passages
    come first, so a later question about the same section starts with the same tokens and
    the prompt cache holds their cells."""
    body = "\n\n".join(f"[{n}] {where(hit)}\n{hit.text}" for n, hit in numbered)
    return f"{GROUNDING}\n\n{body}\n\nQuestion: {question}"


def citations(hits: list[Hit]) -> list[dict[str, Any]]:
    return [hit.citation(n) for n, hit in enumerate(hits, start=1)]
