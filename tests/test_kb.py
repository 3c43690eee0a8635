"""The knowledge base without the model: reading manuals along their structure, the two FTS5
indexes, search, and the `edgeagent kb` command on a real SQLite file."""

# ruff: noqa: RUF001 (the Chinese manual keeps its own punctuation)
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent import kb

MANUAL_MD = """# Filler F3 operating manual

## Alarms

### F17 low air pressure

The capper needs 6 bar. Alarm F17 fires below 4.5 bar at the capper manifold.

1. Check the main air valve is open.
2. Check the regulator reads 6 bar.
3. Look for leaks at the capper manifold.

## Maintenance

| part | interval | torque |
| --- | --- | --- |
| M8 flange bolts | 500 h | 25 Nm |
| M10 frame bolts | 1000 h | 49 Nm |

Grease the star wheel bearings every 200 hours with food-grade grease.
"""

MANUAL_HTML = """<html><head><title>Press P4 manual</title></head><body>
<h1>Press P4</h1>
<h2>Hydraulics</h2>
<p>Alarm E042 means the hydraulic oil is above 70 C.</p>
<p>Stop the press and let the oil cool before you open the tank.</p>
<h2>Safety</h2>
<p>The light curtain must never be bypassed.</p>
<script>var x = "never indexed";</script>
</body></html>
"""

MANUAL_ZH = """# 灌装机操作手册

## 报警

报警F17表示封盖机气压过低，请检查主气阀和调压阀。

## 维护

每运行200小时，用食品级润滑脂润滑星轮轴承。
"""


@pytest.fixture
def base(tmp_path: Path) -> kb.KnowledgeBase:
    (tmp_path / "filler.md").write_text(MANUAL_MD)
    (tmp_path / "press.html").write_text(MANUAL_HTML)
    (tmp_path / "filler.zh.md").write_text(MANUAL_ZH)
    b = kb.KnowledgeBase(tmp_path / "kb.sqlite")
    for name in ("filler.md", "press.html", "filler.zh.md"):
        b.add(tmp_path / name, "line-3")
    return b


def test_passages_follow_the_documents_structure(base: kb.KnowledgeBase) -> None:
    by_section = {d["title"]: d for d in base.documents()}
    assert set(by_section) == {"Filler F3 operating manual", "Press P4", "灌装机操作手册"}
    hits = base.search("torque for the M8 flange bolts", 1)
    assert hits[0].section == "Filler F3 operating manual > Maintenance"
    assert "| M8 flange bolts | 500 h | 25 Nm |" in hits[0].text  # the table is whole
    steps = base.search("what to check for alarm F17 low air pressure", 1)[0]
    assert steps.section.endswith("Alarms > F17 low air pressure")
    assert "1. Check the main air valve" in steps.text and "3. Look for leaks" in steps.text
    assert all("indexed" not in h.text for h in base.search("never indexed", 3))  # no script


def test_search_finds_english_and_chinese(base: kb.KnowledgeBase) -> None:
    hit = base.search("What does alarm E042 mean?", 1)[0]
    assert hit.doc == "Press P4" and hit.section == "Press P4 > Hydraulics" and "70 C" in hit.text
    assert hit.matched == 1.0
    zh = base.search("星轮轴承多久润滑一次", 1)[0]
    assert zh.doc == "灌装机操作手册" and zh.section.endswith("维护"), zh
    assert base.search("E042", 3, collections=["elsewhere"]) == []
    nothing = base.search("how do I bake bread", 1)
    assert not nothing or nothing[0].matched < 0.34


def test_a_changed_document_is_read_again_and_a_removed_one_is_gone(
    base: kb.KnowledgeBase, tmp_path: Path
) -> None:
    assert base.add(tmp_path / "press.html", "line-3")[2] is False  # unchanged
    (tmp_path / "press.html").write_text(MANUAL_HTML.replace("70 C", "65 C"))
    assert base.add(tmp_path / "press.html", "line-3")[2] is True
    assert "65 C" in base.search("alarm E042 oil", 1)[0].text
    assert base.stats()["documents"] == 3
    assert base.remove("press.html") == 1
    assert all(h.doc != "Press P4" for h in base.search("alarm E042 oil", 5))
    assert base.stats()["documents"] == 2


def test_what_cannot_be_read_says_why(tmp_path: Path) -> None:
    b = kb.KnowledgeBase(tmp_path / "kb.sqlite")
    (tmp_path / "a.docx").write_bytes(b"PK")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "c.md").write_text("\n\n")
    for name, reason in (("a.docx", "unknown format .docx"), ("b.txt", "not UTF-8"),
                         ("c.md", "no text"), ("missing.md", "not a regular file")):  # fmt: skip
        with pytest.raises(kb.KbError, match=reason):
            b.add(tmp_path / name)


def minimal_pdf(pages: list[str]) -> bytes:
    """A PDF with one line of Helvetica text per page, written by hand."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", ""]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        content_id = len(objects) + 1
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream.decode()}\nendstream")
        page_id = len(objects) + 1
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Contents {content_id} 0 R /Resources << /Font << /F1 FONT 0 R >> >> >>"
        )
        kids.append(page_id)
    font_id = len(objects) + 1
    objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    objects[1] = (
        f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    )
    out = b"%PDF-1.4\n"
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body.replace('FONT', str(font_id))}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return out


def test_a_pdf_keeps_its_page_numbers(tmp_path: Path) -> None:
    pytest.importorskip("pypdf")
    (tmp_path / "chiller.pdf").write_bytes(minimal_pdf(
        ["Chiller C1 start-up: open the inlet valve first.",
         "Chiller C1 alarm A7 means the refrigerant pressure is low."]))  # fmt: skip
    b = kb.KnowledgeBase(tmp_path / "kb.sqlite")
    assert b.add(tmp_path / "chiller.pdf")[1] == 2
    hit = b.search("what does alarm A7 mean on the chiller", 1)[0]
    assert hit.page == 2 and "refrigerant pressure" in hit.text


def test_the_kb_command(tmp_path: Path) -> None:
    (tmp_path / "filler.md").write_text(MANUAL_MD)
    db = str(tmp_path / "kb.sqlite")

    def kb_cmd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgeagent", "kb", *args, "--db", db],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    added = kb_cmd("add", str(tmp_path / "filler.md"), "--collection", "line-3")
    assert added.returncode == 0 and "in line-3: " in added.stdout, added
    assert "Filler F3 operating manual" in kb_cmd("list").stdout
    found = kb_cmd("search", "torque", "M8", "flange")
    assert found.returncode == 0 and "[1] Filler F3 operating manual: " in found.stdout
    assert "25 Nm" in found.stdout
    bad = kb_cmd("add", str(tmp_path / "nope.pdf"))
    assert bad.returncode == 1 and "nope.pdf: not a regular file" in bad.stderr
    assert kb_cmd("remove", "filler.md").returncode == 0
    assert "0 documents" in kb_cmd("list").stdout
