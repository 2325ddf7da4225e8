"""Cohort building on a drawn MIMIC-layout fixture (paper §3, App. A.1): PA only, time order, consecutive
pairs, positive-finding filter, p19 = test, patient-level splits, counts, bad input skipped and counted."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bmjlib.data.cohort import (assign_splits, build_cohort, counts_table, plot_demographics, write_cohort,
                           write_data_manifest)
from bmjlib.data.sources import load_source
from test_cohort_fixture import make_mimic


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    return make_mimic(tmp_path_factory.mktemp("mimic"))


def test_pairs_are_consecutive_pa_studies_in_time_order(mimic):
    c = build_cohort(load_source("mimic", mimic), require_positive=False)
    # 10000001: study ids out of time order, two studies on one day ordered by StudyTime; the lateral is ignored.
    # 11000003: its second study is AP, so it has one PA study and no pair. 12000004: three PA studies -> 2 pairs.
    assert c.candidates["pair_id"].tolist() == [
        "10000001_53000003_51000001", "10000001_51000001_52000002", "10000002_50000010_50000011",
        "12000004_50000030_50000031", "12000004_50000031_50000032", "19000005_50000040_50000041"]
    assert set(c.candidates["prior_dicom_id"]) | set(c.candidates["followup_dicom_id"]) <= set(
        c.records.loc[c.records["view"] == "PA", "dicom_id"])
    first = c.candidates.iloc[0]
    assert first["prior_path"].endswith("files/p10/p10000001/s53000003/d1a.jpg")
    assert first["prior_Edema"] == 1 and first["followup_No Finding"] == 1
    assert first["followup_impression"].lower().startswith("no acute process")


def test_positive_finding_filter_drops_pairs_without_any_finding(mimic):
    c = build_cohort(load_source("mimic", mimic), require_positive=True)
    # 10000002: "No Finding" then only "Support Devices": neither counts as a finding.
    assert "10000002_50000010_50000011" not in set(c.pairs["pair_id"])
    assert len(c.pairs) == len(c.candidates) - 1


def test_p19_is_test_and_splits_are_by_patient(mimic):
    c = build_cohort(load_source("mimic", mimic), val_fraction=0.5, seed=3)
    assert set(c.pairs.loc[c.pairs["subject_id"] == "19000005", "split"]) == {"test"}
    assert (c.records.groupby("subject_id")["split"].nunique() == 1).all()
    assert set(c.records.loc[c.records["partition"] != "p19", "split"]) == {"train", "val"}
    assert (c.stage1["split"] != "test").all() and (c.stage1["view"] == "PA").all()


def test_split_is_seeded_and_proportional():
    n = 400
    rec = pd.DataFrame({"subject_id": [f"{10 + i % 10}{i:06d}" for i in range(n)]})
    rec["partition"] = "p" + rec["subject_id"].str[:2]
    s1, s2, s3 = (assign_splits(rec, seed=s, val_fraction=0.1) for s in (0, 0, 1))
    assert s1.equals(s2) and not s1.equals(s3)
    assert (s1[rec.loc[rec["partition"] == "p19", "subject_id"]] == "test").all()
    assert (s1 == "val").sum() == round(0.1 * (n - n // 10))
    # a source without MIMIC folders: a seeded test share of the patients
    rec["partition"] = ""
    s = assign_splits(rec, seed=0, val_fraction=0.1, test_fraction=0.2)
    assert (s == "test").sum() == 80 and (s == "val").sum() == 32


def test_bad_inputs_are_skipped_named_and_counted(tmp_path):
    root = make_mimic(tmp_path / "m")
    f = root / "files" / "p12" / "p12000004"
    (f / "s50000032" / "d4c.jpg").unlink()                                 # missing image
    (root / "files/p19/p19000005/s50000041.txt").unlink()                  # absent report
    jpg = f / "s50000031" / "d4b.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])                                # truncated JPEG
    from PIL import Image
    Image.new("L", (64, 64), 128).save(root / "files/p10/p10000002/s50000011/d2b.jpg")  # blank image
    data = load_source("mimic", root, verify_images=True)
    probs = dict(zip(data.problems["path"], data.problems["problem"]))
    assert len(probs) == 4
    assert "does not exist" in probs[str(f / "s50000032" / "d4c.jpg")]
    assert "report file absent" in probs[str(root / "files/p19/p19000005/s50000041.txt")]
    assert "truncated" in probs[str(jpg)] or "corrupt" in probs[str(jpg)]
    assert "blank" in probs[str(root / "files/p10/p10000002/s50000011/d2b.jpg")]
    c = build_cohort(data, require_positive=False)
    # the rest continues: subject 10000001's pairs are intact
    assert {"10000001_53000003_51000001", "10000001_51000001_52000002"} <= set(c.candidates["pair_id"])
    assert not any(p.startswith(("12000004", "19000005", "10000002")) for p in c.candidates["pair_id"])
    counts = counts_table(c).set_index("item")["ours"]
    assert counts["skipped inputs (unreadable / missing)"] == 4
    assert "skipped 4 images" in data.report()


def test_outputs_are_written_once_and_rerun_is_a_no_op(mimic, tmp_path):
    c = build_cohort(load_source("mimic", mimic))
    files = write_cohort(c, tmp_path / "01")
    pairs = pd.read_csv(files["pairs.csv"], dtype=str)
    assert pairs["pair_id"].tolist() == c.pairs["pair_id"].tolist()
    mt = {k: p.stat().st_mtime_ns for k, p in files.items()}
    write_cohort(build_cohort(load_source("mimic", mimic)), tmp_path / "01")
    assert {k: p.stat().st_mtime_ns for k, p in files.items()} == mt
    figs = plot_demographics(c, tmp_path / "fig")
    assert all(p.stat().st_size > 1000 for p in figs)
    man = write_data_manifest(c.pairs, c.records, tmp_path / "dm", "fixture", root=mimic)
    dm = pd.read_csv(man[0], dtype=str)
    assert dm["prior_path"].iloc[0].startswith("files/") and dm["prior_sha256"].str.len().eq(64).all()
    mt = [p.stat().st_mtime_ns for p in man]
    write_data_manifest(c.pairs, c.records, tmp_path / "dm", "fixture", root=mimic)
    assert [p.stat().st_mtime_ns for p in man] == mt


def test_pairs_carry_their_source_and_credentialed_flag(mimic, tmp_path):
    c = build_cohort(load_source("mimic", mimic), require_positive=False)
    assert set(c.pairs["source"]) == {"mimic"} and c.pairs["credentialed"].all()
    assert c.records["credentialed"].all()
    back = pd.read_csv(write_cohort(c, tmp_path / "01")["pairs.csv"])
    assert back["credentialed"].dtype == bool and back["credentialed"].all()
