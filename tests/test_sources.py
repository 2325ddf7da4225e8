"""Data sources (DESIGN "Data sources"): bring-your-own CSV on the real Hannover cohort (57 known pairs),
16-bit / RGB images normalised, bad rows skipped with the file named, ICG-CXR dispatch, MIMIC demographics."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bmjlib.data.cohort import build_cohort
from bmjlib.data.sources import SourceError, hannover_cohort_csv, load_source, read_csv_cohort
from test_cohort_fixture import make_mimic

HANNOVER = Path(__file__).resolve().parent.parent.parent / "shared" / "real_cxr" / "hannover"
needs_hannover = pytest.mark.skipif(not HANNOVER.exists(), reason="../shared/real_cxr/hannover not present")


@needs_hannover
def test_byo_csv_on_hannover_reproduces_its_57_pairs(tmp_path):
    data = load_source("csv", hannover_cohort_csv(HANNOVER, tmp_path / "cohort.csv"), verify_images=True)
    assert len(data.records) == 48 and data.problems.empty
    c = build_cohort(data, views=("PA", "AP"), require_positive=False)
    ref = pd.read_csv(HANNOVER / "pairs.csv")
    want = {(Path(a).stem, Path(b).stem) for a, b in zip(ref["prior_image"], ref["current_image"])}
    got = set(zip(c.candidates["prior_dicom_id"], c.candidates["followup_dicom_id"]))
    assert len(ref) == 57 and got == want
    # the paper's PA-only rule keeps the three patients' consecutive PA studies only
    pa = build_cohort(data, views=("PA",), require_positive=False)
    assert len(pa.candidates) == 3 and set(pa.candidates["subject_id"]) == {"177330aa", "6ac9bfff", "c62c878a"}


def test_byo_csv_normalises_16bit_and_rgb_and_skips_bad_rows(tmp_path):
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray((1000 + ramp * 59000).astype(np.uint16)).save(tmp_path / "a16.png")
    rgb = np.stack([(ramp * 255).astype(np.uint8)] * 3, -1)
    Image.fromarray(rgb).save(tmp_path / "b_rgb.png")
    (tmp_path / "c_trunc.png").write_bytes((tmp_path / "a16.png").read_bytes()[:300])
    pd.DataFrame({"patient_id": ["p1"] * 5, "path": ["a16.png", "b_rgb.png", "c_trunc.png", "gone.png", "a16.png"],
                  "day": ["0", "1", "2", "3", "x"], "view": ["pa"] * 5,
                  "report": ["FINDINGS: Small left effusion.\nIMPRESSION: Small left effusion.", "", "", "", ""]}
                 ).to_csv(tmp_path / "c.csv", index=False)
    data = load_source("csv", tmp_path / "c.csv", verify_images=True)
    assert data.records["dicom_id"].tolist() == ["a16", "b_rgb"]
    probs = dict(zip(data.problems["path"], data.problems["problem"]))
    assert set(probs) == {str(tmp_path / n) for n in ("c_trunc.png", "gone.png", "a16.png")}
    assert "does not exist" in probs[str(tmp_path / "gone.png")]
    assert "date or day" in probs[str(tmp_path / "a16.png")]
    assert data.records.loc[0, "impression"] == "Small left effusion."
    assert data.records["view"].tolist() == ["PA", "PA"]
    from bmjlib.io import read_image
    a, b = read_image(data.records.loc[0, "image_path"]), read_image(data.records.loc[1, "image_path"])
    # normalised by each image's own range, not clamped: both are the same full 0..1 ramp
    assert a.min() == 0 and a.max() == 1 and np.abs(a - ramp).max() < 1e-3 and np.abs(b - ramp).max() <= 1 / 255 + 1e-6


def test_byo_csv_missing_columns_are_named(tmp_path):
    pd.DataFrame({"patient": ["a"], "image": ["x.png"]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ValueError, match="date column"):
        read_csv_cohort(tmp_path / "c.csv")
    pd.DataFrame({"who": ["a"], "image": ["x.png"], "day": [0]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ValueError, match="no subject_id column"):
        read_csv_cohort(tmp_path / "d.csv")
    # with the column mapped, the one row's image is missing: nothing usable is left, and the error says so
    with pytest.raises(SourceError, match=r"d\.csv: no usable image left: all 1 rows were skipped .*x\.png: image file"):
        read_csv_cohort(tmp_path / "d.csv", columns={"subject_id": "who"})


def test_mimic_records_carry_time_labels_demographics(tmp_path):
    data = load_source("mimic", make_mimic(tmp_path))
    r = data.records.set_index("dicom_id")
    assert str(r.loc["d1c", "study_time"]) == "2150-03-01 10:15:00.500000"
    assert r.loc["d1a", "Edema"] == 1 and np.isnan(r.loc["d1a", "Cardiomegaly"])
    assert r.loc["d2a", "age"] == 51 + (2140 - 2149) and r.loc["d2a", "sex"] == "F" and r.loc["d2a", "race"] == "WHITE"
    assert r.loc["d1a", "impression"] == "Edema." and r.loc["d1a", "partition"] == "p10"


def test_missing_metadata_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv"):
        load_source("mimic", tmp_path)
    with pytest.raises(ValueError, match="unknown data source"):
        load_source("dicomweb", tmp_path)


def test_icg_source_dispatches_to_the_icg_reader_and_keeps_its_pairs(tmp_path, monkeypatch):
    seen = {}

    def fake(root, check_images=False):
        seen["root"], seen["check"] = root, check_images
        rec = pd.DataFrame({"subject_id": ["10000001", "10000001"], "study_id": ["1", "2"], "dicom_id": ["a", "b"],
                            "view": ["PA", "PA"], "partition": ["p10", "p10"], "Edema": [1.0, 0.0]})
        pairs = pd.DataFrame({"pair_id": ["10000001_1_2"], "subject_id": ["10000001"], "split": ["train"],
                              "prior_Edema": [1.0], "followup_Edema": [0.0],
                              **{f"{w}_{l}": [np.nan] for w in ("prior", "followup")
                                 for l in ("Atelectasis", "Cardiomegaly", "Consolidation",
                                           "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity",
                                           "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax")}})
        return rec, pairs, pd.DataFrame(columns=["path", "problem"])

    monkeypatch.setattr("bmjlib.data.sources.read_icg", fake)
    data = load_source("icg", tmp_path, verify_images=True)
    assert seen == {"root": tmp_path, "check": True}
    assert data.records["source"].eq("icg").all()
    c = build_cohort(data)
    assert c.pairs["pair_id"].tolist() == ["10000001_1_2"] and c.pairs["split"].tolist() == ["train"]
