"""Report parsing on MIMIC-format reports and on torchxrayvision's real Open-i reports; the impression token limit."""

from __future__ import annotations

import importlib.util
import os
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tasks.data.catalog import connect
from tasks.data.reports import parse_report, parse_reports, ReportItem
from tasks.generators.text import EncoderNotFoundError, load_tokenizer, truncate_to_tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MIMIC_REPORT = """\
                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough and fever x 3 days, T 38.9.  Evaluate for pneumonia.

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 PA and lateral views of the chest provided.  There is a 1.5 cm nodular opacity
 projecting over the right lower lobe (series 2, image 14).  No large effusion or
 pneumothorax.  Heart size is normal (CTR 0.48).  Bony structures are intact.

 IMPRESSION:

 1.  Right lower lobe opacity; pneumonia is possible -- follow-up in 4-6 weeks.

 2.  No pneumothorax.
"""


def test_full_mimic_report_keeps_text_digits_and_punctuation() -> None:
    parsed = parse_report(MIMIC_REPORT)
    assert parsed.rule == "impression"
    assert parsed.findings == (
        "PA and lateral views of the chest provided. There is a 1.5 cm nodular opacity projecting over the right "
        "lower lobe (series 2, image 14). No large effusion or pneumothorax. Heart size is normal (CTR 0.48). "
        "Bony structures are intact.")
    # A multi-paragraph impression is one text, numbering and punctuation intact.
    assert parsed.impression == (
        "1. Right lower lobe opacity; pneumonia is possible -- follow-up in 4-6 weeks. 2. No pneumothorax.")


@pytest.mark.parametrize(("header", "rule"), [
    ("IMPRESSION:", "impression"),
    ("IMPRESSION :", "impression"),
    ("Impression:", "impression"),
    ("impression:", "impression"),
    ("IMPRESSIONS:", "impression_variant"),
    ("IMPRESSON:", "impression_variant"),
    ("IMPRESION:", "impression_variant"),
    ("CONCLUSION:", "impression_variant"),
    ("Conclusions:", "impression_variant"),
    ("SUMMARY:", "impression_variant"),
    ("FINDINGS AND IMPRESSION:", "impression_variant"),
    ("FINDINGS/IMPRESSION:", "impression_variant"),
])
def test_impression_headers_variants_and_typos(header: str, rule: str) -> None:
    report = f"FINAL REPORT\n INDICATION: Dyspnea.\n\n {header}  Mild pulmonary edema,\n improved since ___.\n"
    parsed = parse_report(report)
    assert (parsed.impression, parsed.rule) == ("Mild pulmonary edema, improved since ___.", rule)


def test_findings_only_report() -> None:
    parsed = parse_report("FINAL REPORT\n INDICATION: Line placement.\n\n FINDINGS:  Right IJ line ends in the SVC.\n")
    assert parsed == type(parsed)(findings="Right IJ line ends in the SVC.", impression=None, rule="findings_only")


def test_empty_sections_are_dropped() -> None:
    parsed = parse_report("FINAL REPORT\n FINDINGS:\n \n IMPRESSION:  No acute process.\n")
    assert (parsed.findings, parsed.impression, parsed.rule) == (None, "No acute process.", "impression")
    parsed = parse_report("FINAL REPORT\n FINDINGS:  Clear lungs.\n\n IMPRESSION:\n \n")
    assert (parsed.findings, parsed.impression, parsed.rule) == ("Clear lungs.", None, "findings_only")


def test_last_paragraph_fallback_skips_administrative_sections() -> None:
    report = """\
                                 FINAL REPORT
 HISTORY:  Fever.

 CHEST, AP:  Compared to ___, the ET tube is 4 cm above the carina.

 Persistent left basilar opacity, likely atelectasis.

 NOTIFICATION:  Discussed with Dr. ___ at 10:30 a.m.
"""
    parsed = parse_report(report)
    assert (parsed.impression, parsed.rule) == ("Persistent left basilar opacity, likely atelectasis.", "last_paragraph")
    assert parse_report("FINAL REPORT\n The lungs are clear.\n").impression == "The lungs are clear."


def test_nothing_usable() -> None:
    assert parse_report("FINAL REPORT\n INDICATION:  Cough.\n\n COMPARISON:  None.\n").rule == "none"
    assert parse_report("   \n").rule == "none"


def test_mixed_case_sentences_are_not_headers_and_the_last_impression_wins() -> None:
    report = ("FINAL REPORT\n IMPRESSION:  Small effusion.\n Note: lateral view limited.\n\n"
              " ADDENDUM:  Reviewed.\n\n IMPRESSION:  Small left effusion, 2 cm.\n")
    assert parse_report("FINAL REPORT\n IMPRESSION:  Small effusion.\n Note: lateral view limited.\n").impression == (
        "Small effusion. Note: lateral view limited.")
    assert parse_report(report).impression == "Small left effusion, 2 cm."


def _openi_reports() -> list[dict[str, str]]:
    """The AbstractText sections of torchxrayvision's 3,955 Open-i (Indiana University) reports."""
    # find_spec locates the installed package without importing it (and torch with it).
    archive = Path(importlib.util.find_spec("torchxrayvision").origin).parent / "data" / "NLMCXR_reports.tgz"
    reports = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.name.endswith(".xml"):
                root = ET.parse(tar.extractfile(member)).getroot()
                reports.append({e.get("Label"): (e.text or "").strip() for e in root.iter("AbstractText")})
    return reports


def test_open_i_reports() -> None:
    reports = _openi_reports()
    assert len(reports) > 3900
    impressions = findings = impressions_found = findings_found = 0
    for sections in reports:
        # Laid out as MIMIC lays out a report; empty Open-i sections become empty MIMIC sections.
        text = "FINAL REPORT\n" + "\n\n".join(f" {label}:  {body}" for label, body in sections.items())
        parsed = parse_report(text)
        if sections.get("IMPRESSION"):
            impressions += 1
            impressions_found += parsed.impression == " ".join(sections["IMPRESSION"].split())
        if sections.get("FINDINGS"):
            findings += 1
            findings_found += parsed.findings == " ".join(sections["FINDINGS"].split())
    assert impressions > 3800 and findings > 3300
    assert impressions_found / impressions > 0.99
    assert findings_found / findings > 0.99


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:minilm")


LONG_IMPRESSION = " ".join(
    f"{i}. Moderate right pleural effusion, increased from ___, with adjacent atelectasis (cannot exclude "
    f"pneumonia)." for i in range(1, 40))


def test_long_impression_is_cut_at_a_word_boundary(tokenizer) -> None:
    cut, count, truncated = truncate_to_tokens(LONG_IMPRESSION, tokenizer, 64)
    assert truncated and LONG_IMPRESSION.startswith(cut)
    assert count == len(tokenizer(cut)["input_ids"]) <= 64
    # Not cut shorter than needed: the next word would not fit.
    next_word_end = LONG_IMPRESSION.find(" ", len(cut) + 1)
    assert len(tokenizer(LONG_IMPRESSION[:next_word_end])["input_ids"]) > 64
    assert LONG_IMPRESSION[len(cut)] == " "  # the cut ends a word


def test_short_impression_is_kept(tokenizer) -> None:
    text = "No acute cardiopulmonary process. ET tube 4.5 cm above the carina."
    assert truncate_to_tokens(text, tokenizer, 256) == (text, len(tokenizer(text)["input_ids"]), False)


def test_unavailable_encoders_say_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(EncoderNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "no-such-model"))
    with pytest.raises(EncoderNotFoundError, match="set text.encoder to that directory"):
        load_tokenizer("no-such-org/no-such-model")


def test_parse_reports_writes_reports_and_rejects(tmp_path: Path, tokenizer) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "s1.txt").write_text(MIMIC_REPORT)
    (files / "s2.txt").write_text(f"FINAL REPORT\n IMPRESSION:  {LONG_IMPRESSION}\n")
    (files / "s3.txt").write_text("FINAL REPORT\n INDICATION:  Cough.\n")
    (files / "s4.txt").mkdir()  # not a file: unreadable (bytes that are not UTF-8 are decoded, see below)
    items = [ReportItem(study_id=study, subject_id=100 + study, path=files / f"s{study}.txt") for study in range(1, 6)]
    data_root = tmp_path / "run"
    for _ in range(2):  # a re-run of the same part replaces it
        counts = parse_reports(data_root, items, max_tokens=48, tokenizer=tokenizer, part="p10-000")
    assert (counts.parsed, counts.rejected, counts.truncated, counts.rules) == (2, 3, 1, {"impression": 2})
    with connect(data_root) as con:
        reports = con.sql("SELECT * FROM reports ORDER BY study_id").to_arrow_table().to_pylist()
        rejects = con.sql("SELECT * FROM rejects ORDER BY item_id").to_arrow_table().to_pylist()
    assert [(r["study_id"], r["subject_id"], r["parser_rule"]) for r in reports] == [
        (1, 101, "impression"), (2, 102, "impression")]
    full, cut = reports
    assert full["raw_text"] == MIMIC_REPORT and full["impression"] == parse_report(MIMIC_REPORT).impression
    assert not full["impression_truncated"]
    assert full["impression_tokens"] == len(tokenizer(full["impression"])["input_ids"]) <= 48
    assert cut["impression_truncated"] and cut["impression_tokens"] <= 48
    assert LONG_IMPRESSION.startswith(cut["impression"])
    assert [(r["item_id"], r["reason"], r["stage"], r["item_kind"]) for r in rejects] == [
        ("3", "no_usable_section", "ingest", "report"), ("4", "unreadable_report", "ingest", "report"),
        ("5", "missing_report", "ingest", "report")]
    assert all(str(files) in r["detail"] for r in rejects)


def test_reports_that_are_not_utf8_are_decoded_as_cp1252_and_say_so(tmp_path: Path, tokenizer) -> None:
    impression = "Café-au-lait spot – no effusion."  # the en dash is 0x96 in cp1252, a control character in latin-1
    files = tmp_path / "files"
    files.mkdir()
    (files / "s1.txt").write_bytes(f"FINAL REPORT\r\n IMPRESSION:  {impression}\r\n".encode("cp1252"))
    (files / "s2.txt").write_text(f"FINAL REPORT\n IMPRESSION:  {impression}\n", encoding="utf-8")
    (files / "s3.txt").write_bytes(b"FINAL REPORT\n IMPRESSION:  Caf\xe9 \x81 spot.\n")  # 0x81: undefined in cp1252
    items = [ReportItem(study_id=study, subject_id=100 + study, path=files / f"s{study}.txt") for study in range(1, 4)]
    counts = parse_reports(tmp_path / "run", items, max_tokens=64, tokenizer=tokenizer, part="p10-000")
    assert (counts.parsed, counts.rejected) == (3, 0)
    with connect(tmp_path / "run") as con:
        reports = con.sql("SELECT * FROM reports ORDER BY study_id").to_arrow_table().to_pylist()
    assert [(r["impression"], r["text_encoding"]) for r in reports] == [
        (impression, "cp1252"), (impression, "utf-8"), ("Café \x81 spot.", "latin-1")]
    assert reports[0]["raw_text"] == f"FINAL REPORT\n IMPRESSION:  {impression}\n"  # line endings as in text mode
