"""The phantom cohort: simulated longitudinal chest X-ray journeys in the MIMIC-CXR-JPG v2 layout.

The embedded default data of the companion (DESIGN "The phantom cohort"). It stands in for the
paper's MIMIC-CXR patient journeys (arXiv 2310.10765 §3, App. A.1: PA images, consecutive study
pairs, reports, CheXpert labels, p19 = test) and adds the ground truth no real dataset has.

`write_cohort(out, n_patients, size, seed)` writes

    out/mimic/   files/p1X/pXXXXXXXX/sYYYYYYYY/<dicom_id>.jpg, files/p1X/pXXXXXXXX/sYYYYYYYY.txt,
                 mimic-cxr-2.0.0-{metadata,chexpert,split}.csv, patients.csv, admissions.csv
    out/truth/   images.csv, patients.csv, pairs.csv, masks/<dicom_id>.npz, counterfactual/<pair_id>.png

Each patient gets 2-6 studies; each finding evolves between studies (new / worse / better / resolved
/ stable), and pose (shift, rotation <= 7 deg, scale, inspiration) and exposure change every image.
Studies are "PA and lateral" (PA + LATERAL), "PA only", or "portable AP". About 1.5-2 % of images are
mislabelled: a study whose only image is a lateral (or an AP) recorded as PA, so that the cohort's
PA filter lets it through and the registration score has something to catch.

The renderer and the physical definition of each finding's grades are in `phantom.anatomy` (lateral
view in `phantom_lateral`); the report phrase table and label rule in `phantom_reports`.

Truth conventions: `ctr` is the ratio drawn in that image (AP views magnify the heart by 12 %; a
lateral carries the patient's frontal value). Masks are anatomical: a lung mask is the whole lung
field, including any part hidden by effusion, collapse or pneumothorax; a lateral's two lung masks are
the same projected lung. Pairs link consecutive studies through the first image RECORDED as PA; the
affine (prior pixel -> follow-up pixel, x = column) is the composition of the two poses, exact above
the diaphragm when inspiration is equal. The counterfactual keeps the prior's pose, exposure, detector
noise and devices and takes only the follow-up's disease state. Everything is a function of (seed, patient
index), so output is byte-identical for a seed whatever the number of workers.
"""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import json
import multiprocessing as mp
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from bmjlib.io import Manifest, atomic_write_csv, atomic_write_json, code_fingerprint_of, fingerprint
from bmjlib.phantom.anatomy import render
from bmjlib.phantom.body import DEVICES, Exposure, Patient, Pose, State, image_ctr, pair_affine
from bmjlib.phantom.reports import compose_report
from bmjlib.schema import CHEXPERT_LABELS, FINDING_KEYS

VERSION = "phantom-1"
KEYS = list(FINDING_KEYS.values())
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
CHEXPERT_COLUMNS = ["subject_id", "study_id"] + CHEXPERT_LABELS
SPLIT_COLUMNS = ["dicom_id", "study_id", "subject_id", "split"]
PATIENT_COLUMNS = ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"]
ADMISSION_COLUMNS = ["subject_id", "hadm_id", "admittime", "dischtime", "admission_type", "admission_location",
                     "discharge_location", "insurance", "language", "marital_status", "race"]
TRUTH_IMAGE_COLUMNS = (["dicom_id", "subject_id", "study_id", "study_index", "view_true", "view_recorded",
                        "mislabeled", "tx", "ty", "rot_deg", "scale", "inspiration", "exposure_k", "gamma",
                        "offset", "noise", "blur", "heel", "noise_seed"]
                       + [f"{k}_{f}" for k in KEYS for f in ("sev", "side")] + ["ctr", "devices", "image_path"])
PAIR_TRUTH_COLUMNS = ["pair_id", "subject_id", "prior_dicom_id", "followup_dicom_id", "prior_study_id",
                      "followup_study_id", "affine", "counterfactual_path", "any_mislabeled"]
VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}
RACES = ["WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO", "ASIAN", "OTHER"]
RACE_P = [0.62, 0.18, 0.08, 0.05, 0.07]

# Finding dynamics: prevalence at the first study, chance to appear, and (worse, better, resolve) when present.
FIRST_P = {"cardiomegaly": 0.25, "effusion": 0.22, "edema": 0.14, "atelectasis": 0.22, "pneumothorax": 0.07}
NEW_P = {"cardiomegaly": 0.04, "effusion": 0.14, "edema": 0.10, "atelectasis": 0.14, "pneumothorax": 0.05}
MOVE_P = {"cardiomegaly": (0.12, 0.06, 0.02), "effusion": (0.25, 0.25, 0.15), "edema": (0.22, 0.28, 0.2),
          "atelectasis": (0.2, 0.25, 0.2), "pneumothorax": (0.2, 0.3, 0.3)}


# --------------------------------------------------------------------------- sampling

def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *parts]))


def sample_patient(rng, subject_id: int) -> Patient:
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(np.clip(rng.normal(64, 16), 20, 91))
    old = np.clip((age - 45) / 45, 0, 1)
    return Patient(
        subject_id=subject_id, sex=sex, age=age, race=str(rng.choice(RACES, p=RACE_P)),
        tw=float(rng.normal(0.80 if sex == "M" else 0.76, 0.02)), apex=float(rng.normal(-0.78, 0.02)),
        dome=float(rng.normal(0.40, 0.025)), dome_lr=float(rng.uniform(0.02, 0.06)),
        cp_drop=float(rng.uniform(0.13, 0.18)), ctr0=float(rng.uniform(0.42, 0.49)),
        ctr_jit=float(rng.uniform(-0.015, 0.015)), heart_b=float(rng.normal(0.31, 0.012)),
        heart_shear=float(rng.uniform(0.35, 0.55)), mw=float(rng.normal(0.155, 0.012)),
        unfold=float(old * rng.uniform(0.5, 1.0)),
        bone=float(np.clip(1.1 - (age - 30) / 200 * (1.6 if sex == "F" else 1.0), 0.6, 1.15)),
        soft=float(rng.uniform(0.85, 1.15)), breast=float(rng.uniform(0.5, 1.2)) if sex == "F" else 0.0,
        rib_phase=float(rng.uniform(-0.3, 0.3)), clav=float(rng.normal(-0.60, 0.02)),
        texture_seed=int(rng.integers(1, 2 ** 31 - 1)))


def _side(rng, key):
    if key == "pneumothorax":
        return "left" if rng.random() < 0.5 else "right"
    r = rng.random()
    return "bilateral" if r < 0.35 else "left" if r < 0.67 else "right"


def evolve(rng, prev: dict | None) -> dict:
    """Next disease state {key: (sev, side)} from the previous one (None: the first study)."""
    out = {}
    for k in KEYS:
        ps, pside = prev[k] if prev else (0, "")
        if ps == 0:
            p = FIRST_P[k] if prev is None else NEW_P[k]
            out[k] = (int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2])), _side(rng, k)) if rng.random() < p else (0, "")
            if k == "cardiomegaly" and out[k][0]:
                out[k] = (out[k][0], "")
            if k == "edema" and out[k][0]:
                out[k] = (out[k][0], "bilateral")
            continue
        w, b, r = MOVE_P[k]
        x = rng.random()
        if x < r:
            out[k] = (0, "")
        elif x < r + w:
            out[k] = (min(3, ps + 1), pside)
        elif x < r + w + b:
            out[k] = (ps - 1, pside if ps > 1 else "")
        else:
            out[k] = (ps, pside)
    # congestive heart failure: edema brings effusions along
    if out["edema"][0] >= 2 and out["effusion"][0] == 0 and rng.random() < 0.5:
        out["effusion"] = (1, "bilateral")
    return out


def sample_pose(rng, size: int, view: str) -> Pose:
    return Pose(tx=float(np.clip(rng.normal(0, 0.03), -0.07, 0.07) * size),
                ty=float(np.clip(rng.normal(0, 0.03), -0.07, 0.07) * size),
                rot_deg=float(np.clip(rng.normal(0, 2.5), -7, 7)), scale=float(rng.uniform(0.92, 1.08)),
                inspiration=float(rng.uniform(-1, 0.3) if view == "AP" else rng.uniform(-0.8, 1.0)))


def sample_exposure(rng) -> Exposure:
    return Exposure(k=float(rng.uniform(0.85, 1.2)), gamma=float(rng.uniform(0.85, 1.2)),
                    offset=float(rng.uniform(-0.04, 0.04)), noise=float(rng.uniform(0.01, 0.03)),
                    blur=float(rng.uniform(0.4, 1.1)), heel=float(rng.uniform(-0.15, 0.15)))


def subject_id_for(index: int) -> int:
    """8 digits, the first two 10-19 (the MIMIC folder p1X), unique per index."""
    return (10 + index % 10) * 1_000_000 + ((index // 10) * 7919 + 1234 + (index % 10) * 104729) % 1_000_000


def study_id_for(index: int, k: int) -> int:
    return 50_000_000 + ((index * 8 + k) * 7919 + 31) % 10_000_000


def dicom_id_for(seed: int, subject: int, study: int, j: int) -> str:
    h = hashlib.sha1(f"{seed}/{subject}/{study}/{j}".encode()).hexdigest()[:40]
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


# --------------------------------------------------------------------------- one patient

def plan_patient(seed: int, index: int, size: int) -> dict:
    """Everything about one patient's journey except pixels: invariants, studies, images, reports."""
    rng = _rng(seed, index)
    sid = subject_id_for(index)
    patient = sample_patient(rng, sid)
    pacemaker = patient.age > 60 and rng.random() < 0.12
    n = int(rng.choice([2, 3, 4, 5, 6], p=[0.3, 0.28, 0.2, 0.12, 0.1]))
    day = int(rng.integers(0, 365 * 60))
    anchor_year = 2110 + day // 365
    state, studies = None, []
    for k in range(n):
        state = evolve(rng, state)
        r = rng.random()
        kind = "PA+LAT" if r < 0.58 else "PA" if r < 0.73 else "AP"
        mislabel = rng.random() < 0.025
        devices = []
        if kind == "AP":
            devices += [d for d, p in (("ett", 0.35), ("central_line", 0.45), ("ng_tube", 0.3), ("ecg_leads", 0.7))
                        if rng.random() < p]
        elif rng.random() < 0.08:
            devices.append("central_line")
        if pacemaker:
            devices.append("pacemaker")
        devices = [d for d in DEVICES if d in devices]
        if mislabel:
            views = [("LATERAL" if rng.random() < 0.7 else "AP", "PA")]
            kind = "PA+LAT"
        else:
            views = {"PA+LAT": [("PA", "PA"), ("LATERAL", "LATERAL")], "PA": [("PA", "PA")], "AP": [("AP", "AP")]}[kind]
        day += int(rng.integers(1, 10) if rng.random() < 0.4 else rng.integers(10, 400))
        secs = int(rng.integers(0, 86400))
        study_id = study_id_for(index, k)
        images = []
        for j, (vt, vr) in enumerate(views):
            images.append(dict(dicom_id=dicom_id_for(seed, sid, study_id, j), view_true=vt, view_recorded=vr,
                               mislabeled=vt != vr, pose=sample_pose(rng, size, vt), exposure=sample_exposure(rng),
                               noise_seed=int(rng.integers(0, 2 ** 63 - 1))))
        studies.append(dict(study_id=study_id, index=k, kind=kind, state=state, devices=devices, day=day,
                            secs=secs, images=images))
    prior = None
    for st in studies:
        info = {"state": st["state"], "devices": st["devices"], "view": st["images"][0]["view_recorded"]
                if st["kind"] != "AP" else "AP", "sex": patient.sex, "age": patient.age}
        st["report"], st["labels"] = compose_report(info, prior, rng)
        prior = info
    return dict(index=index, patient=patient, studies=studies, anchor_year=anchor_year)


def state_from_record(state: dict) -> State:
    """The renderer's State from a plan's {finding: (grade, side)} record."""
    return State(sev={k: v[0] for k, v in state.items()}, side={k: v[1] for k, v in state.items()})


def render_variant(out: str | Path, dicom_id: str, changes: dict[str, tuple[int, str]]) -> np.ndarray:
    """Image `dicom_id` of the cohort written at `out`, drawn again with its disease state changed by
    `changes` ({finding key: (grade, side)}, e.g. {"effusion": (2, "left")}) and everything else as it was
    (patient, pose, exposure, detector noise, devices): the phantom's true answer to an edit such as "new
    moderate left pleural effusion" (the evaluation's dose-response probes). uint8 (size, size)."""
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    seed, size, n = int(summary["seed"]), int(summary["size"]), int(summary["patients"])
    images = _truth_images(str(out))
    if dicom_id not in images.index:
        raise KeyError(f"{out / 'truth' / 'images.csv'}: no image {dicom_id!r}")
    subject = int(images.at[dicom_id, "subject_id"])
    index = next((i for i in range(n) if subject_id_for(i) == subject), None)
    if index is None:
        raise KeyError(f"{out}: subject {subject} is not one of the cohort's {n} patients")
    plan = _cached_plan(seed, index, size)
    st, im = next((st, im) for st in plan["studies"] for im in st["images"] if im["dicom_id"] == dicom_id)
    state = state_from_record(st["state"])
    for key, (grade, side) in changes.items():
        if key not in KEYS:
            raise ValueError(f"render_variant: finding key {key!r} is not one of {KEYS}")
        state.sev[key], state.side[key] = int(grade), side if grade else ""
    return render(plan["patient"], state, im["pose"], im["exposure"], view=im["view_true"], size=size,
                  noise_seed=im["noise_seed"], devices=st["devices"])


@functools.lru_cache(maxsize=64)
def _cached_plan(seed: int, index: int, size: int) -> dict:
    return plan_patient(seed, index, size)


@functools.lru_cache(maxsize=4)
def _truth_images(out: str) -> pd.DataFrame:
    return pd.read_csv(Path(out) / "truth" / "images.csv", dtype={"dicom_id": str}).set_index("dicom_id")


def _write(path: Path, data: bytes) -> None:
    """Atomic (temp file + rename) but without fsync: thousands of small files would spend their time
    in fsync. A patient's shard record is written only after all its files, so an interrupted run
    redoes that patient."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _npz_bytes(arrays: dict) -> bytes:
    """A deterministic .npz (fixed zip timestamps; np.savez stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, arr in arrays.items():
            b = io.BytesIO()
            np.lib.format.write_array(b, np.ascontiguousarray(arr), allow_pickle=False)
            zi = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(zi, b.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
    return buf.getvalue()


def _jpeg_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _date(day: int) -> tuple[int, str]:
    d = dt.date(2110, 1, 1) + dt.timedelta(days=day)
    return int(d.strftime("%Y%m%d")), d.isoformat()


def build_patient(out: Path, seed: int, index: int, size: int) -> dict:
    """Render and write one patient's files; return its table rows."""
    plan = plan_patient(seed, index, size)
    p: Patient = plan["patient"]
    sid = p.subject_id
    part = f"p{str(sid)[:2]}"
    mimic, truth = out / "mimic", out / "truth"
    rows = {k: [] for k in ("metadata", "chexpert", "split", "admissions", "truth_images", "pairs")}
    split = "test" if part == "p19" else "validate" if (index // 10) % 20 == 7 else "train"
    pa_chain = []
    for st in plan["studies"]:
        state = state_from_record(st["state"])
        sdir = mimic / "files" / part / f"p{sid}" / f"s{st['study_id']}"
        _write(sdir.with_suffix(".txt"), st["report"].encode())
        date, iso = _date(st["day"])
        hh, mm, ss = st["secs"] // 3600, st["secs"] // 60 % 60, st["secs"] % 60
        rows["chexpert"].append({"subject_id": sid, "study_id": st["study_id"], **st["labels"]})
        rows["admissions"].append(dict(subject_id=sid, hadm_id=20_000_000 + st["study_id"] % 10_000_000,
                                       admittime=f"{iso} {hh:02d}:{mm:02d}:00", dischtime=f"{iso} 23:59:00",
                                       admission_type="EW EMER." if st["kind"] == "AP" else "OBSERVATION ADMIT",
                                       admission_location="EMERGENCY ROOM", discharge_location="HOME",
                                       insurance="Medicare" if p.age >= 65 else "Other", language="ENGLISH",
                                       marital_status="MARRIED", race=p.race))
        for im in st["images"]:
            vt, vr = im["view_true"], im["view_recorded"]
            img, masks = render(p, state, im["pose"], im["exposure"], view=vt, size=size,
                                noise_seed=im["noise_seed"], devices=st["devices"], masks=True)
            rel = f"files/{part}/p{sid}/s{st['study_id']}/{im['dicom_id']}.jpg"
            _write(mimic / rel, _jpeg_bytes(img))
            _write(truth / "masks" / f"{im['dicom_id']}.npz", _npz_bytes(masks))
            desc = "CHEST (PORTABLE AP)" if st["kind"] == "AP" else "CHEST (PA AND LAT)"
            rows["metadata"].append({
                "dicom_id": im["dicom_id"], "subject_id": sid, "study_id": st["study_id"],
                "PerformedProcedureStepDescription": desc, "ViewPosition": vr, "Rows": size, "Columns": size,
                "StudyDate": date, "StudyTime": f"{hh * 10000 + mm * 100 + ss}.{st['secs'] % 1000:03d}",
                "ProcedureCodeSequence_CodeMeaning": desc, "ViewCodeSequence_CodeMeaning": VIEW_CODE[vr],
                "PatientOrientationCodeSequence_CodeMeaning": "Recumbent" if vt == "AP" else "Erect"})
            rows["split"].append({"dicom_id": im["dicom_id"], "study_id": st["study_id"], "subject_id": sid,
                                  "split": split})
            pose, e = im["pose"], im["exposure"]
            row = dict(dicom_id=im["dicom_id"], subject_id=sid, study_id=st["study_id"], study_index=st["index"],
                       view_true=vt, view_recorded=vr, mislabeled=bool(im["mislabeled"]), tx=round(pose.tx, 4),
                       ty=round(pose.ty, 4), rot_deg=round(pose.rot_deg, 4), scale=round(pose.scale, 5),
                       inspiration=round(pose.inspiration, 4), exposure_k=round(e.k, 4), gamma=round(e.gamma, 4),
                       offset=round(e.offset, 4), noise=round(e.noise, 4), blur=round(e.blur, 4),
                       heel=round(e.heel, 4), noise_seed=im["noise_seed"])
            for k in KEYS:
                row[f"{k}_sev"], row[f"{k}_side"] = st["state"][k]
            row.update(ctr=round(image_ctr(p, state, vt), 4), devices=";".join(st["devices"]), image_path=rel)
            rows["truth_images"].append(row)
        pa = [im for im in st["images"] if im["view_recorded"] == "PA"]
        if pa:
            pa_chain.append((st, pa[0]))
    for (s0, i0), (s1, i1) in zip(pa_chain, pa_chain[1:]):
        pair_id = f"{sid}_{s0['study_id']}_{s1['study_id']}"
        cf = render(p, state_from_record(s1["state"]), i0["pose"], i0["exposure"], view=i0["view_true"], size=size,
                    noise_seed=i0["noise_seed"], devices=s0["devices"])
        _write(truth / "counterfactual" / f"{pair_id}.png", _png_bytes(cf))
        a = pair_affine(i0["pose"], i1["pose"], size)
        rows["pairs"].append(dict(pair_id=pair_id, subject_id=sid, prior_dicom_id=i0["dicom_id"],
                                  followup_dicom_id=i1["dicom_id"], prior_study_id=s0["study_id"],
                                  followup_study_id=s1["study_id"],
                                  affine=" ".join(f"{x:.6f}" for x in (a[0, 0], a[0, 1], a[0, 2], a[1, 0], a[1, 1], a[1, 2])),
                                  counterfactual_path=f"counterfactual/{pair_id}.png",
                                  any_mislabeled=bool(i0["mislabeled"] or i1["mislabeled"])))
    rows["patients"] = [dict(subject_id=sid, gender=p.sex, anchor_age=p.age, anchor_year=plan["anchor_year"],
                             anchor_year_group="2014 - 2016", dod="")]
    rows["truth_patients"] = [{k: v for k, v in p.to_row().items()}]
    rows["n_images"] = len(rows["metadata"])
    return rows


def _shard_job(args):
    out, seed, index, size, key = args
    shard = Path(out) / "truth" / ".shards" / f"{index:06d}.json"
    if shard.exists():
        try:
            data = json.loads(shard.read_text())
            if data.get("key") == key:
                return data["rows"]
        except (json.JSONDecodeError, KeyError):
            pass
    rows = build_patient(Path(out), seed, index, size)
    _write(shard, json.dumps({"key": key, "rows": rows}, default=str).encode())
    return json.loads(json.dumps(rows, default=str))


# --------------------------------------------------------------------------- the cohort

def write_cohort(out, n_patients: int, size: int = 256, seed: int = 0, workers: int | None = None) -> dict:
    """Write the phantom cohort (MIMIC-CXR-JPG layout under out/mimic, ground truth under out/truth).

    Deterministic: the same (n_patients, size, seed) give byte-identical files for any `workers`.
    Resumable: finished patients are kept (truth/.shards), and a rerun whose manifest is current does
    nothing; both are keyed on the simulator's code (this module and all it imports from the package), so a
    changed simulator remakes every patient. Returns a summary dict (counts, seconds, images_per_s).
    """
    if not 128 <= size <= 512:
        raise ValueError(f"phantom size {size} px: must be within 128-512")
    if n_patients < 1:
        raise ValueError(f"phantom n_patients={n_patients}: need at least one patient")
    out = Path(out)
    key = fingerprint(VERSION, int(n_patients), int(size), int(seed), code_fingerprint_of(__name__))
    manifest = Manifest(out / "manifest.json", root=out)
    summary_path = out / "summary.json"
    tables = ["mimic/mimic-cxr-2.0.0-metadata.csv", "mimic/mimic-cxr-2.0.0-chexpert.csv",
              "mimic/mimic-cxr-2.0.0-split.csv", "mimic/patients.csv", "mimic/admissions.csv",
              "truth/images.csv", "truth/patients.csv", "truth/pairs.csv"]
    if summary_path.exists() and all(manifest.is_current(t, key) for t in tables):
        summary = json.loads(summary_path.read_text())
        if summary.get("key") == key:
            return dict(summary, skipped=True, mimic_root=str(out / "mimic"), truth_root=str(out / "truth"))
    t0 = time.time()
    workers = workers or os.cpu_count() or 1
    jobs = [(str(out), int(seed), i, int(size), key) for i in range(n_patients)]
    results = []
    if workers > 1 and n_patients > 1:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers) as pool:
            for r in tqdm(pool.imap(_shard_job, jobs, chunksize=2), total=n_patients, desc="phantom patients"):
                results.append(r)
    else:
        for j in tqdm(jobs, desc="phantom patients"):
            results.append(_shard_job(j))

    def table(name, cols):
        df = pd.DataFrame([r for res in results for r in res[name]])
        return df.reindex(columns=cols) if cols else df

    mimic, truth = "mimic", "truth"
    writes = {
        f"{mimic}/mimic-cxr-2.0.0-metadata.csv": table("metadata", METADATA_COLUMNS),
        f"{mimic}/mimic-cxr-2.0.0-chexpert.csv": table("chexpert", CHEXPERT_COLUMNS),
        f"{mimic}/mimic-cxr-2.0.0-split.csv": table("split", SPLIT_COLUMNS),
        f"{mimic}/patients.csv": table("patients", PATIENT_COLUMNS),
        f"{mimic}/admissions.csv": table("admissions", ADMISSION_COLUMNS),
        f"{truth}/images.csv": table("truth_images", TRUTH_IMAGE_COLUMNS),
        f"{truth}/patients.csv": table("truth_patients", None),
        f"{truth}/pairs.csv": table("pairs", PAIR_TRUTH_COLUMNS),
    }
    for rel, df in writes.items():
        atomic_write_csv(out / rel, df)
        manifest.record(rel, key)
    manifest.save()
    dt = time.time() - t0
    imgs = writes[f"{truth}/images.csv"]
    summary = dict(key=key, patients=n_patients, studies=len(writes[f"{mimic}/mimic-cxr-2.0.0-chexpert.csv"]),
                   images=len(imgs), mislabeled=int(imgs["mislabeled"].sum()),
                   pairs=len(writes[f"{truth}/pairs.csv"]), size=size, seed=seed)
    atomic_write_json(summary_path, summary)  # only deterministic fields go to disk
    return dict(summary, seconds=round(dt, 2), images_per_s=round(len(imgs) / max(dt, 1e-9), 1), skipped=False,
                mimic_root=str(out / mimic), truth_root=str(out / truth))
