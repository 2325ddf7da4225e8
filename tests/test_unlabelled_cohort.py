"""A cohort without labels and mostly bedside AP films (the real Hannover CSV cohort; paper §3, App. A.1 departures):
the positive-finding filter is not applicable and says so, `views` chooses the views kept and labels the counts,
0 pairs names the filter that removed them, and notebook 01 runs on it through papermill."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import papermill as pm
import pytest

from bmjlib.data.cohort import (CohortError, build_cohort, counts_table, parse_views, plot_demographics,
                                positive_filter_note, views_note)
from bmjlib.data.sources import hannover_cohort_csv, load_source
from test_cohort_fixture import make_mimic

ROOT = Path(__file__).resolve().parent.parent
HANNOVER = ROOT.parent / "shared" / "real_cxr" / "hannover"
pytestmark = pytest.mark.skipif(not HANNOVER.exists(), reason="../shared/real_cxr/hannover not present")


@pytest.fixture(scope="module")
def hannover(tmp_path_factory):
    return load_source("csv", hannover_cohort_csv(HANNOVER, tmp_path_factory.mktemp("h") / "cohort.csv"))


def _counts(c) -> dict:
    t = counts_table(c)
    return dict(zip(t["item"], t["ours"])), dict(zip(t["item"], t["paper (MIMIC-CXR)"]))


def test_filter_on_data_without_labels_is_skipped_said_and_counted(hannover):
    ref = pd.read_csv(HANNOVER / "pairs.csv")
    c = build_cohort(hannover, views="PA,AP", require_positive=True)      # as every profile has it
    assert c.positive_filter == "not applicable" and len(c.pairs) == len(ref) == 57
    note = positive_filter_note(c)
    assert note.startswith("require_positive: not applicable") and "57" in note
    ours, _ = _counts(c)
    assert ours["pairs kept (positive-finding filter not applicable: no CheXpert finding labels)"] == 57
    assert "pairs with >= 1 positive finding" not in ours
    off = build_cohort(hannover, views="PA,AP", require_positive=False)
    assert off.positive_filter == "off" and "pairs kept (positive-finding filter off: require_positive false)" in _counts(off)[0]


def test_views_setting_keeps_what_it_says_and_the_counts_name_it(hannover):
    pa = build_cohort(hannover)                                           # the paper's rule: PA only
    ours, paper = _counts(pa)
    assert ours["PA images"] == 7 and ours["candidate consecutive PA pairs"] == 3 == len(pa.pairs)
    assert paper["PA image-report pairs"] == 157148                       # the paper's number beside the same rule
    both = build_cohort(hannover, views="PA,AP")
    ours, paper = _counts(both)
    assert ours["PA+AP images"] == 48 and ours["candidate consecutive PA+AP pairs"] == 57
    assert pd.isna(paper["PA+AP image-report pairs"]) and "PA images" not in ours   # never "PA" for AP rows
    frontal = build_cohort(hannover, views="frontal")
    ours, _ = _counts(frontal)
    assert ours["frontal images"] == 48 and set(frontal.pairs["pair_id"]) == set(both.pairs["pair_id"])
    assert views_note(both).startswith("views: PA+AP: 48 of 48 images (views in the data: AP 41, PA 7)")
    assert parse_views(" pa , AP ") == ("PA", "AP")
    with pytest.raises(ValueError, match="views '': empty"):
        parse_views("")


def test_frontal_takes_mimic_view_variants_and_no_lateral(tmp_path):
    from bmjlib.data.cohort import view_mask

    v = pd.Series(["PA", "AP", "AP AXIAL", "PA LLD", "LATERAL", "LL", "", None, "APX"])
    assert view_mask(v, "frontal").tolist() == [True, True, True, True, False, False, False, False, False]
    assert view_mask(v, "PA,LL").tolist() == [True, False, False, False, False, True, False, False, False]


def test_zero_pairs_is_one_line_naming_the_filter(hannover, tmp_path):
    with pytest.raises(CohortError, match=r"0 pairs: none of the 48 images has view LATERAL .*the `views` setting "
                                          r"removed them"):
        build_cohort(hannover, views="LATERAL")
    root = make_mimic(tmp_path / "m")                                     # labelled, but no finding anywhere
    labels = root / "mimic-cxr-2.0.0-chexpert.csv"
    lab = pd.read_csv(labels)
    lab.loc[:, [c for c in lab.columns if c not in ("subject_id", "study_id")]] = 0.0
    lab.to_csv(labels, index=False)
    with pytest.raises(CohortError, match=r"the positive-finding filter removed them all \(require_positive: false"):
        build_cohort(load_source("mimic", root))
    c = build_cohort(hannover)
    empty = dataclasses.replace(c, pairs=c.pairs.head(0))
    with pytest.raises(CohortError, match="no pair to plot"):            # never a seaborn TypeError
        plot_demographics(empty, tmp_path / "fig")


def test_unknown_dates_stay_unknown_and_rows_without_a_date_are_named(tmp_path):
    img = HANNOVER / "png" / "4d98e1de.png"
    pd.DataFrame({"patient": ["a", "a", "a"], "image": [str(img), str(HANNOVER / "png" / "80b5f00f.png"),
                                                        str(HANNOVER / "png" / "cf35d0c4.png")],
                  "date": ["2020-03-01", "2020-03-04", ""], "view": ["AP"] * 3}).to_csv(tmp_path / "c.csv", index=False)
    data = load_source("csv", tmp_path / "c.csv")
    assert data.records["study_time"].notna().all() and len(data.records) == 2
    assert "no valid date" in data.problems["problem"].item()            # skipped and named, never given a date


def test_notebook_01_on_the_hannover_csv(hannover, tmp_path):
    csv = hannover_cohort_csv(HANNOVER, tmp_path / "cohort.csv")
    run = tmp_path / "run"
    out = tmp_path / "01.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "01_cohort.ipynb"), str(out), cwd=str(ROOT / "notebooks"),
                        parameters=dict(run_dir=str(run), source="csv", data_root=str(csv), views="PA,AP",
                                        verify_images=False), progress_bar=False, kernel_name="python3")
    text = out.read_text()
    assert "require_positive: not applicable" in text and "views: PA+AP: 48 of 48 images" in text
    counts = pd.read_csv(run / "figures" / "table_cohort_counts.csv")
    assert counts.set_index("item").loc["candidate consecutive PA+AP pairs", "ours"] == 57
    assert len(pd.read_csv(run / "01_cohort" / "pairs.csv")) == 57
    assert counts["item"].tolist()[4] == "PA+AP images"
