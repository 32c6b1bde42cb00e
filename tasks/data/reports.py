"""Radiology report parsing: FINDINGS and IMPRESSION out of MIMIC-CXR's free-text reports.

MIMIC-CXR's conventions (as in MIT-LCP/mimic-cxr's section parser): a report opens with a "FINAL REPORT" title,
sections start at a line with an upper-case header followed by ':' ("IMPRESSION:", "FINDINGS:", "COMPARISON:"),
the header may be followed by text on the same line, and radiologists use variants and typos of the headers.
Reports without any impression-like header usually end with a free-text paragraph that serves as the impression.

Rules, in order (ParsedReport.rule says which one was taken):
- "impression": the last non-empty IMPRESSION section (addenda restate it last);
- "impression_variant": the same with a variant header (IMPRESSIONS, CONCLUSION, SUMMARY, FINDINGS AND IMPRESSION,
  a typo such as IMPRESSON);
- "findings_only": no impression text, but a non-empty FINDINGS section;
- "last_paragraph": neither, and the last paragraph of the last section that is not administrative (examination,
  indication, comparison, ...) is taken as the impression;
- "none": nothing usable.
Text is kept verbatim apart from whitespace, which is collapsed to single spaces; digits and punctuation stay.

Encoding: a report file is read as UTF-8; one that is not valid UTF-8 (a report saved by a Windows editor, with
"é" as the single byte 0xE9) is decoded whole as cp1252, or as latin-1 if it holds one of the five bytes cp1252
leaves undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D; latin-1 decodes every byte). The reports table's text_encoding
says which one was used, so such reports can be found and checked: a file that mixes UTF-8 with a stray cp1252
byte has its UTF-8 characters garbled. Line endings become "\n", as in text mode.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tasks.data.catalog import write_part
from tasks.generators.text import truncate_to_tokens

IMPRESSION = "impression"
IMPRESSION_VARIANTS = frozenset({
    "impressions", "impresson", "imprression", "imoression", "impressoin", "imprssion", "impresion", "imperssion",
    "mpression", "impession", "conclusion", "conclusions", "summary", "findings and impression",
    "findings/impression", "impression and findings", "findings and impressions",
})
FINDINGS_VARIANTS = frozenset({"findings", "finding", "findins", "findngs"})
# Sections that describe the request, not the image: never a source for the last-paragraph fallback.
ADMINISTRATIVE = frozenset({
    "examination", "exam", "type of examination", "indication", "indications", "clinical indication", "history",
    "clinical history", "patient history", "reason for exam", "reason for examination", "clinical information",
    "comparison", "comparisons", "comparison exam", "technique", "procedure", "notification", "recommendation",
    "recommendations", "recommendation(s)", "date", "dictated by", "signed by",
})
KNOWN_HEADERS = IMPRESSION_VARIANTS | FINDINGS_VARIANTS | ADMINISTRATIVE | {IMPRESSION}

# A header candidate: words at a line start, then ':' (optionally after spaces, as in "IMPRESSION :").
_HEADER = re.compile(r"^[ \t]*(?P<name>[A-Za-z][A-Za-z /&(),-]{0,48}?)[ \t]*:", re.MULTILINE)
_TITLE = re.compile(r"^[ \t]*FINAL REPORT[ \t]*$", re.MULTILINE | re.IGNORECASE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ParsedReport:
    findings: str | None
    impression: str | None
    rule: str


@dataclass(frozen=True)
class ReportItem:
    study_id: int
    subject_id: int
    path: Path


@dataclass(frozen=True)
class ReportCounts:
    parsed: int
    rejected: int
    truncated: int  # impressions cut to the token limit
    rules: dict[str, int]  # parsed reports per ParsedReport.rule


def _normalise(text: str) -> str | None:
    collapsed = _WHITESPACE.sub(" ", text).strip()
    return collapsed or None


def _header_key(name: str) -> str:
    return re.sub(r"\s*/\s*", "/", _WHITESPACE.sub(" ", name).strip().lower())


def _is_header(name: str) -> bool:
    # Upper case is MIMIC's header convention; other casings count only for names we know, so that a sentence
    # such as "Note: ..." at a line start stays in its section.
    return name.strip() == name.strip().upper() or _header_key(name) in KNOWN_HEADERS


def split_sections(text: str) -> list[tuple[str, str]]:
    """The report as (header key, raw body) pairs in order; text before the first header has the key ""."""
    text = _TITLE.sub("", text)
    headers = [match for match in _HEADER.finditer(text) if _is_header(match["name"])]
    sections = [("", text[: headers[0].start()] if headers else text)]
    for match, following in zip(headers, headers[1:] + [None]):
        end = following.start() if following else len(text)
        sections.append((_header_key(match["name"]), text[match.end() : end]))
    return sections


def _last_paragraph(sections: list[tuple[str, str]]) -> str | None:
    for key, body in reversed(sections):
        if key in ADMINISTRATIVE:
            continue
        paragraphs = [p for p in map(_normalise, _PARAGRAPH_BREAK.split(body)) if p]
        if paragraphs:
            return paragraphs[-1]
    return None


def parse_report(text: str) -> ParsedReport:
    """FINDINGS and IMPRESSION of a report, by the rules in the module docstring."""
    sections = split_sections(text)
    impression, impression_key, findings = None, None, None
    for key, raw_body in sections:
        body = _normalise(raw_body)
        if body is None:
            continue
        if key == IMPRESSION or key in IMPRESSION_VARIANTS:
            impression, impression_key = body, key
        elif key in FINDINGS_VARIANTS:
            findings = body
    if impression is not None:
        rule = "impression" if impression_key == IMPRESSION else "impression_variant"
        return ParsedReport(findings, impression, rule)
    if findings is not None:
        return ParsedReport(findings, None, "findings_only")
    fallback = _last_paragraph(sections)
    return ParsedReport(None, fallback, "last_paragraph" if fallback else "none")


def decode_report(data: bytes) -> tuple[str, str]:
    """The text of a report file and the encoding that decoded it: "utf-8", "cp1252" or "latin-1" (module docstring)."""
    for encoding in ("utf-8", "cp1252"):
        try:
            text = data.decode(encoding)
            break
        except UnicodeDecodeError:
            pass
    else:
        text, encoding = data.decode("latin-1"), "latin-1"
    # Line endings as text mode gives them: the section rules expect "\n".
    return text.replace("\r\n", "\n").replace("\r", "\n"), encoding


def _reject(item: ReportItem, reason: str, detail: str) -> dict:
    return {"item_id": str(item.study_id), "item_kind": "report", "stage": "ingest", "reason": reason,
            "detail": detail, "source_path": str(item.path)}


def parse_reports(data_root: Path, reports: list[ReportItem], max_tokens: int, tokenizer: PreTrainedTokenizerBase,
                  part: str) -> ReportCounts:
    """Parse report files into the "reports" table and their failures into "rejects".

    Writes rejects/<part>, then reports/<part> (both always, so that re-running a part replaces its earlier rows,
    rejects included); the reports part, written last, marks the unit complete (tasks.data.ingest.UNIT_PARTS).
    The impression is cut to `max_tokens` tokens of `tokenizer`.
    """
    rows, rejects, rules = [], [], Counter()
    for item in reports:
        try:
            raw, encoding = decode_report(Path(item.path).read_bytes())
        except FileNotFoundError:
            rejects.append(_reject(item, "missing_report", f"{item.path}: no such file"))
            continue
        except OSError as err:
            rejects.append(_reject(item, "unreadable_report", f"{item.path}: {err}"))
            continue
        parsed = parse_report(raw)
        if parsed.rule == "none":
            rejects.append(_reject(item, "no_usable_section", f"{item.path}: no findings, impression or final paragraph"))
            continue
        impression, tokens, truncated = parsed.impression, None, False
        if impression is not None:
            impression, tokens, truncated = truncate_to_tokens(impression, tokenizer, max_tokens)
        rules[parsed.rule] += 1
        rows.append({"study_id": item.study_id, "subject_id": item.subject_id, "findings": parsed.findings,
                     "impression": impression, "raw_text": raw, "parser_rule": parsed.rule,
                     "impression_tokens": tokens, "impression_truncated": truncated, "text_encoding": encoding})
    write_part(data_root, "rejects", part, rejects)
    write_part(data_root, "reports", part, rows)
    return ReportCounts(parsed=len(rows), rejected=len(rejects),
                        truncated=sum(row["impression_truncated"] for row in rows), rules=dict(rules))
