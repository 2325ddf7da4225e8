"""The extractor against the phantom's known truth: every report of a generated cohort.

The phantom writes MIMIC-style reports from its phrase table (bmjlib.phantom.reports) and knows the
disease state behind each one, so the extractor is checked exactly, not on a sample:
- chexpert_labels(report) equals mimic-cxr-2.0.0-chexpert.csv, label by label;
- extract_findings(report) gives every finding the truth has (severity > 0) with its severity and side,
  and none that the truth lacks;
- the offline synthesiser's change per finding (new / worse / better / resolved / unchanged) equals the
  change in the true disease state between consecutive studies, wherever the follow-up report states it.
"""
import math

import pandas as pd
import pytest

from bmjlib.phantom import cohort as phantom
from bmjlib.text.progression import changes, null_description
from bmjlib.text.reports import chexpert_labels, extract_findings
from bmjlib.schema import CHEXPERT_LABELS, FINDING_KEYS


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    phantom.write_cohort(out, n_patients=30, size=128, seed=0, workers=1)
    root = out / "mimic"
    labels = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv", dtype={"subject_id": str, "study_id": str})
    truth = pd.read_csv(out / "truth" / "images.csv", dtype={"subject_id": str, "study_id": str},
                        keep_default_na=False)
    reports = {r.study_id: (root / f"files/p{r.subject_id[:2]}/p{r.subject_id}/s{r.study_id}.txt").read_text()
               for r in labels.itertuples()}
    return labels, truth, reports


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) if isinstance(a, float) and math.isnan(a) else a == b


def test_labels_equal_the_labels_csv(cohort):
    labels, _, reports = cohort
    assert len(labels) > 50
    wrong = []
    for row in labels.to_dict("records"):
        got = chexpert_labels(reports[row["study_id"]])
        wrong += [(row["study_id"], k, row[k], got[k]) for k in CHEXPERT_LABELS if not _same(float(row[k]), got[k])]
    assert not wrong, f"{len(wrong)} labels differ, e.g. {wrong[:5]}"


def test_findings_equal_the_true_disease_state(cohort):
    _, truth, reports = cohort
    state = truth.drop_duplicates("study_id").set_index("study_id")
    wrong, positives = [], 0
    for sid, text in reports.items():
        got = extract_findings(text)
        for name, key in FINDING_KEYS.items():
            sev, side = int(state.loc[sid, f"{key}_sev"]), state.loc[sid, f"{key}_side"]
            e = got.get(name)
            if sev > 0:
                positives += 1
                want_side = "" if name == "Cardiomegaly" else side
                if not (e and e["status"] in ("present", "uncertain") and (e["severity"], e["side"]) == (sev, want_side)):
                    wrong.append((sid, name, sev, side, e))
            elif e and e["status"] != "absent":
                wrong.append((sid, name, sev, side, e))
    assert positives > 30
    assert not wrong, f"{len(wrong)} findings differ, e.g. {wrong[:3]}"


def test_synthesiser_changes_equal_the_true_progression(cohort):
    _, truth, reports = cohort
    t = truth.sort_values(["subject_id", "study_index"]).drop_duplicates("study_id")
    state = t.set_index("study_id")
    wrong, n = [], 0
    for _, g in t.groupby("subject_id"):
        ids = list(g.study_id)
        for a, b in zip(ids, ids[1:]):
            got = changes(reports[a], reports[b])
            stated = extract_findings(reports[b])
            for name, key in FINDING_KEYS.items():
                ps, pside = int(state.loc[a, f"{key}_sev"]), state.loc[a, f"{key}_side"]
                cs, cside = int(state.loc[b, f"{key}_sev"]), state.loc[b, f"{key}_side"]
                want = (None if ps == cs == 0 else "resolved" if cs == 0 else "new" if ps == 0 or pside != cside
                        else "worse" if cs > ps else "better" if cs < ps else "unchanged")
                if want is not None and name not in stated:
                    continue  # the follow-up report is silent about it: no text to read a change from
                n += 1
                if got.get(name) != want:
                    wrong.append((a, b, name, want, got.get(name)))
    assert n > 100
    assert not wrong, f"{len(wrong)} of {n} changes differ, e.g. {wrong[:3]}"


def test_stable_sentence_states_every_finding_of_the_prior_unchanged(cohort):
    """The "no change" sentence of a prior (stable triples in training, the null-edit probe) names each finding
    the prior has, with the prior's severity and side, as unchanged, and no change: the change words of a prior's
    own report ("New ...", "Worsening ...") compare it with an earlier study, not with itself."""
    _, truth, reports = cohort
    state = truth.drop_duplicates("study_id").set_index("study_id")
    wrong, comparative, checked = [], 0, 0
    for sid, text in reports.items():
        stated = {k: v for k, v in extract_findings(text).items() if k in FINDING_KEYS}
        comparative += any(v["change"] in ("new", "worse", "better") for v in stated.values())
        stable = null_description(text)
        same = changes(stable, stable)
        want = {name: "unchanged" for name, key in FINDING_KEYS.items()
                if int(state.loc[sid, f"{key}_sev"]) > 0 and name in stated}
        got = {k: v for k, v in changes(text, stable).items() if v != "resolved"}
        sentence = stable.lower()  # beyond three findings the rest are summarised
        named = set(got) == set(want) or (set(got) < set(want) and "other findings unchanged" in sentence)
        read = extract_findings(stable)
        for name in got:  # each named with the prior's true severity and side
            key, checked = FINDING_KEYS[name], checked + 1
            want_side = "" if name == "Cardiomegaly" else state.loc[sid, f"{key}_side"]
            if (read[name]["severity"], read[name]["side"]) != (int(state.loc[sid, f"{key}_sev"]), want_side):
                named = False
        if (set(same.values()) - {"unchanged"} or not named
                or any(w in sentence for w in ("new ", "worse", "increased", "decreased", "improv", "resolved"))):
            wrong.append((sid, text[:80], stable))
    assert comparative > 20 and checked > 50  # the cohort's reports do compare with earlier studies
    assert not wrong, f"{len(wrong)} stable sentences state a change, e.g. {wrong[:3]}"
