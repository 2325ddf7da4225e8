"""Negation scope over lists, cardiomegaly phrasing, and the left/right swap of flipped training samples.

Known answers, sentence by sentence, written in the ways radiologists state negated lists (CheXpert-style
labels: 1 positive, 0 negative, -1 uncertain, unmentioned NaN). Every pathology label a sentence does not
list must stay NaN, so a cue that leaks into the wrong finding fails too.
"""
import math

import pytest

from bmjlib.model.latents import swap_laterality
from bmjlib.schema import CHEXPERT_LABELS
from bmjlib.text.reports import chexpert_labels, extract_findings

PATHOLOGY = [k for k in CHEXPERT_LABELS if k != "No Finding"]

# Short names for the expected labels.
CON, EFF, PTX, EDE, ATE, CAR = "Consolidation", "Pleural Effusion", "Pneumothorax", "Edema", "Atelectasis", "Cardiomegaly"
LES, PNA, FRA, DEV, OPA = "Lung Lesion", "Pneumonia", "Fracture", "Support Devices", "Lung Opacity"

NEGATED_LISTS = [
    ("No focal consolidation, effusion, or pneumothorax.", {CON: 0, EFF: 0, PTX: 0}),
    ("No consolidations, effusions or pneumothoraces are seen.", {CON: 0, EFF: 0, PTX: 0}),
    ("No pneumothorax, pneumoperitoneum, or pleural effusion.", {EFF: 0, PTX: 0}),
    ("No large pleural effusion or definite pneumothorax.", {EFF: 0, PTX: 0}),
    ("There is no focal consolidation, pleural effusion, pneumothorax or pulmonary edema.",
     {CON: 0, EFF: 0, PTX: 0, EDE: 0}),
    ("There are no pleural effusions or pneumothoraces.", {EFF: 0, PTX: 0}),
    ("No evidence of pneumothorax, pleural effusion, or free air beneath the diaphragm.", {EFF: 0, PTX: 0}),
    ("No free air, pneumothorax or effusion.", {EFF: 0, PTX: 0}),
    ("Lungs are clear without consolidation, masses, effusions or pneumothorax.", {CON: 0, LES: 0, EFF: 0, PTX: 0}),
    ("Negative for pneumothorax, pleural effusion or consolidation.", {CON: 0, EFF: 0, PTX: 0}),
    ("The lungs are free of consolidation, edema and effusion.", {CON: 0, EDE: 0, EFF: 0}),
    ("Neither pleural effusion nor pneumothorax is seen.", {EFF: 0, PTX: 0}),
    ("Neither effusions nor consolidation.", {EFF: 0, CON: 0}),
    ("Consolidation, effusion, and pneumothorax are not seen.", {CON: 0, EFF: 0, PTX: 0}),
    ("Pleural effusions and pneumothorax are not identified.", {EFF: 0, PTX: 0}),
    ("Focal consolidation, pleural effusion, or pneumothorax is not present.", {CON: 0, EFF: 0, PTX: 0}),
    ("No pleural effusion or pneumothorax is seen.", {EFF: 0, PTX: 0}),
    ("No acute osseous abnormality, pneumothorax, or large pleural effusion.", {EFF: 0, PTX: 0}),
    ("No pulmonary nodules, masses, consolidation, or pleural effusions.", {LES: 0, CON: 0, EFF: 0}),
    ("No definite focal consolidation, pulmonary edema, sizable effusion or pneumothorax.",
     {CON: 0, EDE: 0, EFF: 0, PTX: 0}),
    ("No signs of pneumonia, pulmonary vascular congestion, or pleural effusion.", {PNA: 0, EDE: 0, EFF: 0}),
    ("No new focal consolidation, pleural effusion, or pneumothorax.", {CON: 0, EFF: 0, PTX: 0}),
    ("No effusion, pneumothorax, or acute fracture.", {EFF: 0, PTX: 0, FRA: 0}),
    ("Without evidence of pneumothorax, pneumomediastinum, or pleural effusion.", {EFF: 0, PTX: 0}),
    ("No effusion, pneumothorax, or edema is identified.", {EFF: 0, PTX: 0, EDE: 0}),
    ("No consolidation, edema, effusion, pneumothorax, fracture, or lung nodule.",
     {CON: 0, EDE: 0, EFF: 0, PTX: 0, FRA: 0, LES: 0}),
    ("No pleural effusion, pneumothorax, or enlarged heart.", {EFF: 0, PTX: 0, CAR: 0}),
    ("No cardiomegaly or pleural effusion.", {CAR: 0, EFF: 0}),
    ("No evidence of pneumothorax or subcutaneous emphysema, rib fractures, or pleural effusion.",
     {PTX: 0, FRA: 0, EFF: 0}),
    ("No pneumothorax, pleural effusion, or focal airspace consolidation to the extent visualized.",
     {PTX: 0, EFF: 0, CON: 0}),
    ("No pneumothorax or pleural effusions bilaterally.", {PTX: 0, EFF: 0}),
    ("No left or right pleural effusion and no pneumothorax.", {EFF: 0, PTX: 0}),
    ("No pneumothorax and/or large effusion.", {PTX: 0, EFF: 0}),
    ("No pleural effusion / pneumothorax.", {EFF: 0, PTX: 0}),
    ("Pleural effusion and pneumothorax have resolved.", {EFF: 0, PTX: 0}),
    ("Interval resolution of the left effusion and pneumothorax.", {EFF: 0, PTX: 0}),
    ("Resolved pneumothorax and pleural effusion.", {EFF: 0, PTX: 0}),
    ("No focal consolidation to suggest pneumonia.", {CON: 0, PNA: 0}),
    ("No focal consolidation concerning for pneumonia, pleural effusion, or pneumothorax.",
     {CON: 0, PNA: 0, EFF: 0, PTX: 0}),
    # a negated list followed by a positive statement
    ("No pneumothorax or effusion. Mild cardiomegaly.", {PTX: 0, EFF: 0, CAR: 1}),
    ("No effusion, but there is new consolidation.", {EFF: 0, CON: 1}),
    ("No effusion or pneumothorax; however, mild pulmonary edema is present.", {EFF: 0, PTX: 0, EDE: 1}),
    ("No pneumothorax; however, there is a small left pleural effusion.", {PTX: 0, EFF: 1}),
    ("No pneumothorax, small left effusion.", {PTX: 0, EFF: 1}),
    ("No pneumothorax, and the heart is enlarged.", {PTX: 0, CAR: 1}),
    ("No pneumothorax or effusion, and the cardiac silhouette is large.", {PTX: 0, EFF: 0, CAR: 1}),
    ("No pleural effusion or pneumothorax, with mild pulmonary edema.", {EFF: 0, PTX: 0, EDE: 1}),
    ("No pneumothorax, effusion has increased.", {PTX: 0, EFF: 1}),
    ("No pneumothorax, edema remains mild.", {PTX: 0, EDE: 1}),
    ("No pneumothorax or pleural effusion, left lower lobe atelectasis.", {PTX: 0, EFF: 0, ATE: 1}),
    ("Neither pneumothorax nor effusion, mild cardiomegaly.", {PTX: 0, EFF: 0, CAR: 1}),
    ("No acute osseous abnormality, mild cardiomegaly.", {CAR: 1}),
    ("No acute cardiopulmonary process with mild cardiomegaly.", {CAR: 1}),
    ("No acute process or fracture, left lower lobe atelectasis.", {FRA: 0, ATE: 1}),
    ("No pneumothorax, possible small right effusion.", {PTX: 0, EFF: -1}),
    ("No pneumothorax and the endotracheal tube terminates 4 cm above the carina.", {PTX: 0, DEV: 1}),
    ("No pneumothorax is seen. The heart is enlarged.", {PTX: 0, CAR: 1}),
    ("Heart size is normal. No pleural effusion or pneumothorax.", {CAR: 0, EFF: 0, PTX: 0}),
]

STAY_POSITIVE = [
    ("Small left effusion and mild pulmonary edema, without pneumothorax.", {EFF: 1, EDE: 1, PTX: 0}),
    ("Moderate cardiomegaly and small bilateral pleural effusions.", {CAR: 1, EFF: 1}),
    ("Right lower lobe consolidation and small right effusion.", {CON: 1, EFF: 1}),
    ("There is a small right pleural effusion and no pneumothorax.", {EFF: 1, PTX: 0}),
    ("Mild cardiomegaly without pulmonary edema or pleural effusion.", {CAR: 1, EDE: 0, EFF: 0}),
    ("Left basilar atelectasis, small left effusion and mild edema.", {ATE: 1, EFF: 1, EDE: 1}),
    ("Effusions, edema and cardiomegaly are unchanged.", {EFF: 1, EDE: 1, CAR: 1}),
    ("Persistent consolidation, effusion and atelectasis.", {CON: 1, EFF: 1, ATE: 1}),
    ("Possible small left effusion or atelectasis.", {EFF: -1, ATE: -1}),
    ("No pneumothorax. Possible small right pleural effusion.", {PTX: 0, EFF: -1}),
    ("Left pleural effusion without pneumothorax or consolidation.", {EFF: 1, PTX: 0, CON: 0}),
    ("Large right pneumothorax and small left effusion, no edema.", {PTX: 1, EFF: 1, EDE: 0}),
    ("Bibasilar opacities likely atelectasis, no effusion.", {OPA: 1, ATE: -1, EFF: 0}),
    ("Large heart, small effusions.", {CAR: 1, EFF: 1}),
]


def _check(sentence, expected):
    got = chexpert_labels(sentence)
    want = {k: float(expected[k]) if k in expected else math.nan for k in PATHOLOGY}
    wrong = {k: (want[k], got[k]) for k in PATHOLOGY
             if not (math.isnan(want[k]) and math.isnan(got[k])) and want[k] != got[k]}
    assert not wrong, f"{sentence!r}: (want, got) {wrong}"


@pytest.mark.parametrize("sentence,expected", NEGATED_LISTS, ids=[s for s, _ in NEGATED_LISTS])
def test_negation_covers_every_item_of_a_list(sentence, expected):
    _check(sentence, expected)


@pytest.mark.parametrize("sentence,expected", STAY_POSITIVE, ids=[s for s, _ in STAY_POSITIVE])
def test_positive_findings_stay_positive(sentence, expected):
    _check(sentence, expected)


def test_a_negated_list_says_nothing_of_side_or_severity():
    got = extract_findings("No large pleural effusion or definite pneumothorax.")
    assert got["Pleural Effusion"] == {"status": "absent", "side": "", "severity": 0, "change": None}
    assert got["Pneumothorax"]["status"] == "absent"
    got = extract_findings("No pneumothorax, small left effusion.")
    assert (got["Pleural Effusion"]["side"], got["Pleural Effusion"]["severity"]) == ("left", 1)


# (sentence, Cardiomegaly label, Enlarged Cardiomediastinum label); NaN = not mentioned
HEART = [
    ("The cardiac silhouette is large.", 1, math.nan),
    ("The heart is enlarged.", 1, math.nan),
    ("The heart is large.", 1, math.nan),
    ("Enlarged cardiac silhouette.", 1, math.nan),
    ("Large cardiac silhouette.", 1, math.nan),
    ("Enlarged heart.", 1, math.nan),
    ("Heart size is enlarged.", 1, math.nan),
    ("The heart size remains enlarged.", 1, math.nan),
    ("Heart size is mildly to moderately enlarged.", 1, math.nan),
    ("Enlargement of the cardiac silhouette.", 1, math.nan),
    ("Mild cardiomegaly.", 1, math.nan),
    ("Cardiac enlargement.", 1, math.nan),
    ("Compared to ___, the cardiac silhouette is now larger.", math.nan, math.nan),  # a change, not a size
    # the cardiomediastinal silhouette includes the mediastinum: its enlargement is the broader label
    ("The cardiomediastinal silhouette is enlarged.", math.nan, 1),
    ("Enlarged cardiomediastinal silhouette.", math.nan, 1),
    ("The heart is normal in size.", 0, math.nan),
    ("The heart is of normal size.", 0, math.nan),
    ("Heart size is normal.", 0, math.nan),
    ("Normal heart size.", 0, math.nan),
    ("The heart is not enlarged.", 0, math.nan),
    ("The cardiac silhouette is not large.", 0, math.nan),
    ("The cardiomediastinal silhouette is normal.", 0, math.nan),
    ("Heart size is top normal.", -1, math.nan),
    ("Heart size is upper normal.", -1, math.nan),
    ("Heart size is at the upper limits of normal.", -1, math.nan),
    ("Borderline cardiac silhouette.", -1, math.nan),
    ("No cardiomegaly.", 0, math.nan),
]


@pytest.mark.parametrize("sentence,cardio,mediastinum", HEART, ids=[h[0] for h in HEART])
def test_a_large_heart_however_phrased(sentence, cardio, mediastinum):
    got = chexpert_labels(sentence)
    for label, want in ((CAR, cardio), ("Enlarged Cardiomediastinum", mediastinum)):
        assert (math.isnan(got[label]) and math.isnan(want)) or got[label] == want, (sentence, label, got[label])


def test_large_is_the_finding_not_its_grade():
    assert extract_findings("The cardiac silhouette is large.")["Cardiomegaly"]["severity"] == 0
    assert extract_findings("The heart is markedly enlarged.")["Cardiomegaly"]["severity"] == 3
    assert extract_findings("Moderately large heart.")["Cardiomegaly"]["severity"] == 2


# ----------------------------------------------------------------------------- left/right swap

SWAPS = [
    ("New Left effusion; right PTX unchanged, LEFT", "New Right effusion; left PTX unchanged, RIGHT"),
    ("Mild dextroconvex scoliosis.", "Mild levoconvex scoliosis."),
    ("Levoconvex curvature of the thoracic spine.", "Dextroconvex curvature of the thoracic spine."),
    ("Dextroscoliosis; LEVOSCOLIOSIS; dextro-convex curve.", "Levoscoliosis; DEXTROSCOLIOSIS; levo-convex curve."),
    ("Trachea deviated rightward; shift leftwards.", "Trachea deviated leftward; shift rightwards."),
    ("Rightward mediastinal shift.", "Leftward mediastinal shift."),
    ("R pleural effusion, L base atelectasis, R>L.", "L pleural effusion, R base atelectasis, L>R."),
    ("Small L effusion (R unchanged).", "Small R effusion (L unchanged)."),
    ("RLL and LLL opacities, RUL nodule, LUL scarring.", "LLL and RLL opacities, LUL nodule, RUL scarring."),
    ("Rt IJ and LIJ catheters; lt chest tube.", "Lt IJ and RIJ catheters; rt chest tube."),
    ("Left-sided pacemaker, right-sided PICC.", "Right-sided pacemaker, left-sided PICC."),
    ("Lingular atelectasis.", "Middle-lobe atelectasis."),
    ("Opacity in the right middle lobe and the lingula.", "Opacity in the left lingula and the middle lobe."),
    ("RML opacity.", "LML opacity."),  # letter for letter, as the other lobe codes
    # not side words: kept as written
    ("Lateral view; leftover contrast; bright; Dextrose; levofloxacin.",
     "Lateral view; leftover contrast; bright; Dextrose; levofloxacin."),
    ("On 2 L nasal cannula, R/O pneumonia, L-spine hardware, L1 compression.",
     "On 2 L nasal cannula, R/O pneumonia, L-spine hardware, L1 compression."),
    ("Retrocardiac opacity, bibasilar atelectasis, bilateral effusions.",
     "Retrocardiac opacity, bibasilar atelectasis, bilateral effusions."),
]


@pytest.mark.parametrize("text,swapped", SWAPS, ids=[s for s, _ in SWAPS])
def test_swap_laterality_known_answers(text, swapped):
    assert swap_laterality(text) == swapped
    assert swap_laterality(swapped) == text


MIRROR = {"left": "right", "right": "left", "bilateral": "bilateral", "": ""}
# One sentence per side word the extractor reads (bmjlib.text.reports._side).
SIDED = [("Small left effusion.", "left"), ("Small right effusion.", "right"), ("Left basilar atelectasis.", "left"),
         ("Lingular atelectasis.", "left"), ("Atelectasis in the lingula.", "left"),
         ("Right middle lobe atelectasis.", "right"), ("Middle lobe atelectasis.", "right"),
         ("RLL atelectasis.", "right"), ("RUL atelectasis.", "right"), ("LLL atelectasis.", "left"),
         ("LUL atelectasis.", "left"), ("Pleural effusion on the right.", "right"),
         ("Effusions, left greater than right.", "bilateral"), ("Bibasilar atelectasis.", "bilateral"),
         ("Small bilateral effusions.", "bilateral"), ("Biapical pneumothoraces.", "bilateral")]


@pytest.mark.parametrize("sentence,side", SIDED, ids=[s for s, _ in SIDED])
def test_swap_mirrors_every_side_the_extractor_reads(sentence, side):
    finding, = extract_findings(sentence).values()
    assert finding["side"] == side
    mirrored, = extract_findings(swap_laterality(sentence)).values()
    assert mirrored["side"] == MIRROR[side], swap_laterality(sentence)


def test_retrocardiac_stays_as_written():
    # the heart is mirrored with the lungs, so "retrocardiac" still describes the flipped image
    assert swap_laterality("Retrocardiac atelectasis.") == "Retrocardiac atelectasis."


def test_swapping_twice_gives_every_test_sentence_back():
    texts = ([s for s, _ in NEGATED_LISTS + STAY_POSITIVE] + [h[0] for h in HEART] + [s for s, _ in SIDED]
             + [t for pair in SWAPS for t in pair])
    assert len(texts) > 100
    back = [t for t in texts if swap_laterality(swap_laterality(t)) != t]
    assert not back


def test_swap_rejects_non_text():
    with pytest.raises(TypeError, match="swap_laterality expects a sentence"):
        swap_laterality(float("nan"))
