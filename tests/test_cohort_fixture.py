"""A tiny MIMIC-CXR-JPG-layout cohort drawn from simple shapes with known poses (shared by the cohort,
source and registration tests), and a check that the layout it writes is the MIMIC one."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from bmjlib.schema import CHEXPERT_LABELS


def pose_matrix(tx=0.0, ty=0.0, rot_deg=0.0, scale=1.0, size=64) -> np.ndarray:
    """3x3 map canonical pixel -> image pixel: rotate/scale about the image centre, then shift."""
    c = (size - 1) / 2
    a = math.radians(rot_deg)
    R = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    M = np.eye(3)
    M[:2, :2] = R
    M[:2, 2] = np.array([c, c]) - R @ np.array([c, c]) + np.array([tx, ty])
    return M


def true_affine(prior_pose: np.ndarray, followup_pose: np.ndarray) -> np.ndarray:
    """prior pixel -> follow-up pixel (2x3), as the phantom truth states it."""
    return (followup_pose @ np.linalg.inv(prior_pose))[:2]


def draw_chest(size=64, pose=None, seed=0, lateral=False) -> np.ndarray:
    """A chest-like drawing in [0, 1]: body, two dark lungs, a bright heart and spine, smooth texture.
    `pose` (3x3 canonical -> image) moves the whole drawing; `lateral` draws a different (side) view."""
    pose = np.eye(3) if pose is None else pose
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    inv = np.linalg.inv(pose)
    u = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    v = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    x, y = u / size, v / size  # canonical, 0..1
    ell = lambda cx, cy, rx, ry: ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
    img = 0.15 + 0.0 * x
    if lateral:
        img = np.where(ell(0.5, 0.55, 0.3, 0.42), 0.7, img)
        img = np.where(ell(0.45, 0.5, 0.18, 0.3), 0.35, img)
        img = np.where(ell(0.62, 0.62, 0.12, 0.14), 0.85, img)
    else:
        img = np.where(ell(0.5, 0.55, 0.42, 0.45), 0.75, img)
        img = np.where(ell(0.32, 0.45, 0.12, 0.3), 0.3, img)
        img = np.where(ell(0.68, 0.45, 0.12, 0.3), 0.3, img)
        img = np.where(ell(0.56, 0.66, 0.13, 0.1), 0.9, img)
        img = np.where((np.abs(x - 0.5) < 0.03) & (y > 0.15) & (y < 0.95), 0.95, img)
    rng = np.random.default_rng(seed)
    # smooth texture tied to the anatomy (a function of canonical coordinates), so it moves with the pose
    k = rng.uniform(8, 20, size=(6, 2))
    ph = rng.uniform(0, 2 * np.pi, size=6)
    tex = sum(np.sin(2 * np.pi * (kx * x + ky * y) + p) for (kx, ky), p in zip(k, ph)) / 6
    return np.clip(img + 0.05 * tex, 0, 1).astype(np.float32)


def _save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255).round().astype(np.uint8)).save(path, quality=95)


# subject -> list of studies: (study_id, date, time, [(dicom_id, view)], positive labels or None = No Finding,
#                              shift (tx, ty))
SUBJECTS = {
    # study ids deliberately out of time order; a lateral in the second study; a same-day later study
    "10000001": [("53000003", 21500101, 93000.0, [("d1a", "PA")], ["Edema"], (0, 0)),
                 ("51000001", 21500301, 80000.0, [("d1b", "PA"), ("d1b_lat", "LATERAL")], None, (3, -2)),
                 ("52000002", 21500301, 101500.5, [("d1c", "PA")], ["Pleural Effusion"], (-2, 1))],
    "10000002": [("50000010", 21400101, 120000.0, [("d2a", "PA")], None, (0, 0)),
                 ("50000011", 21400501, 120000.0, [("d2b", "PA")], ["Support Devices"], (1, 1))],
    "11000003": [("50000020", 21300101, 120000.0, [("d3a", "PA")], ["Edema"], (0, 0)),
                 ("50000021", 21300201, 120000.0, [("d3b", "AP")], ["Edema"], (0, 0))],
    "12000004": [("50000030", 21300101, 120000.0, [("d4a", "PA")], ["Cardiomegaly"], (0, 0)),
                 ("50000031", 21300301, 120000.0, [("d4b", "PA")], ["Cardiomegaly"], (2, 2)),
                 ("50000032", 21300401, 120000.0, [("d4c", "PA")], ["Atelectasis"], (-1, 2))],
    "19000005": [("50000040", 21200101, 120000.0, [("d5a", "PA")], ["Pneumothorax"], (0, 0)),
                 ("50000041", 21200102, 120000.0, [("d5b", "PA")], ["Pneumothorax"], (2, 0))],
}
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with dyspnea.

 FINDINGS:

 {findings}

 IMPRESSION:

 {impression}
"""


def make_mimic(root: Path, size: int = 64) -> Path:
    """Write the fixture cohort in the MIMIC-CXR-JPG layout; returns root."""
    root = Path(root)
    meta, chex, pats, adms = [], [], [], []
    for k, (sid, studies) in enumerate(SUBJECTS.items()):
        pats.append({"subject_id": sid, "gender": "F" if k % 2 else "M", "anchor_age": 50 + k,
                     "anchor_year": 2150 - k, "anchor_year_group": "2008 - 2010", "dod": ""})
        adms.append({"subject_id": sid, "hadm_id": 1000 + k, "race": "WHITE" if k % 2 else "BLACK"})
        for st, date, tm, images, pos, (tx, ty) in studies:
            for dic, view in images:
                img = draw_chest(size, pose_matrix(tx, ty, size=size), seed=k, lateral=view == "LATERAL")
                _save(root / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{st}" / f"{dic}.jpg", img)
                meta.append({"dicom_id": dic, "subject_id": sid, "study_id": st,
                             "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                             "Rows": size, "Columns": size, "StudyDate": date, "StudyTime": tm,
                             "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                             "ViewCodeSequence_CodeMeaning": "postero-anterior",
                             "PatientOrientationCodeSequence_CodeMeaning": "Erect"})
            lab = {"subject_id": sid, "study_id": st, **{c: np.nan for c in CHEXPERT_LABELS}}
            if pos is None:
                lab["No Finding"] = 1.0
            else:
                for p in pos:
                    lab[p] = 1.0
            lab["Lung Opacity"] = 0.0
            chex.append(lab)
            words = ", ".join(pos) if pos else "no acute process"
            rep = REPORT.format(findings=f"Lungs show {words}.", impression=f"{words.capitalize()}.")
            (root / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{st}.txt").write_text(rep)
    pd.DataFrame(meta).to_csv(root / "mimic-cxr-2.0.0-metadata.csv", index=False)
    pd.DataFrame(chex).to_csv(root / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    pd.DataFrame(pats).to_csv(root / "patients.csv", index=False)
    pd.DataFrame(adms).to_csv(root / "admissions.csv", index=False)
    return root


def test_fixture_writes_the_mimic_layout(tmp_path):
    root = make_mimic(tmp_path)
    assert (root / "files/p10/p10000001/s51000001/d1b_lat.jpg").exists()
    assert (root / "files/p19/p19000005/s50000041.txt").read_text().count("IMPRESSION:") == 1
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv")
    assert len(meta) == sum(len(s[3]) for studies in SUBJECTS.values() for s in studies)
