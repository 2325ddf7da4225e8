"""Phantom radiology reports in MIMIC-CXR style, and the CheXpert labels they imply.

Part of the phantom cohort (DESIGN "The phantom cohort"); the reports play the role of MIMIC-CXR's
free-text reports that the paper turns into progression descriptions (arXiv 2310.10765 §3, Fig. 2).

Every sentence comes from the phrase table `PHRASES` below, so what a report can say is data, not code:
an extractor (bmjlib.text.reports) can be checked against it, and `parse_labels` here inverts it exactly.

Phrase table conventions (what an extractor must understand):

* Finding words: "pleural effusion(s)" / "effusion(s)"; "pneumothorax"; "cardiomegaly", "heart is
  <sev>ly enlarged", "enlargement of the cardiac silhouette" (present) and "heart size is normal",
  "heart is normal in size", "heart size is now normal" (absent); "pulmonary edema" / "interstitial
  edema" / "edema"; "atelectasis" (always this word for atelectasis).
* Severity words by grade: effusion and pneumothorax small / moderate / large; cardiomegaly, edema and
  atelectasis mild / moderate / severe (cardiomegaly 3 also "marked"; atelectasis 1 also "minimal" or
  "plate-like"); adverbs "mildly / moderately / severely / markedly" for the enlarged heart.
* Sides: "left", "right", "bilateral" (effusions), "bibasilar" (= bilateral atelectasis). Edema and
  cardiomegaly carry no side.
* Negation (-> 0): "no ...", "no X or Y" (both negated), "there is no ...", "without ...",
  "no evidence of ...", "... has resolved", "interval resolution of ...", "heart size is normal".
* Uncertainty (-> -1): "possible ...", "cannot be excluded", "cannot exclude ...", "may represent",
  "may reflect".
* Change words (follow-up studies): new, increased / worsened / worsening, decreased / improved /
  improving, unchanged / stable, resolved; a sentence with a change word and a severity states the
  CURRENT severity ("now moderate").
* Support devices are mentioned by name (endotracheal tube, central venous catheter, nasogastric tube,
  pacemaker); ECG electrodes are drawn but never reported and carry no label.
* "No acute cardiopulmonary process." alone means No Finding = 1.
* The INDICATION line may name a finding as a question ("r/o pneumothorax", "eval for effusion"); it
  carries no label (the CheXpert labeler, like MIMIC's, reads only IMPRESSION / FINDINGS).

Labels follow MIMIC-CXR's rule: they are read from the IMPRESSION section, or from FINDINGS when a
report has no impression. Mentions combine as in CheXpert: positive beats uncertain beats negative;
a label never mentioned is blank (NaN). No Finding is 1 when no label other than Support Devices is
1 or -1, else blank. Roughly 8 % of reports lack FINDINGS and 8 % lack IMPRESSION.
"""
from __future__ import annotations

import re
import textwrap

import numpy as np

from bmjlib.schema import CHEXPERT_LABELS

LABEL_OF = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "edema": "Edema",
            "effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax"}

SEV = {  # grade -> severity words (the first is the canonical one)
    "effusion": {1: ["small"], 2: ["moderate"], 3: ["large"]},
    "pneumothorax": {1: ["small"], 2: ["moderate"], 3: ["large"]},
    "cardiomegaly": {1: ["mild"], 2: ["moderate"], 3: ["severe", "marked"]},
    "edema": {1: ["mild"], 2: ["moderate"], 3: ["severe"]},
    "atelectasis": {1: ["mild", "minimal", "plate-like"], 2: ["moderate"], 3: ["severe"]},
}
ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely", "marked": "markedly"}

# (finding, status) -> templates. status: present | new | worse | better | stable | resolved | absent |
# uncertain. Fields: {sev} severity word, {adv} its adverb, {side} side word, {Side}/{Sev} capitalised.
PHRASES = {
    ("effusion", "present"): ["{Sev} {side} pleural effusion.", "There is a {sev} {side} pleural effusion.",
                              "{Sev} {side} effusion is present."],
    ("effusion", "new"): ["New {sev} {side} pleural effusion.", "There is a new {sev} {side} pleural effusion."],
    ("effusion", "worse"): ["The {side} pleural effusion has increased, now {sev}.",
                            "Increased {side} pleural effusion, now {sev}."],
    ("effusion", "better"): ["The {side} pleural effusion has decreased, now {sev}.",
                             "Decreased {side} pleural effusion, now {sev}."],
    ("effusion", "stable"): ["Unchanged {sev} {side} pleural effusion.", "Stable {sev} {side} pleural effusion."],
    ("effusion", "resolved"): ["The previously seen {side} pleural effusion has resolved.",
                               "Interval resolution of the {side} pleural effusion."],
    ("effusion", "absent"): ["No pleural effusion.", "There is no pleural effusion.", "No effusion."],
    ("effusion", "uncertain"): ["Possible {sev} {side} pleural effusion.",
                                "A {sev} {side} pleural effusion cannot be excluded.",
                                "Blunting of the {side} costophrenic angle may represent a {sev} pleural effusion."],
    ("pneumothorax", "present"): ["{Sev} {side} pneumothorax.", "There is a {sev} {side} apical pneumothorax."],
    ("pneumothorax", "new"): ["New {sev} {side} pneumothorax.", "There is a new {sev} {side} pneumothorax."],
    ("pneumothorax", "worse"): ["Increased {side} pneumothorax, now {sev}.",
                                "The {side} pneumothorax has increased, now {sev}."],
    ("pneumothorax", "better"): ["Decreased {side} pneumothorax, now {sev}.",
                                 "The {side} pneumothorax has decreased, now {sev}."],
    ("pneumothorax", "stable"): ["Unchanged {sev} {side} pneumothorax.", "Stable {sev} {side} pneumothorax."],
    ("pneumothorax", "resolved"): ["The {side} pneumothorax has resolved.",
                                   "Interval resolution of the {side} pneumothorax."],
    ("pneumothorax", "absent"): ["No pneumothorax.", "There is no pneumothorax."],
    ("pneumothorax", "uncertain"): ["Possible {sev} {side} apical pneumothorax.",
                                    "A {sev} {side} apical pneumothorax cannot be excluded."],
    ("cardiomegaly", "present"): ["{Sev} cardiomegaly.", "The heart is {adv} enlarged.",
                                  "{Sev} enlargement of the cardiac silhouette."],
    ("cardiomegaly", "new"): ["New {sev} cardiomegaly.", "The heart is now {adv} enlarged."],
    ("cardiomegaly", "worse"): ["Worsening cardiomegaly, now {sev}.", "Increased heart size, now {sev} cardiomegaly."],
    ("cardiomegaly", "better"): ["Decreased heart size, now {sev} cardiomegaly.", "Improved cardiomegaly, now {sev}."],
    ("cardiomegaly", "stable"): ["Stable {sev} cardiomegaly.", "Unchanged {sev} cardiomegaly."],
    ("cardiomegaly", "resolved"): ["Heart size is now normal."],
    ("cardiomegaly", "absent"): ["Heart size is normal.", "The heart is normal in size.", "No cardiomegaly."],
    ("cardiomegaly", "uncertain"): ["Possible {sev} cardiomegaly.", "Heart size may represent {sev} cardiomegaly."],
    ("edema", "present"): ["{Sev} pulmonary edema.", "Findings are consistent with {sev} pulmonary edema.",
                           "{Sev} interstitial edema."],
    ("edema", "new"): ["New {sev} pulmonary edema."],
    ("edema", "worse"): ["Worsening pulmonary edema, now {sev}.", "Increased pulmonary edema, now {sev}."],
    ("edema", "better"): ["Improving pulmonary edema, now {sev}.", "Decreased pulmonary edema, now {sev}."],
    ("edema", "stable"): ["Unchanged {sev} pulmonary edema.", "Stable {sev} pulmonary edema."],
    ("edema", "resolved"): ["Pulmonary edema has resolved.", "Interval resolution of pulmonary edema."],
    ("edema", "absent"): ["No pulmonary edema.", "There is no pulmonary edema.", "No evidence of pulmonary edema."],
    ("edema", "uncertain"): ["Possible {sev} pulmonary edema.", "Interstitial prominence may reflect {sev} edema."],
    ("atelectasis", "present"): ["{Sev} {side} atelectasis.", "There is {sev} {side} atelectasis."],
    ("atelectasis", "new"): ["New {sev} {side} atelectasis."],
    ("atelectasis", "worse"): ["Worsening {side} atelectasis, now {sev}.", "Increased {side} atelectasis, now {sev}."],
    ("atelectasis", "better"): ["Improving {side} atelectasis, now {sev}.", "Decreased {side} atelectasis, now {sev}."],
    ("atelectasis", "stable"): ["Unchanged {sev} {side} atelectasis.", "Stable {sev} {side} atelectasis."],
    ("atelectasis", "resolved"): ["The {side} atelectasis has resolved."],
    ("atelectasis", "absent"): ["No atelectasis."],
    ("atelectasis", "uncertain"): ["Possible {sev} {side} atelectasis.",
                                   "{Sev} {side} atelectasis cannot be excluded."],
}
SIDE_WORD = {  # finding -> side -> word
    "effusion": {"left": "left", "right": "right", "bilateral": "bilateral"},
    "pneumothorax": {"left": "left", "right": "right", "bilateral": "bilateral"},
    "atelectasis": {"left": "left basilar", "right": "right basilar", "bilateral": "bibasilar"},
}
DEVICE_PHRASES = {
    "ett": "Endotracheal tube terminates ___ cm above the carina.",
    "central_line": "Right internal jugular central venous catheter terminates in the mid SVC.",
    "ng_tube": "Nasogastric tube courses below the diaphragm, tip in the stomach.",
    "pacemaker": "Left chest wall pacemaker with lead in the right ventricle.",
}
COMBINED_NEGATIVE = "No pleural effusion or pneumothorax."  # negates both
FILLERS = [
    ("Consolidation", 0, "No focal consolidation."),
    ("Consolidation", 0, "There is no focal consolidation."),
    (None, None, "The mediastinal and hilar contours are unremarkable."),
    (None, None, "Osseous structures are grossly intact."),
    (None, None, "The visualized upper abdomen is unremarkable."),
]
NORMAL_IMPRESSION = ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality."]
INDICATIONS = ["shortness of breath", "dyspnea", "chest pain", "fever and cough", "hypoxia", "CHF",
               "recent line placement", "pre-operative evaluation", "hypotension", "tachypnea"]
QUESTIONS = ["", "", "eval for effusion", "eval for pneumonia", "assess for interval change", "r/o pneumothorax"]
COMPARISON_LEADS = ["Compared to ___, ", "As compared to the prior study, ", "Compared to the previous radiograph, "]
UNCERTAIN_RATE = 0.12  # a grade-1 finding is hedged this often


def _fill(tpl: str, key: str, sev: int, side: str, rng) -> str:
    sw = SEV[key][sev][int(rng.integers(len(SEV[key][sev])))] if sev else ""
    side_w = SIDE_WORD.get(key, {}).get(side, "")
    s = tpl.format(sev=sw, Sev=sw.capitalize(), adv=ADVERB.get(sw, sw), side=side_w,
                   Side=side_w.capitalize())
    return re.sub(r"\s+", " ", s).replace(" .", ".")


def _status(key, prior, cur, first):
    """How a finding is described given the prior and current (sev, side)."""
    (ps, pside), (cs, cside) = prior, cur
    if cs == 0:
        return "resolved" if (ps > 0 and not first) else "absent"
    if first or ps == 0 or pside != cside:
        return "present" if first else "new"
    return "worse" if cs > ps else "better" if cs < ps else "stable"


def compose_report(study: dict, prior: dict | None, rng) -> tuple[str, dict]:
    """One report. study/prior: {"state": {key: (sev, side)}, "devices": [...], "view": ..., "age": ..,
    "sex": ..}. Returns (text, labels: CheXpert label -> 1 | 0 | -1 | nan)."""
    first = prior is None
    findings, impression = [], []  # lists of (sentence, {label: value})
    positives = []
    for key in ("cardiomegaly", "effusion", "edema", "atelectasis", "pneumothorax"):
        cur = study["state"][key]
        prev = prior["state"][key] if prior else (0, "")
        status = _status(key, prev, cur, first)
        sev, side = cur
        label = LABEL_OF[key]
        if status == "absent":
            p_mention = {"effusion": 0.55, "pneumothorax": 0.6, "cardiomegaly": 0.55, "edema": 0.4,
                         "atelectasis": 0.08}[key]
            if rng.random() < p_mention:
                findings.append((_pick(PHRASES[(key, "absent")], rng), {label: 0}))
                if key in ("effusion", "pneumothorax") and rng.random() < 0.25:
                    impression.append((findings[-1][0], {label: 0}))
            continue
        if status == "resolved":
            pside = prev[1]
            s = _fill(_pick(PHRASES[(key, "resolved")], rng), key, 0, pside, rng)
            findings.append((s, {label: 0}))
            if rng.random() < 0.6:
                impression.append((s, {label: 0}))
            continue
        if sev == 1 and status in ("present", "new") and rng.random() < UNCERTAIN_RATE:
            status, value = "uncertain", -1
        else:
            value = 1
        s = _fill(_pick(PHRASES[(key, status)], rng), key, sev, side, rng)
        findings.append((s, {label: value}))
        impression.append((s, {label: value}))
        positives.append(key)
    # merge "No pleural effusion." + "No pneumothorax." into the classic combined negative, sometimes
    negs = [f for f in findings if f[0] in PHRASES[("effusion", "absent")] + PHRASES[("pneumothorax", "absent")]]
    if len(negs) == 2 and rng.random() < 0.5:
        at = findings.index(negs[0])
        for n in negs:
            findings.remove(n)
        findings.insert(at, (COMBINED_NEGATIVE, {"Pleural Effusion": 0, "Pneumothorax": 0}))
    for d in study["devices"]:
        if d in DEVICE_PHRASES:
            findings.insert(0, (DEVICE_PHRASES[d], {"Support Devices": 1}))
            if rng.random() < 0.5:
                impression.append((DEVICE_PHRASES[d], {"Support Devices": 1}))
    used = set()
    for label, val, text in FILLERS:  # at most one sentence per label
        if rng.random() < 0.3 and (label is None or label not in used):
            findings.append((text, {label: val} if label else {}))
            used.add(label)
    if not impression:
        impression.append((_pick(NORMAL_IMPRESSION, rng), {}))

    # comparison wording goes in front of the first sentence about a finding
    for part, p_lead in ((findings, 0.7), (impression, 0.5)):
        at = next((i for i, (_, lab) in enumerate(part) if set(lab) & set(LABEL_OF.values())), None)
        if not first and at is not None and rng.random() < p_lead:
            s0, l0 = part[at]
            part[at] = (_pick(COMPARISON_LEADS, rng) + s0[0].lower() + s0[1:], l0)

    r = rng.random()
    has_findings, has_impression = r >= 0.08, not (0.08 <= r < 0.16)
    labels_from = impression if has_impression else findings
    labels = _combine([lab for _, lab in labels_from])
    text = _layout(study, prior, findings if has_findings else None, impression if has_impression else None, rng)
    return text, labels


def _pick(options, rng):
    return options[int(rng.integers(len(options)))]


def _combine(mentions: list[dict]) -> dict:
    out = {k: np.nan for k in CHEXPERT_LABELS}
    for m in mentions:
        for k, v in m.items():
            old = out[k]
            if np.isnan(old) or v == 1 or (v == -1 and old == 0):
                out[k] = v
    if not any(out[k] in (1, -1) for k in CHEXPERT_LABELS if k not in ("No Finding", "Support Devices")):
        out["No Finding"] = 1
    return out


def _wrap(sentences) -> str:
    return "\n".join(textwrap.wrap(" ".join(s for s, _ in sentences), 76, initial_indent=" ",
                                   subsequent_indent=" "))


def _layout(study, prior, findings, impression, rng) -> str:
    view = study["view"]
    exam = {"PA": "CHEST (PA AND LAT)", "LATERAL": "CHEST (PA AND LAT)", "AP": "CHEST (PORTABLE AP)"}[view]
    tech = {"PA": "Chest PA and lateral", "LATERAL": "Chest PA and lateral", "AP": "Portable AP chest radiograph"}[view]
    who = "woman" if study["sex"] == "F" else "man"
    q = _pick(QUESTIONS, rng)
    q = f"  // {q}" if q else ""
    lines = ["                                 FINAL REPORT",
             f" EXAMINATION:  {exam}", " ",
             f" INDICATION:  ___ year old {who} with {_pick(INDICATIONS, rng)}.{q}", " ",
             f" TECHNIQUE:  {tech}", " ",
             f" COMPARISON:  {'None.' if prior is None else '___'}", " "]
    if findings is not None:
        lines += [" FINDINGS: ", " ", _wrap(findings), " "]
    if impression is not None:
        lines += [" IMPRESSION: ", " ", _wrap(impression), ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- inverse (for tests)

def parse_labels(text: str) -> dict:
    """Recover the CheXpert labels of a phantom report by matching the phrase table (MIMIC rule:
    IMPRESSION, else FINDINGS). Exact for phantom reports; not a general extractor (see bmjlib.text.reports)."""
    sec = re.split(r"\n ?(FINDINGS|IMPRESSION):\s*\n", text)
    parts = dict(zip(sec[1::2], sec[2::2]))
    body = parts.get("IMPRESSION", parts.get("FINDINGS", ""))
    body = " ".join(body.split())
    sentences = [s.strip() + "." for s in body.split(".") if s.strip()]
    mentions = []
    for s in sentences:
        low = s.lower()
        for pre in (c.lower() for c in COMPARISON_LEADS):
            if low.startswith(pre):
                s = s[len(pre)].upper() + s[len(pre) + 1:]
        if s == COMBINED_NEGATIVE:
            mentions.append({"Pleural Effusion": 0, "Pneumothorax": 0})
            continue
        for (key, status), tpls in PHRASES.items():
            if any(re.fullmatch(_full(t, key), s, re.I) for t in tpls):
                mentions.append({LABEL_OF[key]: {"absent": 0, "resolved": 0, "uncertain": -1}.get(status, 1)})
        for name, p in DEVICE_PHRASES.items():
            if s == p:
                mentions.append({"Support Devices": 1})
        for label, val, t in FILLERS:
            if s == t and label:
                mentions.append({label: val})
    return _combine(mentions)


def _full(tpl: str, key: str) -> str:
    sev_words = sorted({w for ws in SEV[key].values() for w in ws} |
                       {ADVERB.get(w, w) for ws in SEV[key].values() for w in ws}, key=len, reverse=True)
    side_words = sorted(SIDE_WORD.get(key, {}).values(), key=len, reverse=True)
    pat = re.escape(tpl)
    for f in ("sev", "Sev", "adv"):
        pat = pat.replace(re.escape("{" + f + "}"), "(?:" + "|".join(map(re.escape, sev_words)) + ")")
    for f in ("side", "Side"):
        alt = "(?:" + "|".join(map(re.escape, side_words)) + ")" if side_words else ""
        pat = pat.replace(re.escape("{" + f + "}"), alt)
    return pat.replace(r"\ ", r"\s+")
