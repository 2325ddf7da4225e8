"""Radiology reports: MIMIC-style sections, a rule-based finding extractor, CheXpert-style labelling
(BiomedJourney §3 "Data filtering" / "Text preprocessing", and the reference labels of §4.3).

The paper works from the reports' IMPRESSION sections (§3, "Text preprocessing"), keeps studies with a
CheXpert finding (§3, "Data filtering"), scores pathology against CheXpert labels of the reference
report (§4.3), and feeds two reports per pair to GPT-4 (Fig. 2). This module is the text side of those
steps, without a model:

- `parse_sections(text)`: FINDINGS, IMPRESSION, COMPARISON, INDICATION, HISTORY (plus any other
  upper-case header), tolerant of missing sections, case and spacing variants and `___` PHI placeholders.
- `extract_findings(text)`: for the paper's five findings and Support Devices, what the report says:
  status present / absent / uncertain, side (left, right, bilateral) and severity (1 small/mild,
  2 moderate, 3 large/severe; 0 = absent or not stated), plus the stated change (new, worse, better,
  unchanged) that the offline synthesiser uses.
- `chexpert_labels(text)`: the 14 CheXpert columns as 1 / 0 / -1 / NaN from the IMPRESSION (else the
  FINDINGS), as MIMIC-CXR's label files, with the CheXpert labeler's conventions (positive beats uncertain beats negative across mentions; No Finding = 1 only when no
  pathology is positive or uncertain; unmentioned = NaN).

The extractor follows the CheXpert labeler's three stages (mention -> negation -> uncertainty) with regular
expressions instead of a dependency parse: a negation or hedge cue applies to the first mention after it
in its clause and to every further mention of the same list, whatever nouns sit between them
("no consolidations, pneumoperitoneum, large effusions or definite pneumothorax are seen"). A list ends
at a verb or clause word (is, has, there, with, ...), at a new cue, at an item that opens with "the",
states its own predicate ("the heart is enlarged", "effusion has increased") or, after a comma or "and"
without "or"/"nor", opens with a severity or change word ("no pneumothorax, small left effusion").
"""
from __future__ import annotations

import math
import re
from functools import lru_cache

from bmjlib.schema import CHEXPERT_LABELS, FINDINGS

DEVICES = "Support Devices"
EXTRACTED = FINDINGS + [DEVICES]

# --------------------------------------------------------------------------- sections

# Header names seen in MIMIC-CXR reports, mapped to the section they fill.
_HEADER_ALIASES = {
    "findings": "findings", "finding": "findings", "findings and impression": "findings",
    "findings/impression": "findings", "impression": "impression", "impressions": "impression",
    "conclusion": "impression", "conclusions": "impression", "comparison": "comparison",
    "comparisons": "comparison", "indication": "indication", "indications": "indication",
    "reason for exam": "indication", "reason for examination": "indication", "history": "history",
    "clinical history": "history", "clinical information": "history", "technique": "technique",
    "examination": "examination", "exam": "examination", "wet read": "wet read", "addendum": "addendum",
    "notification": "notification", "recommendation": "recommendation", "recommendations": "recommendation",
    "procedure": "procedure", "final report": "final report",
}
SECTION_KEYS = ("findings", "impression", "comparison", "indication", "history")
# A header is a known name followed by a colon: at a line start in any case; inside a line (a report
# flattened to one line) in capitals only. Other "WORD:" labels (e.g. "LUNGS:") stay inside their
# section. The "FINAL REPORT" title line ends up in the "preamble".
_WS_RE = re.compile(r"\s+")
_MAX_HEADER_WORDS = max(len(k.split()) for k in _HEADER_ALIASES)
_LAST_WORDS = [re.compile(r"\S+(?:[ \t]+\S+){%d}[ \t]*\Z" % (k - 1)) for k in range(1, _MAX_HEADER_WORDS + 1)]


def _headers(text: str) -> list[tuple[int, int, str]]:
    """(start, end, name) of each section header, in order: the words before each colon are looked up
    in the known names (longest first), which is much cheaper than scanning for every name."""
    low = text.lower()
    if len(low) != len(text):  # a non-ASCII case mapping changed lengths: search the text itself
        low = text
    out = []
    pos = low.find(":")
    while pos != -1:
        line_start = low.rfind("\n", 0, pos) + 1
        seg_start = max(line_start, pos - 48)
        for k in range(_MAX_HEADER_WORDS, 0, -1):
            m = _LAST_WORDS[k - 1].search(low, seg_start, pos)
            if not m:
                continue
            raw = m.group(0).rstrip()
            name = " ".join(raw.split())
            start = m.start()
            if name not in _HEADER_ALIASES or (start and low[start - 1].isalnum()):
                continue
            if text[line_start:start].strip() and not text[start:start + len(raw)].isupper():
                continue  # inside a line only a capitalised name counts
            out.append((start, pos + 1, name))
            break
        pos = low.find(":", pos + 1)
    return out


def parse_sections(text: str) -> dict[str, str]:
    """Split a report into sections: a dict with lower-case keys, whitespace collapsed.

    The keys findings, impression, comparison, indication and history are always present ("" when the
    report lacks them); other known headers (technique, examination, ...) are added under their
    lower-case name. A combined "FINDINGS AND IMPRESSION:" fills both. Text before the first header is kept under
    "preamble"; a text with no header at all (a bare sentence) is taken as its findings.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_sections expects report text (str), got {type(text).__name__}")
    out = {k: "" for k in SECTION_KEYS}
    matches = _headers(text)
    if not matches:
        out["findings"] = _WS_RE.sub(" ", text).strip()
        return out
    pre = _WS_RE.sub(" ", text[:matches[0][0]]).strip()
    if pre:
        out["preamble"] = pre
    for (start, end, raw), nxt in zip(matches, matches[1:] + [(len(text), 0, "")]):
        body = _WS_RE.sub(" ", text[end:nxt[0]]).strip()
        key = _HEADER_ALIASES.get(raw, raw)
        keys = ("findings", "impression") if raw in ("findings and impression", "findings/impression") else (key,)
        for k in keys:
            out[k] = f"{out[k]} {body}".strip() if out.get(k) else body
    return out


def report_body(text: str) -> str:
    """The part of a report that states findings: FINDINGS + IMPRESSION (the CheXpert labeler reads the
    impression; MIMIC's labels fall back to findings). Indication and history are left out because they
    name findings that are asked about, not seen ("evaluate for pneumothorax")."""
    s = parse_sections(text)
    return f"{s['findings']}\n{s['impression']}".strip()


# --------------------------------------------------------------------------- mentions

# Mention patterns per label. Order matters only for overlapping text (longest alternatives first).
_ADV = r"(?:mildly|slightly|minimally|moderately|markedly|severely|massively|substantially|significantly)"
_SEV_ADV = rf"(?:{_ADV}\s+(?:to\s+{_ADV}\s+)?)?"
_HEART_IS = r"(?:heart|cardiac)(?:\s+size|\s+silhouette)?\s+(?:is\s+|remains\s+|appears\s+)?(?:now\s+)?"
_UPPER_NORMAL = r"(?:top|upper|high)[- ]normal|borderline|at\s+the\s+upper\s+limits?\s+of\s+normal"
_MENTIONS: dict[str, str] = {
    "CardioNormal": (
        r"(?:heart|cardiac)\s+(?:size|silhouette)\s+(?:is\s+|remains\s+|appears\s+)?(?:now\s+)?"
        r"(?:normal|within\s+normal\s+limits|not\s+(?:enlarged|large)\b)"
        r"|normal\s+(?:heart|cardiac)\s+(?:size|silhouette)"
        r"|heart\s+(?:is|remains|appears)\s+(?:now\s+)?(?:not\s+(?:enlarged|large)\b|(?:of\s+)?normal(?:\s+in)?(?:\s+size)?)"
        r"|cardiomediastinal\s+silhouette\s+(?:is\s+|remains\s+|appears\s+)?(?:normal|within\s+normal\s+limits|unremarkable)"
        r"|normal\s+cardiomediastinal\s+silhouette"),
    # A large heart, however phrased ("the cardiac silhouette is large", "enlarged heart"); an enlarged
    # CARDIOMEDIASTINAL silhouette may be mediastinal and counts as Enlarged Cardiomediastinum instead.
    "Cardiomegaly": (
        r"cardiomegaly|" + _HEART_IS + _SEV_ADV + r"(?:enlarged|large)\b"
        r"|(?:" + _SEV_ADV + r"(?:enlarged|large)|enlargement\s+of\s+the)\s+(?:heart|cardiac\s+silhouette)|cardiac\s+enlargement"
        r"|(?:(?:top|upper|high)[- ]normal|borderline)\s+(?:heart\s+size|cardiac\s+silhouette)"
        r"|" + _HEART_IS + r"(?:" + _UPPER_NORMAL + r")"),
    "Pleural Effusion": (
        r"(?<!pericardial\s)(?:pleural\s+)?effusions?|pleural\s+fluid"
        r"|blunting\s+of\s+(?:the\s+|both\s+)?(?:(?:left|right|bilateral)\s+)?costophrenic\s+angles?"),
    "Pneumothorax": r"pneumothora(?:x|ces)|\bptx\b",
    "Edema": (r"(?:pulmonary\s+|interstitial\s+|alveolar\s+)?edema|(?:pulmonary\s+)?vascular\s+congestion"
              r"|pulmonary\s+congestion|chf\b|heart\s+failure"),
    "Atelectasis": r"atelecta(?:sis|ses|tic)|(?:lobe|lobar)\s+collapse|collapse\s+of\s+the\s+\w+(?:\s+\w+)?\s+lobe",
    DEVICES: (
        r"(?:endotracheal|et|nasogastric|ng|orogastric|og|enteric|feeding|chest|tracheostomy|dobb?hoff)\s+tubes?"
        r"|(?:lines\s+and\s+tubes|tubes\s+and\s+lines)|tubes?\b"
        r"|(?:central\s+venous|internal\s+jugular|ij|subclavian|picc|midline|arterial|dialysis|swan[- ]ganz)\s+(?:lines?|catheters?)"
        r"|\bpicc\b|catheters?|pacemaker|pacer\b|\bicd\b|\baicd\b|defibrillator|(?:pacer|pacemaker|icd)?\s*leads?\b"
        r"|port-?a-?cath|mediport|sternotomy\s+wires|support\s+devices?|monitoring\s+devices?"),
    "Enlarged Cardiomediastinum": (
        r"(?:enlarged|widened)\s+(?:cardio)?mediastin(?:al\s+silhouette|um)|mediastinal\s+widening"
        r"|(?:cardio)?mediastinal\s+silhouette\s+(?:is\s+)?(?:enlarged|widened)"),
    "Consolidation": r"consolidat(?:ion|ions|ive|ed)",
    "Pneumonia": r"pneumonias?|infectious\s+process",
    "Lung Lesion": r"nodules?|nodular\s+opacit(?:y|ies)|(?:lung|pulmonary)\s+mass(?:es)?|\bmass(?:es)?\b|lesions?|neoplasm|carcinoma",
    "Lung Opacity": r"opacit(?:y|ies|ification)|infiltrates?|airspace\s+disease|air-space\s+disease",
    "Pleural Other": r"pleural\s+thickening|pleural\s+scarring|pleural\s+plaques?|fibrothorax|apical\s+cap",
    "Fracture": r"fractures?d?",
}
# A label's regex runs only when one of its trigger words occurs in the text (a plain substring test),
# which keeps the extractor fast enough for the synthesiser's >= 5,000 pairs/s.
_TRIGGERS = {
    "CardioNormal": ("normal", "not enlarged", "not large"),
    "Cardiomegaly": ("cardiomegaly", "large", "borderline", "top", "upper", "high"),
    "Pleural Effusion": ("effusion", "pleural fluid", "costophrenic"), "Pneumothorax": ("pneumothora", "ptx"),
    "Edema": ("edema", "congestion", "chf", "heart failure"), "Atelectasis": ("atelecta", "collapse"),
    DEVICES: ("tube", "line", "catheter", "picc", "pace", "icd", "defib", "lead", "port", "wire", "device"),
    "Enlarged Cardiomediastinum": ("mediastin",), "Consolidation": ("consolidat",),
    "Pneumonia": ("pneumonia", "infectious"), "Lung Lesion": ("nodul", "mass", "lesion", "neoplasm", "carcinoma"),
    "Lung Opacity": ("opacit", "infiltrat", "airspace", "air-space"),
    "Pleural Other": ("pleural", "plaque", "fibrothorax", "apical cap"), "Fracture": ("fractur",),
}
_LABEL_RES = [(k, _TRIGGERS[k], re.compile(rf"\b(?:{p})")) for k, p in _MENTIONS.items()]
_TRIGGER_LIST = [(t, i) for i, (_, ts, _) in enumerate(_LABEL_RES) for t in ts]


def _find_mentions(text: str) -> list[tuple[int, int, str]]:
    """(start, end, label) of every mention in lower-case `text`, left to right, overlaps resolved
    (earliest, then longest)."""
    hit = {i for t, i in _TRIGGER_LIST if t in text}
    found = []
    for order in hit:
        label, _, rx = _LABEL_RES[order]
        found.extend((m.start(), -m.end(), order, label) for m in rx.finditer(text))
    found.sort()
    out, end = [], -1
    for start, neg_end, _, label in found:
        if start >= end:
            out.append((start, -neg_end, label))
            end = -neg_end
    return out


_CLAUSE_RE = re.compile(r"(?<=[.!?])\s+|\n|;|\s+(?:but|however|although|though|whereas|except)\b[,]?\s*"
                        r"|,\s*(?:and\s+)?(?:there\s+(?:is|are|has\s+been)|which|with\s+the\s+exception)\b")
_PSEUDO_NEG = re.compile(
    r"\b(?:no|without)\s+(?:significant\s+|substantial\s+|definite\s+|appreciable\s+)?(?:interval\s+)?"
    r"(?:change|increase|decrease|worsening|improvement)\b(?:\s+(?:in|of))?|\bnot\s+(?:significantly\s+)?changed\b")
_UNC_PRE = re.compile(
    r"\b(?:possible|possibly|probable|probably|likely|may|might|could|questionable|question\s+of|suspicious"
    r"|suspected|suspect|suggest\w*|concerning|cannot\s+(?:be\s+)?(?:entirely\s+)?(?:exclude|excluded|rule\s+out)"
    r"|can\s*not\s+(?:be\s+)?(?:exclude|excluded|ruled\s+out)|can't\s+exclude|not\s+(?:be\s+)?excluded|differential"
    r"|versus|vs|equivocal|borderline|top[- ]normal|presumed|early|subtle|difficult\s+to\s+exclude)\b|\?")
_NEG_PRE = re.compile(
    r"\b(?:no|not|neither|without|negative\s+for|free\s+of|absence\s+of|resolution\s+of|resolved|removal\s+of"
    r"|interval\s+removal|clear\s+of|rule\s+out|ruled\s+out)\b")
_UNC_POST = re.compile(
    r"^[\s,]*(?:(?:is|are)\s+)?(?:cannot|can\s*not|can't)\s+(?:be\s+)?(?:entirely\s+)?(?:excluded|ruled\s+out)"
    r"|^[\s,]*(?:is|are)\s+(?:not\s+excluded|possible|suspected|questioned|likely|probable)|^[\s,]*(?:versus|vs)\b|^\s*\?")
_NEG_POST = re.compile(
    r"^[\s,]*(?:(?:has|have)\s+(?:since\s+)?(?:completely\s+|nearly\s+completely\s+)?(?:resolved|cleared|been\s+removed)"
    r"|(?:is|are|was|were)\s+(?:no\s+longer|not)\s+(?:clearly\s+)?(?:seen|visible|present|identified|evident|appreciated|visualized|demonstrated)"
    r"|(?:is|are)\s+(?:absent|resolved)|resolved|no\s+longer\s+(?:seen|visible|present)"
    r"|(?:(?:has|have)\s+been\s+|was\s+|were\s+)?(?:removed|withdrawn|discontinued))")
# List scope: a cue stays in force over the items of its list, whatever nouns sit between the mentions
# ("no consolidation, pneumoperitoneum, or pleural effusion"). These end the list: a verb or clause word
# in the gap; an item that opens with "the" ("no pneumothorax, and the tube ..."); a mention with its own
# predicate ("... and the heart is enlarged") or followed by one ("..., effusion has increased"); after a
# comma or "and", an item opening with a severity or change word ("no pneumothorax, small left effusion"),
# unless an "or"/"nor" still joins the list further on ("no edema, sizable effusion or pneumothorax"); a
# bare comma after the list's conjunction ("no pneumothorax or effusion, left lower lobe atelectasis"). A
# new cue in the gap ends it too and starts its own scope, except a finding named as what a negated one
# would suggest ("no consolidation to suggest pneumonia": both negated).
_LIST_END = re.compile(
    r"\b(?:is|are|was|were|be|been|being|has|have|had|seen|noted|present|identified|demonstrated|visualized"
    r"|appreciated|remains?|persists?|appears?|shows?|demonstrates?|measur\w*|represents?|reflects?|consistent"
    r"|compatible|there|which|with|but|however|although|though|whereas|while|yet|except|also|otherwise|now"
    r"|status|post|after|following|since|due|secondary)\b"
    r"|(?:^|,|\b(?:and|or|nor))\s*the\b")
_LIST_OR = re.compile(r"\b(?:or|nor)\b")
_LIST_CONJ = re.compile(r"\b(?:or|nor|and)\b")
_ITEM_SPLIT = re.compile(r",|\b(?:and|with)\b")
_STATEMENT = re.compile(r"\b(?:is|are|was|were|has|have|had|there|which|but|however|although|though|whereas|while|yet)\b")
_NEG_LINK = re.compile(r"^\s*(?:to\s+(?:suggest|indicate)|(?:concerning|suspicious|worrisome)\s+for|suggestive\s+of"
                       r"|diagnostic\s+of)(?:\s+(?:an?|any))?\s*$")
_LIST_END_OR_OR = re.compile(_LIST_END.pattern + r"|\b(?:or|nor)\b")
_ITEM_OPEN = re.compile(
    r"\b(?:small|mild|moderate|minimal|trace|tiny|slight|large|severe|marked|massive|extensive|substantial"
    r"|sizable|mildly|moderately|markedly|severely|new|newly|increas\w*|worse\w*|worsen\w*|enlarging"
    r"|decreas\w*|improv\w*|unchanged|stable|persistent|residual|redemonstrated)\b")
_OWN_PREDICATE = re.compile(r"\b(?:is|are|remains|appears)\b")
_PREDICATE_AFTER = re.compile(
    r"^\s*(?:(?:is|are|has|have)\s+(?:now\s+|again\s+|also\s+)?(?:been\s+)?(?:increas|decreas|worse|improv|larger"
    r"|smaller|unchanged|stable|persist|redemonstrat)|remains?\b|persists?\b|measures?\b)")

_LINK_RE = re.compile(r"\b(?:may|might|could|likely|probably)\s+(?:represent|reflect)s?\b|\b(?:consistent|compatible)\s+with\b"
                      r"|\b(?:likely|probably|possibly|suggesting|suggestive\s+of|concerning\s+for)\b")
# The lingula is in the left lung only, the middle lobe in the right only.
_SIDE_RE = re.compile(r"\b(?:(bilateral(?:ly)?|bibasilar|bibasal|both|biapical)|(left|lingula\w*|retrocardiac|lll|lul)"
                      r"|(right|middle[\s-]+lob(?:e|ar)|rll|rul|rml))\b")
_SIDE_POST = re.compile(r"^\s*(?:(?:is|are)\s+)?(?:(?:seen|present|noted)\s+)?(?:(?:at|on|in|within|along)\s+the\s+"
                        r"(?:(left|lingula)|(right|middle[\s-]+lobe))|(bilaterally)|(?:(left)|(right))\s+greater\s+than)")
_SEV_WORDS = re.compile(
    r"\b(?:small|mild|moderate|minimal|trace|tiny|slight|large|severe|marked|massive|extensive|substantial"
    r"|sizable|mildly|moderately|markedly|severely|massively|slightly|minimally|subsegmental|plate-?like"
    r"|linear|discoid|lobar)(?:[\s-]+to[\s-]+(?:small|mild|moderate|large|severe))?\b")
_SEV_MAP = {"small": 1, "mild": 1, "minimal": 1, "trace": 1, "tiny": 1, "slight": 1, "mildly": 1,
            "slightly": 1, "minimally": 1, "subsegmental": 1, "platelike": 1, "plate-like": 1, "linear": 1,
            "discoid": 1, "moderate": 2, "moderately": 2, "sizable": 2, "large": 3, "severe": 3, "marked": 3,
            "massive": 3, "extensive": 3, "substantial": 3, "markedly": 3, "severely": 3, "massively": 3,
            "lobar": 3}
_SEV_NAMES = r"(?:small|mild|moderate|large|severe|massive|marked|minimal|trace|tiny|plate-?like|subsegmental)(?:[\s-]+to[\s-]+(?:small|mild|moderate|large|severe))?"
_SEV_POST = re.compile(r"^\s*,\s*(" + _SEV_NAMES + r")\b|\b(?:is|are|remains?|appears?|now|measures?)\s+(?:now\s+|still\s+)?"
                       r"(" + _SEV_NAMES + r")\b")
_CHANGE_RE = re.compile(
    r"\b(?:(?P<new>new|newly|interval\s+development|developed|has\s+developed|appeared)"
    r"|(?P<worse>increas\w*|worse\w*|worsen\w*|enlarging|larger|progress\w*|more\s+(?:pronounced|prominent|extensive))"
    r"|(?P<better>decreas\w*|improv\w*|smaller|resolving|less\s+(?:pronounced|prominent|extensive)|diminish\w*|reduc\w*)"
    r"|(?P<unchanged>unchanged|stable|no\s+(?:significant\s+)?(?:interval\s+)?change|persist\w*|again\s+(?:seen|noted)"
    r"|similar|not\s+(?:significantly\s+)?changed|redemonstrated))\b")


def _change(words: str) -> str | None:
    """The first change word in `words`: new | worse | better | unchanged | None. A direction beats
    persistence ("again seen, decreased in size" -> better)."""
    found = None
    for m in _CHANGE_RE.finditer(words):
        if m.lastgroup != "unchanged":
            return m.lastgroup
        found = "unchanged"
    return found


def _severity(words: str) -> int:
    """Highest grade named in `words` ('mild to moderate' -> 2, 'small' -> 1); 0 when none."""
    best = 0
    for m in _SEV_WORDS.finditer(words):
        for w in re.split(r"[\s-]+to[\s-]+", m.group(0).lower()):
            best = max(best, _SEV_MAP.get(w.replace(" ", ""), 0))
    return best


def _side(words: str) -> str:
    found = set()
    for m in _SIDE_RE.finditer(words):
        found.add("bilateral" if m.group(1) else "left" if m.group(2) else "right")
    if "bilateral" in found or {"left", "right"} <= found:
        return "bilateral"
    return found.pop() if found else ""


def _tail(text: str, n_words: int) -> str:
    """The last n words of a gap (a modifier belongs to the nearest mention)."""
    parts = text.rsplit(None, n_words)
    return " ".join(parts[-n_words:]) if len(parts) > n_words else text


def _joins_list(gap: str, mention: str, post: str, rest: str, cue: str | None, closed: bool) -> bool:
    """Whether a mention continues the list of the mention before it (`gap` lies between them, `post`
    up to the next mention, `rest` to the end of the clause), so that the list's cue covers it too.
    `cue`: the list's cue; `closed`: the list already had its conjunction."""
    if _LIST_END.search(gap) or _OWN_PREDICATE.search(mention) or _PREDICATE_AFTER.match(post):
        return False
    if cue == "absent" and _NEG_LINK.match(gap):
        return True
    if _UNC_PRE.search(gap) or _NEG_PRE.search(gap):
        return False
    return _list_goes_on(gap, rest, closed)


def _list_goes_on(gap: str, rest: str, closed: bool) -> bool:
    """The list rules on commas and item openings (see _LIST_END) for text before a mention."""
    head, comma, last = gap.rpartition(",")
    if not (comma and (closed or _LIST_CONJ.search(head)) and not _LIST_CONJ.search(last)):
        items = _ITEM_SPLIT.split(gap)
        if len(items) == 1 or not _ITEM_OPEN.search(items[-1]) or _LIST_OR.search(gap):
            return True
    later = _LIST_END_OR_OR.search(rest)  # the list goes on to an "or" before anything ends it
    return later is not None and later.group(0) in ("or", "nor")


def _cue(region: str, rest: str) -> str | None:
    """The cue in force for a mention that `region` precedes: a hedge anywhere in it, else its last
    negation unless a statement or a new list item lies between that negation and the mention ("no acute
    osseous abnormality, mild cardiomegaly")."""
    if _UNC_PRE.search(region):
        return "uncertain"
    last = None
    for last in _NEG_PRE.finditer(region):
        pass
    if last is None:
        return None
    after = region[last.end():]
    return "absent" if not _STATEMENT.search(after) and _list_goes_on(after, rest, False) else None


def _clause_mentions(clause: str, ms: list[tuple[int, int, str]]):
    """(label, status, side, severity, change) for each mention (start, end, label) of one clause."""
    chain_cue = None
    closed = False
    chain: list[list] = []
    results: list[list] = []
    prev_end = 0
    for i, m in enumerate(ms):
        start, end, label = m
        gap = clause[prev_end:start]
        nxt = ms[i + 1][0] if i + 1 < len(ms) else len(clause)
        post = clause[end:nxt]
        mention = clause[start:end]
        continues = i > 0 and _joins_list(gap, mention, post, clause[end:], chain_cue, closed)
        closed = continues and (closed or _LIST_CONJ.search(gap) is not None)
        if not continues:
            if chain:
                results.extend(chain)
            chain = []
            region = _PSEUDO_NEG.sub(" ", gap if i > 0 else clause[:start])
            chain_cue = _cue(region, clause[end:])
            closed = _LIST_CONJ.search(region) is not None
        near = _tail(gap, 4)
        # "the cardiac silhouette is large" states the finding, not its grade
        sev = _severity(near + " " + (_LARGE_RE.sub(" ", mention) if label == "Cardiomegaly" else mention))
        if not sev:
            pm = _SEV_POST.search(post)
            sev = _severity(pm.group(0)) if pm else 0
        change = _change(near + " " + mention) or _change(post) or _change(clause)
        side = _side(near + " " + mention)
        if not side:
            sm = _SIDE_POST.match(post)
            if sm:
                side = "left" if (sm.group(1) or sm.group(4)) else "right" if (sm.group(2) or sm.group(5)) else "bilateral"
        if not side and i > 0 and _LINK_RE.search(gap) and results + chain:
            side = (chain or results)[-1][2]  # "left basilar opacity may represent atelectasis": same side
        if not side and mention.endswith(("effusions", "pneumothoraces")):
            side = "bilateral"
        status = chain_cue
        if label == "CardioNormal":
            label, status = "Cardiomegaly", status if status == "uncertain" else "absent"
        elif label == "Cardiomegaly" and _UPPER_NORMAL_RE.search(mention):
            status = "uncertain"
        if status is None:
            status = "uncertain" if _UNC_POST.match(post) else "absent" if _NEG_POST.match(post) else None
            if status is not None and chain:  # "effusion and pneumothorax have resolved": the whole list
                for r in chain:
                    if r[1] == "present":
                        r[1] = status
        prev = chain[-1] if chain else results[-1] if results else None
        if prev is not None and prev[0] == label and _LINK_RE.search(gap):
            # "blunting of the costophrenic angle may represent a small effusion": one finding, stated once
            (chain if chain else results).pop()
        chain.append([label, status or "present", side, sev, change])
        prev_end = end
    results.extend(chain)
    return results


_CLAUSE_SPLIT_PAREN = re.compile(r"[()]")
_LARGE_RE = re.compile(r"\blarge\b")
_UPPER_NORMAL_RE = re.compile(_UPPER_NORMAL)


@lru_cache(maxsize=1 << 16)
def _read_clause(clause: str) -> tuple:
    """Mentions of one lower-case clause. Memoised: report sentences repeat across a corpus ("No
    pneumothorax.", "Heart size is normal."), so most clauses are read once per run."""
    ms = _find_mentions(clause)
    return tuple(tuple(x) for x in _clause_mentions(clause, ms)) if ms else ()


@lru_cache(maxsize=1 << 14)
def _read(body: str) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for clause in _CLAUSE_RE.split(_CLAUSE_SPLIT_PAREN.sub(",", body.lower())):  # patterns are lower-case
        clause = clause.strip()
        if clause:
            for label, *rest in _read_clause(clause):
                out.setdefault(label, []).append(tuple(rest))
    return out


def clear_memo() -> None:
    """Forget memoised readings (for timing a cold start)."""
    _read.cache_clear()
    _read_clause.cache_clear()


_RANK = {"present": 2, "uncertain": 1, "absent": 0}
_DEFAULT_SIDE = {"Edema": "bilateral"}  # "pulmonary edema" unqualified is bilateral
_NO_SIDE = {"Cardiomegaly", DEVICES, "Enlarged Cardiomediastinum"}


def _merge(label: str, mentions: list[tuple]) -> dict:
    status = max((m[0] for m in mentions), key=_RANK.__getitem__)
    chosen = [m for m in mentions if m[0] == status]
    sides = {m[1] for m in chosen if m[1]}
    side = "bilateral" if "bilateral" in sides or {"left", "right"} <= sides else (sides.pop() if sides else "")
    if label in _NO_SIDE:
        side = ""
    elif not side and status != "absent":
        side = _DEFAULT_SIDE.get(label, "")
    sev = max(m[2] for m in chosen) if status != "absent" else 0
    change = next((m[3] for m in chosen if m[3]), None)
    return {"status": status, "side": side, "severity": sev, "change": change}


def extract_findings(text: str) -> dict[str, dict]:
    """What a report says about the five findings and Support Devices.

    Returns {finding: {"status": "present"|"absent"|"uncertain", "side": "left"|"right"|"bilateral"|"",
    "severity": 0-3, "change": "new"|"worse"|"better"|"unchanged"|None}} for each finding the report
    mentions (FINDINGS + IMPRESSION; a bare sentence is read as findings). Unmentioned findings are left
    out. severity is the highest grade stated (0 = absent or not stated); side "" = not stated
    (unqualified pulmonary edema reads as bilateral; cardiomegaly and devices have no side).
    """
    mentions = _read(report_body(text))
    return {k: _merge(k, mentions[k]) for k in EXTRACTED if k in mentions}


_STATUS_VALUE = {"present": 1.0, "uncertain": -1.0, "absent": 0.0}


def chexpert_labels(text: str) -> dict[str, float]:
    """The 14 CheXpert labels of a report: 1 positive, 0 negative, -1 uncertain, NaN unmentioned.

    No Finding is 1 when no label other than Support Devices is positive or uncertain, else NaN (as the
    CheXpert labeler). As MIMIC-CXR's label files, labels are read from the IMPRESSION, or from the
    FINDINGS when a report has no impression (a bare sentence counts as findings).
    """
    s = parse_sections(text)
    mentions = _read(s["impression"] or s["findings"])
    out = {k: math.nan for k in CHEXPERT_LABELS}
    for k, ms in mentions.items():
        out[k] = _STATUS_VALUE[_merge(k, ms)["status"]]
    pathological = [k for k in CHEXPERT_LABELS if k not in ("No Finding", DEVICES)]
    out["No Finding"] = math.nan if any(out[k] in (1.0, -1.0) for k in pathological) else 1.0
    return out


def labels_from_findings(found: dict[str, dict]) -> dict[str, float]:
    """CheXpert values of the extracted findings only: {finding: 1|0|-1|nan} for EXTRACTED."""
    return {k: _STATUS_VALUE[found[k]["status"]] if k in found else math.nan for k in EXTRACTED}
