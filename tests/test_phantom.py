"""Phantom cohort: known answers from the simulator's own truth, layout, determinism."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bmjlib.phantom import cohort as phantom
from bmjlib.phantom.anatomy import render
from bmjlib.phantom.body import CTR_BY_GRADE, Exposure, Patient, Pose, State, image_ctr, pair_affine
from bmjlib.phantom.reports import parse_labels
from bmjlib.schema import CHEXPERT_LABELS, ORGANS
from bmjlib.text import reports

MIMIC_METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                          "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                          "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]


def _patients(n, seed=5):
    rng = np.random.default_rng(seed)
    return [phantom.sample_patient(rng, phantom.subject_id_for(i)) for i in range(n)]


def measured_ctr(masks):
    """Maximal transverse heart width / maximal internal thoracic width, in pixels, from the masks."""
    def width(m):
        rows = np.where(m.any(1))[0]
        return max(np.where(m[r])[0].max() - np.where(m[r])[0].min() + 1 for r in rows)
    lungs = masks["left_lung"] | masks["right_lung"]
    return width(masks["heart"]) / width(lungs)


@pytest.mark.parametrize("grade", [0, 1, 2, 3])
def test_ctr_measured_from_masks_matches_requested(grade):
    for i, p in enumerate(_patients(3, seed=grade)):
        st = State(sev={"cardiomegaly": grade})
        want = image_ctr(p, st, "PA")
        if grade:
            assert abs(want - CTR_BY_GRADE[grade]) <= 0.0151
        else:
            assert 0.42 <= want <= 0.49
        # CTR is defined on the unrotated patient; a rotated film changes the apparent ratio, as in reality
        for pose in (Pose(), Pose(tx=9.0, ty=-6.0, scale=0.94 + 0.05 * i, inspiration=0.8 * (-1) ** i)):
            _, masks = render(p, st, pose, Exposure(), size=256, masks=True)
            assert abs(measured_ctr(masks) - want) < 0.012, (grade, i, pose)


def test_effusion_area_and_density_grow_with_severity():
    p = _patients(1)[0]
    areas, means = [], []
    base, masks = render(p, State(), Pose(), Exposure(noise=0.0), size=256, masks=True)
    lower = masks["right_lung"].copy()
    lower[: int(256 * 0.5)] = False  # lower half of the right lung field
    for g in (0, 1, 2, 3):
        st = State(sev={"effusion": g}, side={"effusion": "right"})
        img, _, extra = render(p, st, Pose(), Exposure(noise=0.0), size=256, masks=True, extra=True)
        areas.append(int(extra["effusion"].sum()))
        means.append(float(img[lower].mean()))
        assert not extra["effusion"][:, 140:].any(), "a right effusion must stay in the right hemithorax"
    assert areas[0] == 0 and areas[1] < areas[2] < areas[3], areas
    assert means[0] < means[1] < means[2] < means[3], means  # fluid is whiter than aerated lung


def test_pneumothorax_is_lucent_without_markings():
    import dataclasses

    p = _patients(2)[1]
    q = dataclasses.replace(p, texture_seed=p.texture_seed + 1)  # same anatomy, other vessel pattern
    base = render(p, State(), Pose(), Exposure(noise=0.0), size=256).astype(float)
    areas = []
    for g in (1, 2, 3):
        st = State(sev={"pneumothorax": g}, side={"pneumothorax": "left"})
        img, masks, extra = render(p, st, Pose(), Exposure(noise=0.0), size=256, masks=True, extra=True)
        other = render(q, st, Pose(), Exposure(noise=0.0), size=256).astype(float)
        space = extra["pneumothorax"]
        areas.append(int(space.sum()))
        assert space[:, :128].sum() == 0, "a left pneumothorax lies on the image right"
        assert img[space].mean() < base[space].mean() - 5  # darker than the lung it replaced
        # vessel markings: a different vessel pattern changes the aerated lung but not the pleural space
        lung = masks["left_lung"] & ~space
        d = np.abs(img - other)
        assert d[space].mean() < 0.35 * d[lung].mean(), (d[space].mean(), d[lung].mean())
    assert areas[0] < areas[1] < areas[2]


def test_true_affine_maps_heart_centroid_prior_to_followup():
    p = _patients(1, seed=9)[0]
    st = State(sev={"cardiomegaly": 2, "effusion": 1}, side={"effusion": "left"})
    prior = Pose(tx=-7.0, ty=4.0, rot_deg=-5.0, scale=0.95, inspiration=0.2)
    follow = Pose(tx=10.0, ty=-8.0, rot_deg=6.0, scale=1.06, inspiration=0.2)
    _, m0 = render(p, st, prior, Exposure(), size=256, masks=True)
    _, m1 = render(p, st, follow, Exposure(), size=256, masks=True)
    a = pair_affine(prior, follow, 256)
    for organ in ("heart", "left_lung", "right_lung"):
        y0, x0 = np.argwhere(m0[organ]).mean(0)
        y1, x1 = np.argwhere(m1[organ]).mean(0)
        mx, my = a @ np.array([x0, y0, 1.0])
        assert abs(mx - x1) < 0.6 and abs(my - y1) < 0.6, (organ, mx - x1, my - y1)
    ident = pair_affine(prior, prior, 256)
    assert np.allclose(ident, [[1, 0, 0], [0, 1, 0]], atol=1e-9)


def test_render_rejects_bad_arguments():
    p = _patients(1)[0]
    with pytest.raises(ValueError, match="view"):
        render(p, State(), Pose(), Exposure(), view="OBLIQUE")
    with pytest.raises(ValueError, match="size"):
        render(p, State(), Pose(), Exposure(), size=8)
    with pytest.raises(ValueError, match="128-512"):
        phantom.write_cohort("/nonexistent/never", n_patients=2, size=100)


def test_mislabels_are_rare_and_the_only_pa_of_their_study():
    plans = [phantom.plan_patient(3, i, 128) for i in range(1500)]
    images = [(st, im) for pl in plans for st in pl["studies"] for im in st["images"]]
    bad = [(st, im) for st, im in images if im["mislabeled"]]
    assert 0.007 < len(bad) / len(images) < 0.025, len(bad) / len(images)
    for st, im in bad:
        assert im["view_recorded"] == "PA" and im["view_true"] in ("LATERAL", "AP")
        assert [i["view_recorded"] for i in st["images"]].count("PA") == 1
    n = [len(pl["studies"]) for pl in plans]
    assert min(n) == 2 and max(n) == 6
    rots = [abs(im["pose"].rot_deg) for _, im in images]
    assert max(rots) <= 7.0 and np.mean(rots) > 1.0
    parts = {str(pl["patient"].subject_id)[:2] for pl in plans}
    assert parts == {str(k) for k in range(10, 20)}
    ids = [pl["patient"].subject_id for pl in plans]
    assert len(set(ids)) == len(ids) and all(len(str(i)) == 8 for i in ids)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "a"
    summary = phantom.write_cohort(out, n_patients=8, size=128, seed=11, workers=1)
    return out, summary


def test_layout_and_columns(cohort):
    out, summary = cohort
    m = out / "mimic"
    meta = pd.read_csv(m / "mimic-cxr-2.0.0-metadata.csv", dtype=str)
    assert list(meta.columns) == MIMIC_METADATA_COLUMNS
    chex = pd.read_csv(m / "mimic-cxr-2.0.0-chexpert.csv")
    assert list(chex.columns) == ["subject_id", "study_id"] + CHEXPERT_LABELS
    vals = chex[CHEXPERT_LABELS].to_numpy(float).ravel()
    assert set(np.unique(vals[~np.isnan(vals)])) <= {1.0, 0.0, -1.0}
    split = pd.read_csv(m / "mimic-cxr-2.0.0-split.csv", dtype=str)
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert set(split.split) <= {"train", "validate", "test"}
    assert (split[split.subject_id.str[:2] == "19"].split == "test").all()
    pts = pd.read_csv(m / "patients.csv")
    assert {"subject_id", "gender", "anchor_age", "anchor_year"} <= set(pts.columns)
    assert "race" in pd.read_csv(m / "admissions.csv").columns
    for r in meta.itertuples():
        assert re.fullmatch(r"\d{8}", r.subject_id) and re.fullmatch(r"\d{8}", r.study_id)
        jpg = m / "files" / f"p{r.subject_id[:2]}" / f"p{r.subject_id}" / f"s{r.study_id}" / f"{r.dicom_id}.jpg"
        assert jpg.exists(), jpg
        assert jpg.parent.with_suffix(".txt").exists()
    assert len(meta) == summary["images"] and summary["pairs"] > 0
    # truth, beside the data
    t = out / "truth"
    imgs = pd.read_csv(t / "images.csv", keep_default_na=False)
    for col in ["dicom_id", "subject_id", "study_id", "study_index", "view_true", "view_recorded", "mislabeled",
                "tx", "ty", "rot_deg", "scale", "inspiration", "ctr", "devices"] + \
            [f"{k}_{f}" for k in phantom.KEYS for f in ("sev", "side")]:
        assert col in imgs.columns, col
    assert set(imgs.dicom_id) == set(meta.dicom_id)
    with np.load(t / "masks" / f"{imgs.dicom_id[0]}.npz") as z:
        assert sorted(z.files) == sorted(ORGANS)
        assert all(z[k].dtype == bool and z[k].shape == (128, 128) for k in ORGANS)
    pairs = pd.read_csv(t / "pairs.csv", dtype=str)
    for r in pairs.itertuples():
        assert r.pair_id == f"{r.subject_id}_{r.prior_study_id}_{r.followup_study_id}"
        assert len(r.affine.split()) == 6
        assert (t / r.counterfactual_path).exists()
        rec = meta.set_index("dicom_id").loc[[r.prior_dicom_id, r.followup_dicom_id], "ViewPosition"]
        assert (rec == "PA").all()
    assert not list(m.rglob("*.npz")) and not list(m.rglob("*.png"))


def test_labels_agree_with_reports_and_truth(cohort):
    out, _ = cohort
    m = out / "mimic"
    chex = pd.read_csv(m / "mimic-cxr-2.0.0-chexpert.csv")
    truth = pd.read_csv(out / "truth" / "images.csv", keep_default_na=False).groupby("study_id").first()
    for row in chex.to_dict("records"):
        sid, stid = str(row["subject_id"]), str(row["study_id"])
        text = (m / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{stid}.txt").read_text()
        parsed = parse_labels(text)
        for lab in CHEXPERT_LABELS:
            want, got = row[lab], parsed[lab]
            assert (np.isnan(want) and np.isnan(got)) or want == got, (stid, lab, want, got, text)
        for key, lab in (("cardiomegaly", "Cardiomegaly"), ("effusion", "Pleural Effusion"), ("edema", "Edema"),
                         ("atelectasis", "Atelectasis"), ("pneumothorax", "Pneumothorax")):
            sev = truth.loc[row["study_id"], f"{key}_sev"]
            v = parsed[lab]
            if v == 1:
                assert sev > 0
            elif v == 0:
                assert sev == 0
            elif v == -1:
                assert sev == 1


def test_report_extractor_recovers_the_csv_labels(cohort):
    """bmjlib.text.reports (the chain's rule-based extractor) reads the phantom's reports back to its CSV."""
    out, _ = cohort
    m = out / "mimic"
    chex = pd.read_csv(m / "mimic-cxr-2.0.0-chexpert.csv")
    for row in chex.to_dict("records"):
        sid, stid = str(row["subject_id"]), str(row["study_id"])
        text = (m / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{stid}.txt").read_text()
        got = reports.chexpert_labels(text)
        for lab in CHEXPERT_LABELS:
            want = row[lab]
            assert (np.isnan(want) and np.isnan(got[lab])) or want == got[lab], (stid, lab, want, got[lab], text)


def test_counterfactual_is_the_prior_when_nothing_changes(cohort):
    from PIL import Image

    out, _ = cohort
    t = out / "truth"
    imgs = pd.read_csv(t / "images.csv", keep_default_na=False).set_index("dicom_id")
    pairs = pd.read_csv(t / "pairs.csv", dtype=str)
    sev_cols = [f"{k}_sev" for k in phantom.KEYS]
    same = changed = 0
    for r in pairs.itertuples():
        a, b = imgs.loc[r.prior_dicom_id], imgs.loc[r.followup_dicom_id]
        cf = np.asarray(Image.open(t / r.counterfactual_path), dtype=float)
        prior = np.asarray(Image.open(out / "mimic" / a.image_path), dtype=float)
        diff = np.abs(cf - prior).mean()  # grey levels
        if (a[sev_cols].values == b[sev_cols].values).all():
            assert diff < 2.5, (r.pair_id, diff)  # same pixels up to JPEG loss: same noise realisation
            same += 1
        else:
            assert diff > 0.5, (r.pair_id, diff)  # the disease change is visible
            changed += 1
    assert same and changed


def test_deterministic_for_any_worker_count_and_rerun_is_noop(cohort, tmp_path, monkeypatch):
    out, _ = cohort
    other = tmp_path / "b"
    phantom.write_cohort(other, n_patients=8, size=128, seed=11, workers=2)

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    fa, fb = files(out), files(other)
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []
    again = phantom.write_cohort(other, n_patients=8, size=128, seed=11, workers=2)
    assert again["skipped"] is True
    # a changed simulator (its code, transitively) remakes every patient: the same code writes the same bytes
    built = []
    real_build, code = phantom.build_patient, phantom.code_fingerprint_of
    monkeypatch.setattr(phantom, "build_patient", lambda *a: built.append(a[2]) or real_build(*a))
    monkeypatch.setattr(phantom, "code_fingerprint_of", lambda *m: code(*m) + "-edited")
    edited = phantom.write_cohort(other, n_patients=8, size=128, seed=11, workers=1)
    assert edited["skipped"] is False and sorted(built) == list(range(8)) and edited["key"] != again["key"]
    keyed = {Path("summary.json"), Path("manifest.json")}  # and the shards: each records the key it was made under
    fe = files(other)
    assert fe.keys() == fb.keys()
    assert [k for k in fe if fe[k] != fb[k] and k not in keyed and ".shards" not in k.parts] == []
    third = phantom.write_cohort(tmp_path / "c", n_patients=8, size=128, seed=12, workers=1)
    assert third["key"] != again["key"]
    summary = json.loads((other / "summary.json").read_text())
    assert summary["images"] == again["images"]


def test_reports_look_like_mimic():
    plans = [phantom.plan_patient(4, i, 128) for i in range(300)]
    studies = [st for pl in plans for st in pl["studies"]]
    texts = [st["report"] for st in studies]
    no_find = np.mean(["FINDINGS:" not in t for t in texts])
    no_imp = np.mean(["IMPRESSION:" not in t for t in texts])
    assert 0.03 < no_find < 0.15 and 0.03 < no_imp < 0.15, (no_find, no_imp)
    assert not any("FINDINGS:" not in t and "IMPRESSION:" not in t for t in texts)
    assert all("___" in t and "FINAL REPORT" in t for t in texts)
    follow = [st["report"] for pl in plans for st in pl["studies"][1:]]
    assert np.mean([("compared to" in t.lower()) for t in follow]) > 0.5
    labels = pd.DataFrame([st["labels"] for st in studies])
    for lab in ("Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion", "Pneumothorax"):
        counts = labels[lab].value_counts(dropna=False)
        assert counts.get(1.0, 0) > 0 and counts.get(0.0, 0) > 0 and labels[lab].isna().any(), lab
    assert (labels[["Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion", "Pneumothorax"]] == -1).any().any()
    assert (labels["No Finding"] == 1).any() and (labels["Support Devices"] == 1).any()
    assert len(set(texts)) == len(texts)  # varied phrasing, no two reports identical


def test_render_variant_with_the_followups_state_is_the_true_counterfactual(cohort):
    """Drawing the prior again with the follow-up's disease gives the stored true counterfactual, byte for byte;
    a probe's change (a large left effusion) changes the image; bad names are refused."""
    from PIL import Image

    from bmjlib.phantom.cohort import render_variant

    out, _ = cohort
    t = out / "truth"
    imgs = pd.read_csv(t / "images.csv", keep_default_na=False).set_index("dicom_id")
    r = pd.read_csv(t / "pairs.csv", dtype=str).iloc[0]
    fu = imgs.loc[r.followup_dicom_id]
    state = {k: (int(fu[f"{k}_sev"]), fu[f"{k}_side"]) for k in phantom.KEYS}
    again = render_variant(out, r.prior_dicom_id, state)
    assert np.array_equal(again, np.asarray(Image.open(t / r.counterfactual_path)))
    pr = imgs.loc[r.prior_dicom_id]
    same = render_variant(out, r.prior_dicom_id, {})
    grade = int(pr["effusion_sev"])
    fluid = render_variant(out, r.prior_dicom_id, {"effusion": (3 if grade < 3 else 0, "left")})
    assert not np.array_equal(fluid, same)
    with pytest.raises(KeyError, match="no image 'nope'"):
        render_variant(out, "nope", {})
    with pytest.raises(ValueError, match="finding key 'fracture'"):
        render_variant(out, r.prior_dicom_id, {"fracture": (1, "")})
