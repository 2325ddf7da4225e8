"""Demo judges learn known, visible signals from a tiny run folder laid out like the phantom's; paper judges
read torchxrayvision weights from a folder and never download (bmjlib.evaluation.judges, bmjlib.evaluation.judges_xrv)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bmjlib.evaluation import judges as J
from bmjlib.schema import FINDING_KEYS, FINDINGS, ORGANS

# Each finding is a bright blob at its own place; the anatomy is six rectangles moved per patient.
BLOB = {"Atelectasis": (6, 6), "Cardiomegaly": (16, 16), "Edema": (6, 25), "Pleural Effusion": (25, 6),
        "Pneumothorax": (25, 25)}


def render(sev: dict, male: bool, age: float, shift: int, size: int = 32, rng=None):
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 0.1)
    img[size - 2:, 3:3 + int((age - 30) / 60 * (size - 6))] += 0.4  # "age": a bar whose length grows
    masks = {}
    for k, o in enumerate(ORGANS):
        m = np.zeros((size, size), bool)
        r0 = 2 + 5 * k + shift
        m[r0:r0 + 4, 3:29] = True
        masks[o] = m
        img[m] += 0.09 * (k + 1)
    if male:
        img[:, :3] += 0.25
    for f, (r, c) in BLOB.items():
        if sev.get(f, 0) > 0:
            img += (0.25 + 0.1 * sev[f]) * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 6.0)  # brighter when worse
    if rng is not None:
        img += rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1), masks


def make_fake_run(root: Path, n_patients: int = 60, studies: int = 2, size: int = 32, seed: int = 0) -> Path:
    """A run folder with 00_phantom/{mimic,truth} and 01_cohort/pairs.csv in the chain's layout."""
    rng = np.random.default_rng(seed)
    run = root / "run"
    truth = run / "00_phantom" / "truth"
    (truth / "masks").mkdir(parents=True)
    (truth / "counterfactual").mkdir(parents=True)
    rows, pats, pairs = [], [], []
    for p in range(n_patients):
        sid = f"{10000000 + p}"
        male, age = bool(rng.integers(0, 2)), float(rng.integers(30, 90))
        pats.append({"subject_id": sid, "sex": "M" if male else "F", "age": age, "race": ""})
        split = "test" if p % 5 == 0 else "val" if p % 5 == 1 else "train"
        shift = int(rng.integers(0, 2))
        prev = None
        for s in range(studies):
            study, dicom = f"{50000000 + p * 10 + s}", f"d{p:03d}_{s}"
            sev = {f: int(rng.integers(0, 2) * rng.integers(1, 4)) for f in FINDINGS}
            img, masks = render(sev, male, age, shift, size, rng)
            path = run / "00_phantom" / "mimic" / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{study}"
            path.mkdir(parents=True, exist_ok=True)
            Image.fromarray((img * 255).round().astype(np.uint8)).save(path / f"{dicom}.jpg", quality=98)
            np.savez(truth / "masks" / f"{dicom}.npz", **masks)
            rows.append({"dicom_id": dicom, "subject_id": sid, "study_id": study, "study_index": s,
                         "view_true": "PA", "path": str(path / f"{dicom}.jpg"),
                         **{f"{FINDING_KEYS[f]}_sev": sev[f] for f in FINDINGS}})
            if prev is not None:
                pid = f"{sid}_{prev[1]}_{study}"
                cf, _ = render(sev, male, age, shift, size)  # the prior patient with the follow-up's disease
                Image.fromarray((cf * 255).round().astype(np.uint8)).save(truth / "counterfactual" / f"{pid}.png")
                pairs.append({"pair_id": pid, "subject_id": sid, "split": split, "prior_dicom_id": prev[0],
                              "followup_dicom_id": dicom, "prior_study_id": prev[1], "followup_study_id": study,
                              "prior_path": prev[2], "followup_path": str(path / f"{dicom}.jpg"),
                              "age": age, "sex": "M" if male else "F", "race": "",
                              **{f"prior_{f}": float(prev[3][f] > 0) for f in FINDINGS},
                              **{f"followup_{f}": float(sev[f] > 0) for f in FINDINGS},
                              "counterfactual_path": f"counterfactual/{pid}.png",
                              "description": "; ".join(f"{'new' if sev[f] else 'resolved'} {f.lower()}"
                                                       for f in FINDINGS if bool(sev[f]) != bool(prev[3][f]))
                              or "no change",
                              "instruction_impression": ", ".join(f for f in FINDINGS if sev[f]) or "normal"})
            prev = (dicom, study, str(path / f"{dicom}.jpg"), sev)
    pd.DataFrame(rows).to_csv(truth / "images.csv", index=False)
    pd.DataFrame(pats).to_csv(truth / "patients.csv", index=False)
    pd.DataFrame(pairs).to_csv(truth / "pairs.csv", index=False)
    (run / "01_cohort").mkdir()
    pd.DataFrame(pairs).to_csv(run / "01_cohort" / "pairs.csv", index=False)
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = make_fake_run(tmp_path_factory.mktemp("judges"))
    judges = J.train_demo_judges(run, run / "07_evaluate" / "judges", size=32, epochs=40, width=8, seed=0)
    return run, judges


@pytest.mark.slow
def test_judges_learn_visible_signals_on_heldout_patients(trained):
    run, judges = trained
    ho = judges["finding"].heldout
    assert ho["n_heldout"] == 24 and ho["n_train"] == 72  # val patients held out, test patients unused
    assert ho["auroc_mean"] > 0.9, ho
    assert judges["sex"].heldout["auroc_sex"] > 0.9
    assert judges["age"].heldout["pearson_age"] > 0.7
    assert judges["age"].heldout["mae_age"] < 5, judges["age"].heldout  # in years, not only ranked (ages 30-89)
    # empty masks score 0 and all-ones masks ~0.18 (each organ covers ~10 % of the image)
    assert judges["anatomy"].heldout["dice_mean"] > 0.4
    table = pd.read_csv(run / "07_evaluate" / "judges" / "heldout.csv")
    # the grade is read, not only the presence: held-out grades (0-3) ranked with rho > 0.8 on every finding
    assert all(judges["severity"].heldout[f"rho_grade_{f}"] > 0.8 for f in FINDINGS), judges["severity"].heldout
    assert {"finding", "sex", "age", "anatomy", "severity"} == set(table["judge"])


@pytest.mark.slow
def test_judges_save_load_roundtrip_and_shapes(trained, tmp_path):
    run, judges = trained
    x = np.random.default_rng(0).random((3, 48, 48)).astype(np.float32)  # any size is resized
    loaded = J.load_judges(run / "07_evaluate" / "judges")
    for k in judges:
        a, b = judges[k].predict(x), loaded[k].predict(x)
        assert np.array_equal(a, b), k
    assert loaded["finding"].predict(x).shape == (3, 5)
    assert loaded["sex"].predict(x).shape == (3,) and loaded["age"].predict(x).shape == (3,)
    assert loaded["severity"].predict(x).shape == (3, 5)
    seg = loaded["anatomy"].predict(x)
    assert seg.shape == (3, len(ORGANS), 48, 48) and seg.dtype == bool
    assert loaded["finding"].heldout == judges["finding"].heldout


@pytest.mark.slow
def test_judges_rerun_is_reuse(trained, monkeypatch):
    run, judges = trained
    w = run / "07_evaluate" / "judges" / "finding" / J.WEIGHTS_FILE
    before = w.stat().st_mtime_ns
    J.train_demo_judges(run, run / "07_evaluate" / "judges", size=32, epochs=40, width=8, seed=0)
    assert w.stat().st_mtime_ns == before
    # the same data and settings but other judge code: trained again
    real = J.code_fingerprint_of
    monkeypatch.setattr(J, "code_fingerprint_of", lambda *m: real(*m) + "-edited")
    J.train_demo_judges(run, run / "07_evaluate" / "judges", size=32, epochs=40, width=8, seed=0)
    assert w.stat().st_mtime_ns != before


@pytest.mark.slow
def test_gradcam_points_at_the_finding(trained):
    _, judges = trained
    sev = {"Pleural Effusion": 3}
    img, _ = render(sev, False, 60, 0)
    cam = judges["finding"].attention(img[None], "Pleural Effusion")[0]
    assert cam.shape == img.shape and cam.max() == pytest.approx(1.0)
    yy, xx = np.mgrid[:32, :32]
    near = (yy - 25) ** 2 + (xx - 6) ** 2 <= 36  # the effusion blob's neighbourhood
    assert cam[near].mean() > cam.mean(), (cam[near].mean(), cam.mean())


def test_load_missing_judge_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="judge.json"):
        J.FindingJudge.load(tmp_path / "nowhere")
    J.SexJudge(16, 4).save(tmp_path / "s")
    with pytest.raises(ValueError, match="'sex' judge"):
        J.FindingJudge.load(tmp_path / "s")


def test_bad_input_shape_is_refused():
    with pytest.raises(ValueError, match="N,H,W"):
        J.FindingJudge(16, 4).predict(np.zeros((1, 1, 8, 8)))


# --------------------------------------------------------------------------- paper-scale (torchxrayvision)

@pytest.fixture
def no_network(monkeypatch):
    import torchxrayvision as xrv

    def boom(*a, **k):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(xrv.utils, "download", boom)
    monkeypatch.setattr("urllib.request.urlopen", boom)
    from bmjlib.evaluation import judges_xrv
    monkeypatch.setattr(judges_xrv, "XRV_CACHE", Path("/nonexistent/xrv_cache"))


def test_paper_judges_missing_weights_name_file_and_place(tmp_path, no_network):
    from bmjlib.evaluation import judges_xrv as X
    with pytest.raises(X.MissingWeights) as e:
        J.load_judges(tmp_path, scale="paper", weights_dir=tmp_path)
    msg = str(e.value)
    for kind, name in X.WEIGHT_FILES.items():
        assert name in msg and f"{kind} judge" in msg
    assert str(tmp_path) in msg and "never downloads" in msg


def test_paper_finding_and_race_judges_load_from_a_folder(tmp_path, no_network):
    import torchvision
    import torchxrayvision as xrv
    from bmjlib.evaluation import judges_xrv as X
    torch.manual_seed(0)
    torch.save(xrv.models.DenseNet(weights=None, num_classes=18), tmp_path / X.WEIGHT_FILES["finding"])
    race = torchvision.models.resnet34(weights=None)
    race.fc = torch.nn.Sequential(torch.nn.Linear(512, 3), torch.nn.LogSoftmax(dim=1))
    torch.save(torch.nn.DataParallel(race).state_dict(), tmp_path / X.WEIGHT_FILES["race"])
    judges = X.load_paper_judges(tmp_path, kinds=("finding", "race"))
    x = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32)
    f = judges["finding"].predict(x)
    assert f.shape == (2, 5) and ((f >= 0) & (f <= 1)).all()
    r = judges["race"].predict(x)
    assert r.shape == (2, 3) and np.allclose(r.sum(1), 1, atol=1e-5)
    t = X.xrv_input(np.array([[[0.0, 1.0]]]), 4)
    assert t.shape == (1, 1, 4, 4) and float(t.min()) >= -1024 and float(t.max()) <= 1024


def test_batchnorm_statistics_are_those_of_the_clean_training_images():
    """Trained on augmented batches (gain, bias, blur), a judge reads clean images: its BatchNorm running
    statistics are those of the clean training images (a regression judge read with the augmented batches'
    statistics was offset: the demo age judge read 24 years young)."""
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 32, 32)).astype(np.float32), rng.random((40, 1)).astype(np.float32)
    judge = J.AgeJudge(32, 4)
    J._fit(judge, x, y, torch.nn.SmoothL1Loss(), epochs=3, seed=0, batch=40)
    conv, bn = judge.net.blocks[0][0], judge.net.blocks[0][1]
    with torch.no_grad():
        h = conv(J.to_tensor(x, 32))
    assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert not judge.net.training
