"""Notebook 10's pipeline on a real (tiny) phantom run folder: the true counterfactual scores well, copying
the prior reads "unchanged" everywhere, CTR from the phantom's true masks equals truth/images.csv, the
ICG-CXR export reads back, and a rerun is a no-op."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from bmjlib.data.registration import parse_affine
from bmjlib.icg import interpret as I
from bmjlib.icg.interpret_run import (TruthMasks, export_icg, interpretation_figure, run_interpretation,
                                    warp_masks)
from bmjlib.io import atomic_write_png, read_image, to_uint8

SEV = {1: "small", 2: "moderate", 3: "large"}
NAME = {"atelectasis": "atelectasis", "cardiomegaly": "cardiomegaly", "edema": "pulmonary edema",
        "effusion": "pleural effusion", "pneumothorax": "pneumothorax"}


def _describe(a, b) -> str:
    """A progression description written from the true states (what notebook 03 would say)."""
    out = []
    for k, name in NAME.items():
        s0, s1 = int(a[f"{k}_sev"]), int(b[f"{k}_sev"])
        side = "" if k in ("cardiomegaly", "edema") else f"{b[f'{k}_side'] or a[f'{k}_side']} "
        if s1 > s0:
            out.append(f"{'New' if s0 == 0 else 'Worsening'} {SEV[s1]} {side}{name}.")
        elif s1 < s0:
            out.append(f"The {side}{name} has {'resolved' if s1 == 0 else 'improved'}.")
    return " ".join(out) or "No interval change."


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from bmjlib.phantom.cohort import write_cohort

    root = tmp_path_factory.mktemp("run")
    write_cohort(root / "00_phantom", n_patients=36, size=128, seed=4, workers=1)
    truth = root / "00_phantom" / "truth"
    mimic = root / "00_phantom" / "mimic"
    images = pd.read_csv(truth / "images.csv", dtype={"dicom_id": str}, keep_default_na=False).set_index("dicom_id")
    pairs = pd.read_csv(truth / "pairs.csv", dtype=str)
    pairs = pairs[pairs["any_mislabeled"] == "False"].reset_index(drop=True)
    subjects = sorted(pairs["subject_id"].unique())
    test_subjects = set(subjects[::4])
    rows = []
    reg_dir = root / "02_registration" / "registered"
    for r in pairs.itertuples(index=False):
        a, b = images.loc[r.prior_dicom_id], images.loc[r.followup_dicom_id]
        prior = read_image(mimic / a["image_path"])
        fol = read_image(mimic / b["image_path"])
        # a perfect registration: the follow-up sampled at the true transform
        M = parse_affine(r.affine)
        yy, xx = np.mgrid[0:prior.shape[0], 0:prior.shape[1]].astype(float)
        reg = ndimage.map_coordinates(fol, [M[1, 0] * xx + M[1, 1] * yy + M[1, 2],
                                            M[0, 0] * xx + M[0, 1] * yy + M[0, 2]], order=1, mode="nearest")
        atomic_write_png(reg_dir / f"{r.pair_id}.png", to_uint8(reg))
        rows.append({"pair_id": r.pair_id, "subject_id": r.subject_id,
                     "split": "test" if r.subject_id in test_subjects else "train",
                     "prior_dicom_id": r.prior_dicom_id, "followup_dicom_id": r.followup_dicom_id,
                     "prior_study_id": r.prior_study_id, "followup_study_id": r.followup_study_id,
                     "prior_path": str(mimic / a["image_path"]), "followup_path": str(mimic / b["image_path"]),
                     "registered_path": str(reg_dir / f"{r.pair_id}.png"), "reg_score": 0.9,
                     "description": _describe(a, b), "sex": "F", "race": "WHITE", "age": 60})
    p = pd.DataFrame(rows)
    (root / "03_descriptions").mkdir()
    p.to_csv(root / "03_descriptions" / "pairs.csv", index=False)
    copy = root / "06_generate" / "copy_prior"
    for r in p[p.split == "test"].itertuples():
        atomic_write_png(copy / f"{r.pair_id}.png", to_uint8(read_image(r.prior_path)))
    return root


def test_ctr_from_true_masks_equals_truth_images_csv(run):
    truth = run / "00_phantom" / "truth"
    images = pd.read_csv(truth / "images.csv", dtype={"dicom_id": str})
    frontal = images[images["view_true"] == "PA"].head(25)
    masks = TruthMasks(truth)
    err = [abs(I.anatomy(masks(d))["ctr"] - c) for d, c in zip(frontal["dicom_id"], frontal["ctr"])]
    assert max(err) < 0.02, err


def test_true_counterfactual_masks_follow_the_affine(run):
    truth = run / "00_phantom" / "truth"
    pairs = pd.read_csv(truth / "pairs.csv", dtype=str).head(5)
    m = TruthMasks(truth)
    for r in pairs.itertuples():
        prior = m(r.prior_dicom_id)
        warped = warp_masks(m(r.followup_dicom_id), parse_affine(r.affine), prior["spine"].shape)
        inter = (prior["spine"] & warped["spine"]).sum() / max(1, (prior["spine"] | warped["spine"]).sum())
        assert inter > 0.8   # the spine does not change with disease: it must land on itself


def test_pipeline_on_a_phantom_run(run, tmp_path, monkeypatch):
    out = run / "10_icg"
    tables = run_interpretation(run, out, size=64, n_calibration=300)
    s = tables["summary"].set_index("model")
    print(s.round(3).to_string())
    assert {"reference", "true_counterfactual", "copy_prior"} <= set(s.index)
    # copying the prior: every finding unchanged, so nothing asked for is done and nothing spurious
    cp = tables["interpretations"].query("model == 'copy_prior'")
    assert (cp["direction"] == "unchanged").all()
    assert s.loc["copy_prior", "spurious_change_rate"] == 0.0
    # the true counterfactual does what its description asks far more often than copying the prior
    assert s.loc["true_counterfactual", "hypothesis_consistency"] > s.loc["copy_prior", "hypothesis_consistency"] + 0.2
    assert s.loc["true_counterfactual", "changed_f1"] > 0.5
    # rerun with the same inputs: read back, nothing recomputed (the CSV is not rewritten)
    mtime = (out / "summary.csv").stat().st_mtime_ns
    again = run_interpretation(run, out, size=64, n_calibration=300)
    assert (out / "summary.csv").stat().st_mtime_ns == mtime
    assert len(again["sentences"]) == len(tables["sentences"])
    # a change in the interpretation's code (its fingerprint) redoes it
    import bmjlib.icg.interpret_run as R
    real = R.code_fingerprint_of
    monkeypatch.setattr(R, "code_fingerprint_of", lambda *m: real(*m) + "-edited")
    run_interpretation(run, out, size=64, n_calibration=300)
    assert (out / "summary.csv").stat().st_mtime_ns != mtime
    # every registered triple exported with an interpretation, and read back unchanged
    written, check = export_icg(run, tmp_path / "icg", tables)
    assert check["read_back"] == check["written"] == len(written) > 0
    assert check["interpretations"] == check["written"] and all(check["identical_columns"].values())
    fig, path = interpretation_figure(run, tables, "true_counterfactual", tmp_path, size=64)
    assert path.exists() and path.with_suffix(".pdf").exists()


def test_unmeasurable_counterfactual_is_skipped_and_counted(run, tmp_path):
    from bmjlib.icg.interpret_run import collect_evidence, pair_table

    pairs = pair_table(run)
    test = pairs[pairs["split"] == "test"].head(3)

    class NoLungs:  # an anatomy judge that finds no lung (as on a broken generated image)
        def predict(self, images):
            return np.zeros((len(images), 6) + images.shape[1:], bool)

    evs, kept, skipped = collect_evidence(test, test["registered_path"].tolist(), {"anatomy": NoLungs()}, None, 64)
    assert evs == [] and len(skipped) == 3 and skipped["problem"].str.contains("lung is empty").all()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    evs, kept, skipped = collect_evidence(test, [str(broken)] * 3, None, TruthMasks(run / "00_phantom" / "truth"), 64)
    assert len(skipped) == 3 and skipped["path"].eq(str(broken)).all()


def _report_pairs(run):
    """The run's phantom pairs as notebook 01 builds them, with both reports' sections."""
    from bmjlib.data.cohort import build_cohort
    from bmjlib.data.sources import load_source

    return build_cohort(load_source("phantom", run / "00_phantom" / "mimic"), require_positive=False).pairs


def test_report_directions_known_sentences():
    from bmjlib.icg.interpret_run import report_directions

    pairs = pd.DataFrame([
        {"pair_id": "a", "prior_findings": "", "prior_impression": "Small left pleural effusion. No pneumothorax.",
         "followup_findings": "", "followup_impression": "Compared to ___, the left pleural effusion has increased. "
                                                         "No pneumothorax."},
        {"pair_id": "b", "prior_findings": "", "prior_impression": "Moderate right pneumothorax.",
         "followup_findings": "", "followup_impression": "No pneumothorax. New mild pulmonary edema."},
    ])
    d = report_directions(pairs).set_index(["pair_id", "finding"])
    assert tuple(d.loc[("a", "Pleural Effusion"), ["direction", "side"]]) == ("worse", "left")
    assert tuple(d.loc[("a", "Pneumothorax"), ["direction", "side"]]) == ("unchanged", "")
    assert tuple(d.loc[("b", "Pneumothorax"), ["direction", "side"]]) == ("resolved", "right")
    assert d.loc[("b", "Edema"), "direction"] == "new"
    # a finding the follow-up report does not mention is unknown, not "unchanged"
    assert ("a", "Edema") not in d.index and ("b", "Cardiomegaly") not in d.index


def test_report_directions_agree_with_the_phantom_truth(run):
    from bmjlib.icg.interpret_run import report_directions

    pairs = _report_pairs(run)
    images = pd.read_csv(run / "00_phantom" / "truth" / "images.csv", dtype={"dicom_id": str})
    said, true = report_directions(pairs), I.truth_directions(pairs, images)
    m = said.merge(true, on=["pair_id", "finding"], suffixes=("", "_true"))
    assert len(m) == len(said) > 0.5 * len(true)   # the reports speak about most (pair, finding) cells
    assert (m["direction"] == m["direction_true"]).mean() > 0.9
    changed = m[(m["direction"] != "unchanged") & (m["direction_true"] != "unchanged") & m["finding"].isin(I.LATERAL)]
    assert len(changed) > 10 and (changed["side"] == changed["side_true"]).mean() > 0.9


def test_pipeline_without_phantom_truth_calibrates_on_the_reports(run, tmp_path):
    """Real data (MIMIC-CXR, ICG-CXR) has no truth/images.csv: the known change comes from the two reports.
    Organ masks still come from truth/masks here, standing in for the anatomy judge."""
    import shutil

    real = tmp_path / "run"
    shutil.copytree(run / "00_phantom" / "truth" / "masks", real / "00_phantom" / "truth" / "masks")
    shutil.copytree(run / "06_generate", real / "06_generate")
    pairs = pd.read_csv(run / "03_descriptions" / "pairs.csv", dtype=str)
    reports = _report_pairs(run)[["pair_id", "prior_findings", "prior_impression", "followup_findings",
                                  "followup_impression"]]
    (real / "03_descriptions").mkdir()
    pairs.merge(reports, on="pair_id").to_csv(real / "03_descriptions" / "pairs.csv", index=False)
    tables = run_interpretation(real, real / "10_icg", size=64, n_calibration=300)
    assert tables["directions_from"] == "reports"
    s = tables["summary"].set_index("model")
    assert "true_counterfactual" not in s.index   # nothing to build it from without the phantom truth
    assert (tables["interpretations"].query("model == 'copy_prior'")["direction"] == "unchanged").all()
    # the registered follow-up is scored against what its reports say
    assert s.loc["reference", "changed_f1"] > 0.5


def test_calibration_without_any_image_of_a_known_change_is_an_error(run):
    from bmjlib.icg.interpret_run import TruthMasks, calibrate, pair_table

    pairs = pair_table(run).assign(registered_path="")
    with pytest.raises(ValueError, match="no train pair has a registered follow-up or a true counterfactual"):
        calibrate(pairs, None, None, TruthMasks(run / "00_phantom" / "truth"), 64, 50)
