"""On the phantom cohort the cohort step's counts equal what the generator made (paper §3 procedure),
computed here independently from the phantom's truth files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bmjlib.data.cohort import build_cohort, check_against_phantom, counts_table
from bmjlib.data.sources import load_source
from bmjlib.phantom import cohort as phantom_cohort


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    phantom_cohort.write_cohort(out, n_patients=30, size=128, seed=5, workers=1)
    return out


def test_counts_equal_the_generators_truth(phantom):
    data = load_source("phantom", phantom / "mimic", verify_images=True)
    c = build_cohort(data, seed=0, val_fraction=0.1)
    img = pd.read_csv(phantom / "truth" / "images.csv", dtype=str)
    assert data.problems.empty and len(data.records) == len(img)
    # consecutive studies of each patient whose image is recorded PA, ordered by study_index (truth time order)
    pa = img[img["view_recorded"] == "PA"].assign(k=lambda d: d["study_index"].astype(int)).sort_values(["subject_id", "k"])
    want = []
    for sid, g in pa.groupby("subject_id"):
        st = g["study_id"].tolist()
        want += [f"{sid}_{a}_{b}" for a, b in zip(st, st[1:])]
    assert sorted(c.candidates["pair_id"]) == sorted(want) and len(want) > 10
    counts = counts_table(c).set_index("item")["ours"]
    assert counts["PA images"] == len(pa)
    assert counts["candidate consecutive PA pairs"] == len(want)
    # positive filter vs the true disease state: every pair with a grade >= 2 finding kept, none without findings
    sevcols = [k for k in img.columns if k.endswith("_sev")]
    sev = img.groupby("study_id")[sevcols].max().astype(int).max(axis=1)
    worst = {p: max(sev[p.split("_")[1]], sev[p.split("_")[2]]) for p in want}
    kept = set(c.pairs["pair_id"])
    assert {p for p, w in worst.items() if w >= 2} <= kept
    assert all(worst[p] >= 1 for p in kept)
    # and exactly the pairs whose CheXpert labels (the generator's CSV, read here with plain pandas) have a positive
    lab = pd.read_csv(phantom / "mimic" / "mimic-cxr-2.0.0-chexpert.csv", dtype={"study_id": str}).set_index("study_id")
    pos = (lab.drop(columns=["subject_id", "No Finding", "Support Devices"]) == 1).any(axis=1)
    assert kept == {p for p in want if pos[p.split("_")[1]] or pos[p.split("_")[2]]}
    # p19 patients are the test split
    assert set(c.pairs.loc[c.pairs["subject_id"].str.startswith("19"), "split"]) <= {"test"}
    assert (c.pairs["split"] == "test").sum() == sum(p.startswith("19") for p in kept)
    assert check_against_phantom(c, phantom / "truth")["match"].all()
