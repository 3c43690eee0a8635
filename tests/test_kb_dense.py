"""The knowledge base's optional vectors, with the real GGUF as the embedding model through
llama-cpp-python: every passage gets one, all from one model, the nearest passages are a
third ranking in the fusion, and the daemon embeds the question when configured."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent import kb
from tests.conftest import Daemon, connect
from tests.test_kb import MANUAL_HTML, MANUAL_MD, MANUAL_ZH
from tests.test_kb_daemon import ask


@pytest.fixture(scope="module")
def embedder(model_file: Path) -> Iterator[kb.Embedder]:
    e = kb.Embedder(model_file, threads=2)
    yield e
    e.close()


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    (tmp_path / "filler.md").write_text(MANUAL_MD)
    (tmp_path / "press.html").write_text(MANUAL_HTML)
    return tmp_path


def vectors(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])


def test_every_passage_gets_a_vector_and_its_own_text_finds_it(
    docs: Path, embedder: kb.Embedder
) -> None:
    base = kb.KnowledgeBase(docs / "kb.sqlite", embedder=embedder)
    base.add(docs / "filler.md", "line-3")
    base.add(docs / "press.html", "line-4")
    assert vectors(docs / "kb.sqlite") == base.stats()["passages"] > 3
    assert base.embedding() == embedder.fingerprint
    assert embedder.fingerprint == "sha256:" + kb.file_sha256(embedder.path)
    rows = base.db.execute("SELECT id, section, text FROM passages").fetchall()
    for pid, section, text in rows:
        v = embedder.embed(kb.passage_text(section, text))
        assert abs(float(v @ v) - 1.0) < 1e-4
        # The vectors alone: a passage's own text is nearest to it.
        hits = base.search("", 3, indexes=(kb.DENSE,), vector=v)
        assert hits[0].id == pid, (section, [h.section for h in hits])
    # Only the asked collections are ranked, by the vectors too.
    press = next(r for r in rows if "E042" in r[2])
    v = embedder.embed(kb.passage_text(press[1], press[2]))
    only_3 = base.search("", 4, ["line-3"], indexes=(kb.DENSE,), vector=v)
    assert only_3 and all(h.collection == "line-3" for h in only_3)
    # What this connection adds after its first search is searched too (its own writes do
    # not change its data_version: the vectors read before are dropped).
    (docs / "filler.zh.md").write_text(MANUAL_ZH)
    base.add(docs / "filler.zh.md", "line-3")
    zh = base.db.execute(
        "SELECT id, section, text FROM passages WHERE text LIKE '%星轮%'"
    ).fetchone()
    v_zh = embedder.embed(kb.passage_text(zh[1], zh[2]))
    assert base.search("", 1, indexes=(kb.DENSE,), vector=v_zh)[0].id == zh[0]
    base.remove("filler.zh.md")
    # Removing a document removes its passages' vectors.
    base.remove("press.html")
    assert vectors(docs / "kb.sqlite") == base.stats()["passages"]
    left = base.search("", 9, vector=v)
    assert left and all(h.collection == "line-3" for h in left)
    # Every document removed: no vectors, and no model asked of the next `kb add`.
    base.remove("press.html")
    base.remove("filler.md")
    assert base.embedding() is None and base.search("", 3, vector=v) == []
    base.close()
    plain = kb.KnowledgeBase(docs / "kb.sqlite")
    plain.add(docs / "filler.md", "line-3")
    plain.close()


def test_all_vectors_come_from_one_model(
    docs: Path, embedder: kb.Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    path = docs / "kb.sqlite"
    plain = kb.KnowledgeBase(path)
    plain.add(docs / "filler.md", "line-3")
    plain.close()
    # Manuals loaded without vectors: a model configured later asks for a reindex first.
    with_model = kb.KnowledgeBase(path, embedder=embedder)
    with pytest.raises(kb.KbError, match="no vectors yet: `edgeagent kb reindex`"):
        with_model.add(docs / "press.html", "line-4")
    assert with_model.reindex() == [] and vectors(path) == with_model.stats()["passages"]
    with_model.add(docs / "press.html", "line-4")
    assert vectors(path) == with_model.stats()["passages"]
    # Vectors from another model are never mixed with this one's.
    with_model.db.execute("UPDATE meta SET value = 'sha256:00' WHERE key = 'embedding'")
    with_model.db.execute("UPDATE meta SET value = 'other.gguf' WHERE key = 'embedding_model'")
    with_model.db.commit()
    reader = kb.Reader(path, embedder)
    with caplog.at_level(logging.WARNING, logger="edgeagent.kb"):
        assert reader.search("zqxv wvut", 3, None) == []  # by the words alone
        reader.search("zqxv wvut", 3, None)
    # Said once, not per question.
    assert len(caplog.records) == 1, caplog.text
    assert (
        caplog.records[0]
        .getMessage()
        .startswith("the knowledge base's vectors come from other.gguf, not ")
    )
    reader._embedder = None  # the module's embedder outlives this reader
    reader.close()
    with pytest.raises(kb.KbError, match=r"another model \(other.gguf\)"):
        with_model.add(docs / "filler.md", "line-5")
    with_model.reindex()
    assert with_model.embedding() == embedder.fingerprint
    with_model.close()
    # Without the model, adding refuses; a reindex drops the vectors.
    plain = kb.KnowledgeBase(path)
    with pytest.raises(kb.KbError, match="set \\[kb\\] embedding_model"):
        plain.add(docs / "filler.md", "line-5")
    plain.reindex()
    assert plain.embedding() is None and vectors(path) == 0
    plain.close()


def test_the_reader_ranks_by_the_vectors_when_configured(docs: Path, embedder: kb.Embedder) -> None:
    """A question sharing no word with any passage: the words find nothing, the vectors
    always find the nearest passages (the daemon then answers "not covered" all the same:
    no passage holds the question's words)."""
    base = kb.KnowledgeBase(docs / "kb.sqlite", embedder=embedder)
    base.add(docs / "filler.md", "line-3")
    every = base.stats()["passages"]
    base.close()
    question = "zqxv wvut"
    without = kb.Reader(docs / "kb.sqlite")
    assert without.search(question, 3, None) == []
    without.close()
    reader = kb.Reader(docs / "kb.sqlite", embedder)
    hits = reader.search(question, every + 3, None)
    assert len(hits) == every and all(h.matched == 0 for h in hits)
    assert reader.info()["vectors"] == embedder.path.name
    # The file removed and loaded anew (or copied over): opened again, vectors and all.
    (docs / "kb.sqlite").unlink()
    base = kb.KnowledgeBase(docs / "kb.sqlite", embedder=embedder)
    base.add(docs / "press.html", "line-4")
    base.close()
    again = reader.search(question, 9, None)
    assert again and all(h.doc == "Press P4" for h in again), again
    reader._embedder = None  # the module's embedder outlives this reader
    reader.close()


def test_a_daemon_with_an_embedding_model_answers_from_the_manuals(
    manuals_daemon: Daemon,
) -> None:
    """The shared manuals daemon: its file was filled by `edgeagent kb add` with the config's
    embedding model, which the daemon loaded at start."""
    with connect(manuals_daemon.socket_path) as c:
        events = ask(c, "d1", "What torque for the M8 flange bolts?", kb=True, max_tokens=8)
        unknown = ask(c, "d2", "zqxv wvut?", kb=True)
        status = c.op("status")["kb"]
    assert events[0]["event"] == "citations" and events[-1]["event"] == "done", events
    assert "25 Nm" in events[0]["citations"][0]["text"]
    # Found by its vector alone (no word in common), shown, and still not covered.
    assert unknown[0]["citations"] and unknown[-1]["finish_reason"] == "not_covered", unknown
    assert status["vectors"] and status["vectors"].endswith(".gguf"), status
