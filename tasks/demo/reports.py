"""Ground truth, report text and CheXpert/NegBio-style labels of one demo study; no pixels involved.

The truth (what the phantom draws) is sampled with MIMIC-like prevalence and co-occurrence: a heart-failure
state drives cardiomegaly, edema and effusion together, an infection state drives consolidation, pneumonia and
opacity, portable (AP, often ICU) studies carry devices and sicker patients. The report is written from the truth
the way radiologists write: positives with side and severity, some negatives, hedges; the labels are read off the
report sentences as they are written (positive > uncertain > negative, as the CheXpert labeler aggregates), so
report and labels always agree, while a few per cent of mentions disagree with the image (omitted or invented
findings), as real labels do.
"""

from __future__ import annotations

import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from tasks.pathologies import CHEXPERT_LABELS, PATHOLOGIES

SEVERITIES = ("mild", "moderate", "severe")
ZONES = ("upper", "middle", "lower")
TRUTH_CLASSES = PATHOLOGIES + ("Support Devices",)


@dataclass(frozen=True)
class Finding:
    present: bool
    side: str | None = None  # right / left / bilateral (patient's side); None where it has no side
    severity: str | None = None  # mild / moderate / severe
    zone: str | None = None  # upper / middle / lower, for focal lung findings


@dataclass(frozen=True)
class StudyTruth:
    portable: bool  # AP bedside study (else erect PA + lateral)
    findings: dict[str, Finding]  # every name of TRUTH_CLASSES
    devices: tuple[str, ...] = ()

    @property
    def no_finding(self) -> bool:
        return not any(self.findings[name].present for name in PATHOLOGIES)


@dataclass(frozen=True)
class Report:
    text: str
    chexpert: dict[str, float | None]  # every CHEXPERT_LABELS name
    negbio: dict[str, float | None]


_SIDED = {"Pleural Effusion", "Consolidation", "Pneumonia", "Lung Opacity", "Atelectasis"}  # may be bilateral


def sample_truth(rng: np.random.Generator, portable: bool, chronic_heart: bool, has_implant: bool) -> StudyTruth:
    """What one study shows. chronic_heart / has_implant are the subject's, so they persist across studies."""
    heart_failure = rng.random() < (0.5 if chronic_heart else 0.08) + 0.12 * portable
    infection = rng.random() < 0.1 + 0.12 * portable
    p = {
        "Cardiomegaly": 0.7 if heart_failure else (0.25 if chronic_heart else 0.05),
        "Edema": 0.6 if heart_failure else 0.02,
        "Pleural Effusion": 0.6 if heart_failure else (0.3 if infection else 0.05 + 0.05 * portable),
        "Consolidation": 0.35 if infection else 0.015,
        "Pneumonia": 0.55 if infection else 0.01,
        # MIMIC's most common label after the heart-failure trio (~22%): infection, congestion, or on its own.
        "Lung Opacity": 0.45 if infection else (0.3 if heart_failure else 0.14),
        "Atelectasis": 0.08 + 0.12 * portable,
        "Pneumothorax": 0.055 if portable else 0.015,
        "Lung Lesion": 0.03,
        "Fracture": 0.025,
    }
    present = {name: bool(rng.random() < p[name]) for name in PATHOLOGIES}
    if present["Pleural Effusion"] and rng.random() < 0.35:
        present["Atelectasis"] = True  # compressive atelectasis next to the fluid
    findings = {name: _describe(rng, name) if present[name] else Finding(False) for name in PATHOLOGIES}
    devices: tuple[str, ...] = ()
    if portable and rng.random() < 0.5:
        icu = rng.random() < 0.6
        chance = {"endotracheal tube": 0.8 * icu, "nasogastric tube": 0.7 if icu else 0.1,
                  "central venous catheter": 0.7}
        devices = tuple(device for device, p_device in chance.items() if rng.random() < p_device)
    if has_implant:
        devices += ("pacemaker",) if chronic_heart else ("sternal wires",)
    findings["Support Devices"] = Finding(bool(devices))
    return StudyTruth(portable=portable, findings=findings, devices=devices)


def _describe(rng: np.random.Generator, name: str) -> Finding:
    if name == "Edema":
        return Finding(True, "bilateral", SEVERITIES[rng.choice(3, p=[0.5, 0.35, 0.15])])
    if name == "Cardiomegaly":
        return Finding(True, None, SEVERITIES[rng.choice(3, p=[0.5, 0.35, 0.15])])
    if name in _SIDED:
        p_side = [0.45, 0.35, 0.2] if name == "Pneumonia" else [0.35, 0.3, 0.35]
        side = rng.choice(["right", "left", "bilateral"], p=p_side)
    else:
        side = rng.choice(["right", "left"])
    zone = None
    if name in ("Consolidation", "Pneumonia", "Lung Opacity", "Lung Lesion"):
        zone = ZONES[rng.choice(3, p=[0.25, 0.3, 0.45])]
    elif name == "Atelectasis":
        zone = "lower"
    return Finding(True, str(side), SEVERITIES[rng.choice(3, p=[0.5, 0.33, 0.17])], zone)


# ---------------------------------------------------------------------------------------------------------------
# Wording

_SIZE = {"mild": ["small", "trace", "small"], "moderate": ["moderate", "moderate-sized"], "severe": ["large", "large"]}
_DEGREE = {"mild": ["mild", "minimal", "mild"], "moderate": ["moderate"], "severe": ["severe", "marked"]}
_LOBE = {
    ("right", "upper"): "right upper lobe", ("right", "middle"): "right middle lobe",
    ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
    ("left", "middle"): "lingula", ("left", "lower"): "left lower lobe",
}
_REGION = {"upper": "upper lungs", "middle": "mid lungs", "lower": "lung bases"}
_HEDGE = ["Cannot exclude {x}.", "Possible {x}.", "{X} is not excluded.", "Findings may represent {x}."]


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _where(rng: np.random.Generator, f: Finding) -> str:
    if f.side == "bilateral":
        return "bilateral " + _REGION[f.zone or "lower"] if f.zone else "bilateral"
    if f.zone:
        return _LOBE[(f.side, f.zone)] if rng.random() < 0.6 else f"{f.side} {_REGION[f.zone][:-1]}"
    return f.side or ""


_POSITIVE = {
    "Pleural Effusion": ["{Size} {side} pleural effusion{s}.", "{There} {size} {side} pleural effusion{s}.",
                         "{Size} {side} pleural effusion{s} blunting the costophrenic angle{s}."],
    "Cardiomegaly": ["{Degree} cardiomegaly.", "The heart is {degree}ly enlarged.",
                     "{Degree} enlargement of the cardiac silhouette."],
    "Edema": ["{Degree} pulmonary edema.", "{Degree} interstitial pulmonary edema.",
              "Pulmonary vascular congestion with {degree} pulmonary edema."],
    "Consolidation": ["Dense consolidation in the {where}.", "Consolidation in the {where}."],
    "Pneumonia": ["Pneumonia in the {where}.", "Findings consistent with pneumonia in the {where}."],
    "Lung Opacity": ["Hazy opacity in the {where}.", "Patchy opacities in the {where}."],
    "Atelectasis": ["{Basilar} atelectasis.", "Plate-like atelectasis at the {base}."],
    "Fracture": ["Healing fracture of the {side} {rib} rib.", "{Side} {rib} rib fracture."],
    "Lung Lesion": ["{Measure} in the {where}.", "There is a {measure} in the {where}."],
    "Pneumothorax": ["{Size} {side} apical pneumothorax.", "There is a {size} {side} pneumothorax."],
}


def _positive(rng: np.random.Generator, name: str, f: Finding) -> str:
    """One sentence stating the finding with its side, severity and place."""
    sev, side = f.severity or "mild", f.side or ""
    if name == "Atelectasis" and sev == "severe":
        return f"{side.capitalize()} lower lobe collapse."
    words = {
        "side": side, "size": _pick(rng, _SIZE[sev]), "degree": _pick(rng, _DEGREE[sev]), "where": _where(rng, f),
        "s": "s" if side == "bilateral" else "", "there": "there are" if side == "bilateral" else "there is a",
        "basilar": "bibasilar" if side == "bilateral" else f"{side} basilar",
        "base": "bases" if side == "bilateral" else f"{side} base",
        "rib": _pick(rng, ["6th", "7th", "8th", "lateral 5th", "posterolateral 6th"]),
        "measure": {"mild": f"{rng.integers(5, 10)} mm nodule",
                    "moderate": f"{rng.integers(11, 25) / 10:.1f} cm nodule",
                    "severe": f"{rng.integers(35, 60) / 10:.1f} cm mass"}[sev],
    }
    words.update({key.capitalize(): value.capitalize() for key, value in list(words.items())})
    return _pick(rng, _POSITIVE[name]).format(**words)


_NEGATIVE = {
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
    "Pleural Effusion": ["No pleural effusion.", "No large pleural effusion."],
    "Consolidation": ["No focal consolidation.", "There is no focal consolidation."],
    "Edema": ["No pulmonary edema.", "No evidence of pulmonary edema."],
    "Cardiomegaly": ["Heart size is normal.", "The heart is not enlarged."],
    "Pneumonia": ["No evidence of pneumonia."],
    "Fracture": ["No displaced rib fracture."],
}
_DEVICE_TEXT = {
    "endotracheal tube": "Endotracheal tube terminates {n} cm above the carina.",
    "nasogastric tube": "Nasogastric tube courses below the diaphragm into the stomach.",
    "central venous catheter": "Right internal jugular central venous catheter terminates in the SVC.",
    "pacemaker": "Left chest wall pacemaker with leads in the right atrium and right ventricle.",
    "sternal wires": "Median sternotomy wires are intact.",
}
_HEDGED_TERM = {
    "Pneumonia": "early pneumonia", "Pleural Effusion": "a small pleural effusion",
    "Pneumothorax": "a tiny pneumothorax",
    "Consolidation": "early consolidation", "Edema": "mild pulmonary edema", "Atelectasis": "minimal atelectasis",
    "Lung Opacity": "a subtle opacity", "Lung Lesion": "a small nodule", "Fracture": "a rib fracture",
    "Cardiomegaly": "mild cardiomegaly",
}
_IMPRESSION_HEADERS = ["IMPRESSION:"] * 12 + ["IMPRESSIONS:", "CONCLUSION:", "IMPRESSION :"]


# Findings read lungs first, then pleura, heart and bones, as radiologists dictate.
_REPORT_ORDER = {"Pleural Effusion": 1, "Pneumothorax": 1, "Cardiomegaly": 2, "Fracture": 3}
_PRECEDENCE = {1.0: 2, -1.0: 1, 0.0: 0}  # the CheXpert labeler's aggregation: positive > uncertain > negative


def _hedge(rng: np.random.Generator, name: str) -> str:
    term = _HEDGED_TERM[name]
    return _pick(rng, _HEDGE).format(x=term, X=term.capitalize())


def write_report(truth: StudyTruth, rng: np.random.Generator, age: int, sex: str) -> Report:
    """MIMIC-style free text and its CheXpert / NegBio labels."""
    labels: dict[str, float] = {}
    findings: list[str] = []
    impression: list[str] = []

    def say(sentence: str, name: str, value: float, in_impression: bool) -> None:
        findings.append(sentence)
        if in_impression:
            impression.append(sentence)
        if name not in labels or _PRECEDENCE[value] > _PRECEDENCE[labels[name]]:
            labels[name] = value

    for device in truth.devices:
        say(_DEVICE_TEXT[device].format(n=rng.integers(3, 6)), "Support Devices", 1.0, False)
    for name in sorted(PATHOLOGIES, key=lambda n: _REPORT_ORDER.get(n, 0)):
        f = truth.findings[name]
        roll = rng.random()
        if f.present and roll < 0.04:
            continue  # label noise: a finding the radiologist did not report
        if f.present and roll < 0.12:
            say(_hedge(rng, name), name, -1.0, True)
        elif f.present or roll < 0.006:  # the rare roll invents a finding that is not in the image (label noise)
            say(_positive(rng, name, f if f.present else _describe(rng, name)), name, 1.0, rng.random() < 0.8)
        elif name == "Pneumonia" and roll < 0.05:
            say(_hedge(rng, name), name, -1.0, True)  # "cannot exclude pneumonia" where there is none
        elif name in _NEGATIVE and roll < 0.55:
            say(_pick(rng, _NEGATIVE[name]), name, 0.0, False)
    if labels.get("Cardiomegaly") == 1.0 and rng.random() < 0.3:
        say("The cardiomediastinal silhouette is enlarged.", "Enlarged Cardiomediastinum", 1.0, False)
    if not any(labels.get(name) in (1.0, -1.0) for name in CHEXPERT_LABELS if name != "Support Devices"):
        normal_findings, normal_impressions = open_i_normal_wording()
        for sentence in dict.fromkeys(_pick(rng, normal_findings) for _ in range(1 + int(rng.integers(3)))):
            say(sentence, "No Finding", 1.0, False)
        impression = [_pick(rng, normal_impressions)]

    exam = "CHEST (PORTABLE AP)" if truth.portable else "CHEST (PA AND LAT)"
    technique = "Single frontal view of the chest." if truth.portable else "Chest PA and lateral radiographs."
    indication = _pick(rng, ["Shortness of breath.", "Evaluate for pneumonia.", "Chest pain.", "Fever and cough.",
                             "Evaluate ET tube placement." if truth.portable else "Preoperative evaluation."])
    parts = ["                                 FINAL REPORT", f" EXAMINATION:  {exam}", "",
             f" INDICATION:  {age}-year-old {sex} with ___.  {indication}", "", f" TECHNIQUE:  {technique}", "",
             f" COMPARISON:  {_pick(rng, ['None.', '___', 'Prior chest radiograph from ___.'])}", "",
             " FINDINGS:", "", " " + " ".join(findings), ""]
    if impression and rng.random() > 0.12:  # some MIMIC reports end after FINDINGS
        parts += [" " + _pick(rng, _IMPRESSION_HEADERS), "", " " + " ".join(impression), ""]
    chexpert = {name: labels.get(name) for name in CHEXPERT_LABELS}
    return Report("\n".join(parts), chexpert, _negbio(chexpert, rng))


# Sentences of normal Open-i reports are kept only if they name no finding a labeler could read (not even as a
# negation) and no technique (a PA/lateral sentence would contradict a portable study).
_NAMES_A_FINDING = re.compile(
    r"effusion|pneumothorax|consolidat|edema|opacit|nodul|mass|fractur|atelecta|pneumonia|heart|cardi|lesion|"
    r"granulom|tube|catheter|pacemaker|wire|infiltrat|scar|emphysema|inflat|calcif|degenerat|spine|osseous|bon[ey]|"
    r"aort|hil(um|ar)|thora|pleura|air|mediastin|widen|view|XXXX|\d", re.IGNORECASE)


@lru_cache(maxsize=1)
def open_i_normal_wording() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Real wording of normal chest films: (findings sentences, impressions) from the 3,955 Open-i reports that
    torchxrayvision ships (data/NLMCXR_reports.tgz), those of reports whose MeSH term is 'normal' only, kept
    when written at least 3 times, most frequent first."""
    spec = importlib.util.find_spec("torchxrayvision")  # locates the package without importing torch
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torchxrayvision is not installed: it ships the Open-i reports the demo reports quote")
    archive = Path(spec.submodule_search_locations[0]) / "data" / "NLMCXR_reports.tgz"
    findings, impressions = Counter(), Counter()
    with tarfile.open(archive) as tar:
        for member in tar:
            if not member.isfile():
                continue
            root = ET.fromstring(tar.extractfile(member).read())
            if [e.text for e in root.iter("major")] != ["normal"]:
                continue
            sections = {e.get("Label"): e.text or "" for e in root.iter("AbstractText")}
            for sentence in re.split(r"(?<=\.)\s+", sections.get("FINDINGS", "")):
                findings[_tidy(sentence)] += 1
            impressions[_tidy(sections.get("IMPRESSION", ""))] += 1

    def common(counts: Counter) -> tuple[str, ...]:
        kept = [(-n, text) for text, n in counts.items()
                if n >= 3 and len(text.split()) >= 2 and not _NAMES_A_FINDING.search(text)]
        return tuple(text for _, text in sorted(kept))

    return common(findings), common(impressions)


def _tidy(sentence: str) -> str:
    sentence = re.sub(r"[\s.]+$", "", sentence.strip())
    return f"{sentence}." if sentence else ""


def _negbio(chexpert: dict[str, float | None], rng: np.random.Generator) -> dict[str, float | None]:
    """NegBio reads the same text a little differently: some hedges read as positives, some negations missed."""
    out = dict(chexpert)
    for name, value in chexpert.items():
        if value == -1.0 and rng.random() < 0.25:
            out[name] = 1.0
        elif value == 0.0 and rng.random() < 0.1:
            out[name] = None
    return out


def empty_labels() -> dict[str, float | None]:
    """Labels of a report with no usable text: nothing mentioned."""
    return {name: None for name in CHEXPERT_LABELS}
