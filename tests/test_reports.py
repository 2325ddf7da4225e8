"""Report sections, the rule-based finding extractor and CheXpert-style labels."""
import math

import pytest

from bmjlib.text.reports import chexpert_labels, extract_findings, parse_sections
from bmjlib.schema import CHEXPERT_LABELS

MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with shortness of breath, evaluate for pneumothorax

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 Compared to ___, the moderate right pleural effusion has increased.  No pneumothorax.
 The heart is mildly enlarged.  Endotracheal tube terminates 4 cm above the carina.

 IMPRESSION:

 1.  Moderate right pleural effusion, increased.
 2.  Mild cardiomegaly.
"""


def test_sections_of_a_mimic_style_report():
    s = parse_sections(MIMIC_STYLE)
    assert s["indication"].startswith("___ year old woman")
    assert s["comparison"] == "___"
    assert s["findings"].startswith("Compared to ___, the moderate right pleural effusion has increased.")
    assert s["impression"] == "1. Moderate right pleural effusion, increased. 2. Mild cardiomegaly."
    assert s["technique"] == "Chest PA and lateral"
    assert s["history"] == ""


@pytest.mark.parametrize("text,findings,impression", [
    ("findings: Small left effusion.\nimpression: Effusion.", "Small left effusion.", "Effusion."),
    ("   Findings :  Lungs clear.  \n\n   Impression:\n  Normal.", "Lungs clear.", "Normal."),
    ("IMPRESSION: No acute process.", "", "No acute process."),                       # FINDINGS missing
    ("FINDINGS: Mild edema.", "Mild edema.", ""),                                     # IMPRESSION missing
    ("FINDINGS AND IMPRESSION: Small left effusion.", "Small left effusion.", "Small left effusion."),
    ("FINDINGS: A. IMPRESSION: B.", "A.", "B."),                                      # flattened to one line
    ("CONCLUSION: Resolved pneumothorax.", "", "Resolved pneumothorax."),
    ("Small left effusion.", "Small left effusion.", ""),                             # no header at all
    ("FINDINGS:\nLUNGS: clear.\nHEART: normal.", "LUNGS: clear. HEART: normal.", ""),  # sub-labels stay inside
])
def test_section_variants(text, findings, impression):
    s = parse_sections(text)
    assert (s["findings"], s["impression"]) == (findings, impression)
    assert set(s) >= {"findings", "impression", "comparison", "indication", "history"}


def test_sections_reject_non_text():
    with pytest.raises(TypeError, match="report text"):
        parse_sections(None)


# (sentence, finding, status, side, severity): hand-written in the style of real radiology reports.
REAL_STYLE = [
    ("Small left pleural effusion is unchanged.", "Pleural Effusion", "present", "left", 1),
    ("No pneumothorax.", "Pneumothorax", "absent", "", 0),
    ("Cannot exclude early edema.", "Edema", "uncertain", "bilateral", 0),
    ("Mild cardiomegaly.", "Cardiomegaly", "present", "", 1),
    ("Bibasilar atelectasis.", "Atelectasis", "present", "bilateral", 0),
    ("Right apical pneumothorax has resolved.", "Pneumothorax", "absent", "right", 0),
    ("Large right pleural effusion.", "Pleural Effusion", "present", "right", 3),
    ("The heart is moderately enlarged.", "Cardiomegaly", "present", "", 2),
    ("Heart size is normal.", "Cardiomegaly", "absent", "", 0),
    ("Heart size is top-normal.", "Cardiomegaly", "uncertain", "", 0),
    ("Severe pulmonary edema.", "Edema", "present", "bilateral", 3),
    ("Small bilateral pleural effusions.", "Pleural Effusion", "present", "bilateral", 1),
    ("Moderate pleural effusions.", "Pleural Effusion", "present", "bilateral", 2),
    ("Trace left pleural effusion.", "Pleural Effusion", "present", "left", 1),
    ("Possible small right effusion.", "Pleural Effusion", "uncertain", "right", 1),
    ("Left basilar opacity, likely atelectasis.", "Atelectasis", "uncertain", "left", 0),
    ("Left basilar opacity may represent mild atelectasis.", "Atelectasis", "uncertain", "left", 1),
    ("Blunting of the right costophrenic angle may represent a small effusion.", "Pleural Effusion", "uncertain",
     "right", 1),
    ("A small right pneumothorax cannot be excluded.", "Pneumothorax", "uncertain", "right", 1),
    ("Interval resolution of the left pleural effusion.", "Pleural Effusion", "absent", "left", 0),
    ("Pleural effusion on the left.", "Pleural Effusion", "present", "left", 0),
    ("Mild to moderate pulmonary edema.", "Edema", "present", "bilateral", 2),
    ("Left and right pleural effusions, moderate to large.", "Pleural Effusion", "present", "bilateral", 3),
    ("Compared to ___, the left effusion has increased and is now moderate.", "Pleural Effusion", "present", "left", 2),
    ("No change in small left effusion.", "Pleural Effusion", "present", "left", 1),
    ("Plate-like atelectasis at the left base.", "Atelectasis", "present", "left", 1),
    ("Retrocardiac atelectasis.", "Atelectasis", "present", "left", 0),
    ("Mild pulmonary vascular congestion.", "Edema", "present", "bilateral", 1),
    ("No evidence of pulmonary edema.", "Edema", "absent", "", 0),
    ("Endotracheal tube terminates 4 cm above the carina.", "Support Devices", "present", "", 0),
    ("The nasogastric tube has been removed.", "Support Devices", "absent", "", 0),
    ("Lungs are clear without focal consolidation, pleural effusion or pneumothorax.", "Pneumothorax", "absent", "", 0),
    ("No pneumothorax or effusion, but mild bibasilar atelectasis is present.", "Atelectasis", "present",
     "bilateral", 1),
    ("Possible trace left effusion versus pleural thickening.", "Pleural Effusion", "uncertain", "left", 1),
    ("Mild pulmonary edema versus atypical infection.", "Edema", "uncertain", "bilateral", 1),
    ("Moderate-sized right pleural effusion.", "Pleural Effusion", "present", "right", 2),
    ("Small pericardial effusion.", "Pleural Effusion", None, None, None),   # not pleural: not a mention
]


@pytest.mark.parametrize("sentence,finding,status,side,severity", REAL_STYLE, ids=[r[0] for r in REAL_STYLE])
def test_real_style_sentences(sentence, finding, status, side, severity):
    got = extract_findings(sentence)
    if status is None:
        assert finding not in got
        return
    assert (got[finding]["status"], got[finding]["side"], got[finding]["severity"]) == (status, side, severity)


def test_negation_covers_a_list_but_stops_at_a_new_phrase():
    got = extract_findings("No pleural effusion, pneumothorax, or pulmonary edema.")
    assert {k: v["status"] for k, v in got.items()} == {"Pleural Effusion": "absent", "Pneumothorax": "absent",
                                                         "Edema": "absent"}
    got = extract_findings("No pneumothorax, small left effusion.")
    assert got["Pneumothorax"]["status"] == "absent"
    assert (got["Pleural Effusion"]["status"], got["Pleural Effusion"]["side"]) == ("present", "left")
    got = extract_findings("No pneumothorax, but there is a new right pleural effusion.")
    assert got["Pleural Effusion"]["status"] == "present" and got["Pleural Effusion"]["change"] == "new"


def test_sides_of_two_findings_in_one_sentence_do_not_mix():
    got = extract_findings("Small left effusion and large right pneumothorax.")
    assert (got["Pleural Effusion"]["side"], got["Pleural Effusion"]["severity"]) == ("left", 1)
    assert (got["Pneumothorax"]["side"], got["Pneumothorax"]["severity"]) == ("right", 3)


def test_positive_mention_wins_over_negative_across_sections():
    got = extract_findings("FINDINGS: Small left effusion.\nIMPRESSION: No acute process. No pneumothorax.")
    assert got["Pleural Effusion"]["status"] == "present"


def test_change_words():
    got = extract_findings("New left effusion and unchanged mild cardiomegaly. Edema has improved.")
    assert got["Pleural Effusion"]["change"] == "new"
    assert got["Cardiomegaly"]["change"] == "unchanged"
    assert got["Edema"]["change"] == "better"
    got = extract_findings("Small right pneumothorax is again seen, decreased in size.")
    assert (got["Pneumothorax"]["status"], got["Pneumothorax"]["change"]) == ("present", "better")
    got = extract_findings("Interval increase in bilateral pleural effusions. Persistent small left effusion.")
    assert got["Pleural Effusion"]["change"] == "worse"


def test_indication_is_not_read_as_a_finding():
    got = extract_findings(MIMIC_STYLE)
    assert got["Pneumothorax"]["status"] == "absent"  # "evaluate for pneumothorax" in INDICATION is ignored
    assert got["Pleural Effusion"] == {"status": "present", "side": "right", "severity": 2, "change": "worse"}
    assert got["Cardiomegaly"]["severity"] == 1
    assert got["Support Devices"]["status"] == "present"


def test_empty_report_has_no_findings():
    assert extract_findings("") == {}
    labels = chexpert_labels("")
    assert labels["No Finding"] == 1 and all(math.isnan(labels[k]) for k in CHEXPERT_LABELS if k != "No Finding")


def test_chexpert_labels_known_report():
    labels = chexpert_labels(MIMIC_STYLE)  # read from the IMPRESSION, as MIMIC-CXR's label files
    assert list(labels) == CHEXPERT_LABELS
    assert labels["Pleural Effusion"] == 1 and labels["Cardiomegaly"] == 1
    assert math.isnan(labels["Pneumothorax"]) and math.isnan(labels["Support Devices"])  # FINDINGS only
    assert math.isnan(labels["No Finding"]) and math.isnan(labels["Edema"])
    no_impression = MIMIC_STYLE.split(" IMPRESSION:")[0]
    labels = chexpert_labels(no_impression)  # falls back to FINDINGS
    assert labels["Pneumothorax"] == 0 and labels["Support Devices"] == 1 and labels["Pleural Effusion"] == 1


def test_chexpert_labels_uncertain_and_no_finding():
    labels = chexpert_labels("IMPRESSION: Possible left lower lobe pneumonia. No pneumothorax.")
    assert labels["Pneumonia"] == -1 and labels["Pneumothorax"] == 0 and math.isnan(labels["No Finding"])
    labels = chexpert_labels("IMPRESSION: No pleural effusion or pneumothorax. Heart size is normal. PICC in place.")
    assert labels["No Finding"] == 1 and labels["Support Devices"] == 1 and labels["Cardiomegaly"] == 0
