"""ICG-CXR reader and writer: the real JSON format, -100 = missing, round trip on real images."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bmjlib.data.icg import read_icg, read_icg_records, write_icg
from bmjlib.io import read_image
from bmjlib.schema import CHEXPERT_LABELS, PAIR_COLUMNS, RECORD_COLUMNS, label_col

HANNOVER = Path(__file__).resolve().parent.parent.parent / "shared" / "real_cxr" / "hannover"
PLACEHOLDER = ("Due to the CheXpertPlus license, we are unable to redistribute the CXR data. Please see "
               "`process_chexpertplus.ipynb` for retrieving these data from the CheXpertPlus dataset.")


def _chexpertplus_json():
    """The published example pair of ICG-CXR's CheXpertPlus branch (process_chexpertplus.ipynb)."""
    missing = {lab: -100 for lab in CHEXPERT_LABELS}
    return {
        "changes-of-findings": "There is blunting of the left costophrenic angle, which was previously sharp, "
                               "indicating the presence of a trace pleural effusion.",
        "progression-description": "Mild pleural effusion has developed in the left lower lung.",
        "comment": {"confidence": 5, "reason": "Clear and consistent observations."},
        "reference-report": {"findings": PLACEHOLDER, "impression": PLACEHOLDER},
        "followup-report": {"findings": PLACEHOLDER, "impression": PLACEHOLDER},
        "time-interval": None, "view": "PA", "subject-id": "00012",
        "reference-study-id": "00002", "followup-study-id": "00003",
        "reference-dicom-id": "train/patient00012/study2/view1_frontal",
        "followup-dicom-id": "train/patient00012/study3/view1_frontal",
        "reference-study-order": 3, "followup-study-order": 5,
        "reference-study-index": 1, "followup-study-index": 2,
        "age": 61.0, "sex": "Female", "race": "Other", "split": "train", "reg_metric": 2165.8680753770136,
        "reference-diseases": {**missing, "No Finding": 1.0},
        "followup-diseases": {**missing, "No Finding": 0.0, "Pleural Effusion": 1.0, "Edema": -1.0},
    }


def _write_pair(root: Path, rel: str, meta: dict, images=True) -> Path:
    folder = root / rel
    folder.mkdir(parents=True)
    name = folder.name
    (folder / f"{name}.json").write_text(json.dumps(meta, indent=4))
    if images:
        shutil.copyfile(HANNOVER / "png" / "4d98e1de.png", folder / f"{name}-ref-reg.png")
        shutil.copyfile(HANNOVER / "png" / "80b5f00f.png", folder / f"{name}-flu-reg.png")
    return folder


def test_reads_the_published_chexpertplus_example(tmp_path):
    _write_pair(tmp_path, "chexpertplus/pa/1/train/p00012/i03s00002-i05s00003", _chexpertplus_json())
    rec, pairs = read_icg_records(tmp_path)
    assert list(rec.columns[:len(RECORD_COLUMNS)]) == RECORD_COLUMNS
    assert set(PAIR_COLUMNS) <= set(pairs.columns)
    p = pairs.iloc[0]
    assert p["pair_id"] == "00012_00002_00003" and p["split"] == "train"
    assert p["description"] == "Mild pleural effusion has developed in the left lower lung."
    assert p["changes_of_findings"].startswith("There is blunting of the left costophrenic angle")
    # ProgEmu's mean squares (lower is better) in its own column, never in the chain's correlation column
    assert p["reg_metric_progemu_mse"] == pytest.approx(2165.868075377) and math.isnan(p["reg_score"])
    # -100 is missing -> NaN; the given values stay (1, 0, -1)
    assert math.isnan(p[label_col("prior", "Edema")])
    assert p[label_col("prior", "No Finding")] == 1.0
    assert p[label_col("followup", "Pleural Effusion")] == 1.0 and p[label_col("followup", "Edema")] == -1.0
    assert p[label_col("followup", "No Finding")] == 0.0
    # the licence placeholder is not a report
    assert p["prior_findings"] == "" and p["followup_impression"] == ""
    assert pairs.attrs["placeholder_report_sections"] == 4
    assert p["credentialed"] and p["source"] == "icg" and p["icg_branch"] == "chexpertplus"
    assert Path(p["prior_path"]).name.endswith("-ref-reg.png") and p["registered_path"].endswith("-flu-reg.png")
    assert len(rec) == 2 and rec["credentialed"].all()
    # ICG-CXR gives study orders, not dates: the times stay unknown, the orders are kept
    assert rec["study_time"].isna().all() and (p["prior_study_order"], p["followup_study_order"]) == (3, 5)
    assert rec.loc[rec.study_id == "00003", "Pleural Effusion"].item() == 1.0


def test_label_list_form_and_mimic_partition(tmp_path):
    meta = _chexpertplus_json()
    meta["reference-diseases"] = [-100] * 13 + [1]
    meta["followup-diseases"] = [1] + [-100] * 13
    meta["reference-report"] = {"findings": "Clear lungs.", "impression": "No acute process."}
    _write_pair(tmp_path, "mimic_cxr/pa/1/p10/p10000032/i01s50414267-i02s53189527", meta)
    rec, pairs = read_icg_records(tmp_path)
    p = pairs.iloc[0]
    assert p[label_col("prior", "Support Devices")] == 1 and p[label_col("followup", "Atelectasis")] == 1
    assert p["prior_impression"] == "No acute process." and p["icg_branch"] == "mimic_cxr"
    assert set(rec["partition"]) == {"p10"}


def test_bad_folders_are_skipped_and_named(tmp_path):
    good = _chexpertplus_json()
    _write_pair(tmp_path, "chexpertplus/pa/1/train/p00012/i03s00002-i05s00003", good)
    no_key = dict(good)
    del no_key["followup-diseases"]
    _write_pair(tmp_path, "chexpertplus/pa/1/train/p00013/i01s00001-i02s00002", {**no_key, "subject-id": "00013"})
    _write_pair(tmp_path, "chexpertplus/pa/1/train/p00014/i01s00001-i02s00002",
                {**good, "subject-id": "00014"}, images=False)
    bad_lab = {**good, "subject-id": "00015", "followup-diseases": {"Edema": 7}}
    _write_pair(tmp_path, "chexpertplus/pa/1/train/p00015/i01s00001-i02s00002", bad_lab)
    broken = _write_pair(tmp_path, "chexpertplus/pa/1/train/p00016/i01s00001-i02s00002",
                         {**good, "subject-id": "00016"})
    (broken / "i01s00001-i02s00002.json").write_text("{not json")
    with pytest.warns(UserWarning, match="skipped 4 of 5"):
        rec, pairs, skipped = read_icg(tmp_path)
    assert list(pairs["subject_id"]) == ["00012"]
    problems = " | ".join(skipped["problem"])
    assert "followup-diseases" in problems and "image missing" in problems
    assert "Edema" in problems and "unreadable JSON" in problems


def test_corrupt_image_caught_when_checking(tmp_path):
    folder = _write_pair(tmp_path, "chexpertplus/pa/1/train/p00012/i03s00002-i05s00003", _chexpertplus_json())
    png = folder / "i03s00002-i05s00003-flu-reg.png"
    png.write_bytes(png.read_bytes()[:200])
    assert len(read_icg_records(tmp_path)[1]) == 1       # existence only: fast path
    with pytest.warns(UserWarning):
        _, pairs, skipped = read_icg(tmp_path, check_images=True)
    assert len(pairs) == 0 and "truncated" in skipped["problem"].item()


def _our_pairs(tmp_path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A notebook-03-shaped table over the real Hannover pairs (one registered image stored as JPEG)."""
    hp = pd.read_csv(HANNOVER / "pairs.csv")
    rows, recs = [], []
    rng = np.random.default_rng(0)
    from PIL import Image
    for i, r in hp.head(3).iterrows():
        subj = f"1{i:07d}"
        s_ref, s_flu = f"5{i:07d}", f"5{i + 1:07d}"
        reg = Path(HANNOVER / r["current_image"])
        if i == 1:  # a JPEG registered image exercises the decode path
            reg = tmp_path / "reg1.jpg"
            Image.open(HANNOVER / r["current_image"]).convert("L").save(reg, quality=95)
        row = {"pair_id": f"{subj}_{s_ref}_{s_flu}", "subject_id": subj, "split": ["train", "val", "test"][i],
               "prior_dicom_id": f"d{i}a", "followup_dicom_id": f"d{i}b",
               "prior_study_id": s_ref, "followup_study_id": s_flu,
               "prior_path": str(HANNOVER / r["prior_image"]), "followup_path": str(HANNOVER / r["current_image"]),
               "prior_findings": "Small right pleural effusion.", "prior_impression": "Small right effusion.",
               "followup_findings": "" if i == 2 else "Moderate right pleural effusion, increased.",
               "followup_impression": "Increased right effusion; no pneumothorax.",
               "age": [64.0, np.nan, 71.5][i], "sex": "M", "race": ["WHITE", "", "ASIAN"][i],
               "registered_path": str(reg), "reg_score": float(rng.uniform(0.5, 1)),
               "description": "Right pleural effusion has increased from small to moderate.",
               "instruction_impression": "Increased right effusion; no pneumothorax."}
        for j, lab in enumerate(CHEXPERT_LABELS):
            row[label_col("prior", lab)] = [1.0, 0.0, -1.0, np.nan][(i + j) % 4]
            row[label_col("followup", lab)] = [np.nan, 1.0, 0.0, -1.0][(i + j) % 4]
        rows.append(row)
        for role, st, d in (("prior", s_ref, r["prior_day"]), ("followup", s_flu, r["current_day"])):
            recs.append({"subject_id": subj, "study_id": st, "study_time": pd.Timestamp("2150-01-01")
                         + pd.Timedelta(days=int(d))})
    return pd.DataFrame(rows), pd.DataFrame(recs)


def test_round_trip_loses_nothing(tmp_path):
    ours, records = _our_pairs(tmp_path)
    interp = pd.DataFrame({"pair_id": ours["pair_id"],
                           "changes_of_findings": ["The right effusion is larger.", "No change.", ""]})
    out = write_icg(ours, tmp_path / "export", interpretations=interp, records=records, origin="phantom")
    assert len(out) == 3
    meta = json.loads(Path(out["json"][0]).read_text())
    for key in ("progression-description", "changes-of-findings", "reference-report", "followup-report",
                "reference-diseases", "followup-diseases", "view", "subject-id", "reference-study-order",
                "age", "sex", "race", "split", "reg_metric"):
        assert key in meta
    # a blank label is written as ICG's -100, a given one as its value
    assert meta["reference-diseases"]["Edema"] == -100 and meta["followup-diseases"]["Atelectasis"] == -100
    assert meta["reference-diseases"]["Atelectasis"] == 1.0 and meta["followup-diseases"]["Cardiomegaly"] == 1.0
    assert meta["time-interval"] == 2  # Hannover pair 0: days 1 -> 3
    rec, back, skipped = read_icg(tmp_path / "export", check_images=True)
    assert len(skipped) == 0 and len(back) == 3
    assert not back["credentialed"].any()          # phantom origin, declared by the writer
    back = back.set_index("pair_id").loc[ours["pair_id"]].reset_index()
    cols = [c for c in ours.columns if c not in ("prior_path", "followup_path", "registered_path")]
    for c in cols:
        a, b = ours[c].tolist(), back[c].tolist()
        if c.startswith(("prior_", "followup_")) and c.split("_", 1)[1] in CHEXPERT_LABELS or c in ("age", "reg_score"):
            np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), equal_nan=True, err_msg=c)
        else:
            assert a == b, c
    assert back["changes_of_findings"].tolist() == interp["changes_of_findings"].tolist()
    for i in range(3):  # pixels identical (PNG copied, JPEG decoded once and stored losslessly)
        np.testing.assert_array_equal(read_image(back["prior_path"][i]), read_image(ours["prior_path"][i]))
        np.testing.assert_array_equal(read_image(back["registered_path"][i]),
                                      read_image(ours["registered_path"][i]))
    # study times come back, so records order the journey as ours did
    t = rec.set_index(["subject_id", "study_id"])["study_time"]
    subj = ours["subject_id"][0]
    assert (t[(subj, ours["followup_study_id"][0])] - t[(subj, ours["prior_study_id"][0])]).days == 2
    # a second export over the first is identical (deterministic, rerunnable)
    first = Path(out["json"][0]).read_bytes()
    write_icg(ours, tmp_path / "export", interpretations=interp, records=records, origin="phantom")
    assert Path(out["json"][0]).read_bytes() == first


def test_mimic_origin_stays_credentialed(tmp_path):
    ours, records = _our_pairs(tmp_path)
    write_icg(ours.head(1), tmp_path / "export", records=records, origin="mimic")
    assert (tmp_path / "export" / "mimic_cxr").is_dir()
    _, back = read_icg_records(tmp_path / "export")
    assert back["credentialed"].all() and back["icg_branch"].item() == "mimic_cxr"


def test_writer_names_missing_columns(tmp_path):
    with pytest.raises(ValueError, match="registered_path"):
        write_icg(pd.DataFrame({"pair_id": ["a"], "subject_id": ["1"], "prior_study_id": ["2"],
                                "followup_study_id": ["3"], "prior_path": ["x"]}), tmp_path)


def test_credentialed_rows_are_never_exported_as_open_data(tmp_path):
    import pandas as pd

    from bmjlib.data.icg import write_icg
    rows = pd.DataFrame([{"pair_id": "1_2_3", "subject_id": "1", "prior_study_id": "2", "followup_study_id": "3",
                          "prior_path": "a.png", "registered_path": "b.png", "credentialed": True}])
    with pytest.raises(ValueError, match="origin 'phantom' would mark credentialed rows as open data"):
        write_icg(rows, tmp_path / "out", origin="phantom")
    assert not (tmp_path / "out").exists()
