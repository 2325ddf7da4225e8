"""ICG-CXR interoperability (ProgEmu, Ma et al. MICCAI 2025, "ICG-CXR Dataset"; DESIGN "Data sources" 3).

ICG-CXR stores one folder per pair of consecutive studies::

    <root>/mimic_cxr/pa/1/p10/p10000032/i01s50414267-i02s53189527/
        i01s50414267-i02s53189527.json         prompt, interpretation, reports, labels, metadata
        i01s50414267-i02s53189527-ref-reg.png  prior ("reference") image, registered
        i01s50414267-i02s53189527-flu-reg.png  follow-up image, registered
    <root>/chexpertplus/pa/1/train/p00023/i01s0001-i04s0002/...

`read_icg_records` turns such a tree into the chain's records and pairs (schema.RECORD_COLUMNS,
schema.PAIR_COLUMNS + prior_/followup_ labels) plus `description` (the progression prompt),
`changes_of_findings` (the interpretation), `reg_score` (the JSON's `reg_metric`, kept on its own scale)
and `registered_path`, so stage-2 training and evaluation use it like notebook 03's pairs.
`write_icg` exports our registered triples in the same format; reading the export back loses nothing.

ICG-CXR is derived from credentialed data (MIMIC-CXR, CheXpertPlus): every row read from it carries
`credentialed = True` (and `source = "icg"`), which the LLM data-use guard refuses to non-allowed hosts.
Only a folder our own writer marked with a non-credentialed origin (e.g. the phantom) is read as such.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from bmjlib.io import atomic_write_bytes, atomic_write_png, read_image, to_uint8
from bmjlib.schema import CHEXPERT_LABELS, PAIR_COLUMNS, RECORD_COLUMNS, label_col
from bmjlib.text.progression import credentialed_flags

MISSING_LABEL = -100          # ICG-CXR's value for a label the source did not provide
BRANCHES = ("mimic_cxr", "chexpertplus")
# Origins our writer may declare (key "bmj-origin") that are not credentialed data.
OPEN_ORIGINS = {"phantom", "csv"}
REQUIRED_KEYS = ("progression-description", "reference-report", "followup-report",
                 "reference-diseases", "followup-diseases", "subject-id",
                 "reference-study-id", "followup-study-id")
# CheXpertPlus pairs ship with this text in place of the reports (licence); it is not a report.
PLACEHOLDER_RE = re.compile(r"^\s*Due to the CheXpertPlus license", re.I)
EPOCH = pd.Timestamp("2000-01-01")  # study_time = EPOCH + days when only study orders are known
EXTRA_KEY = "bmj-extra"            # our writer keeps any further pair columns here, so nothing is lost
PAIR_EXTRA = ["description", "changes_of_findings", "reg_score", "registered_path"]


class IcgError(ValueError):
    """An ICG-CXR pair folder that cannot be read; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{self.path}: {problem}")


# --------------------------------------------------------------------------- reading

def _labels(value: Any, path: Path, key: str) -> dict[str, float]:
    """A `*-diseases` entry -> {label: 1/0/-1/NaN}; dict by label name, or a list in CHEXPERT_LABELS order."""
    if isinstance(value, list):
        if len(value) != len(CHEXPERT_LABELS):
            raise IcgError(path, f"{key} has {len(value)} values, expected {len(CHEXPERT_LABELS)}")
        value = dict(zip(CHEXPERT_LABELS, value))
    if not isinstance(value, dict):
        raise IcgError(path, f"{key} must be a dict of CheXpert labels or a list of 14, got {type(value).__name__}")
    unknown = set(value) - set(CHEXPERT_LABELS)
    if unknown:
        raise IcgError(path, f"{key} has unknown labels {sorted(unknown)}")
    out = {}
    for lab in CHEXPERT_LABELS:
        v = value.get(lab, MISSING_LABEL)
        if v is None or (isinstance(v, (int, float)) and (v == MISSING_LABEL or math.isnan(v))):
            out[lab] = np.nan
        elif v in (1, 0, -1):
            out[lab] = float(v)
        else:
            raise IcgError(path, f"{key}[{lab!r}] = {v!r}; expected 1, 0, -1 or {MISSING_LABEL} (missing)")
    return out


def _report(value: Any, path: Path, key: str, counts: dict) -> tuple[str, str]:
    if not isinstance(value, dict):
        raise IcgError(path, f"{key} must be a dict with 'findings' and 'impression'")
    out = []
    for sec in ("findings", "impression"):
        text = value.get(sec) or ""
        text = "" if (isinstance(text, float) and math.isnan(text)) else str(text)
        if PLACEHOLDER_RE.match(text):
            counts["placeholder_report_sections"] += 1
            text = ""
        out.append(text)
    return out[0], out[1]


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return np.nan
    return f


def _branch(rel: Path) -> str:
    return next((p for p in rel.parts if p in BRANCHES), rel.parts[0] if len(rel.parts) > 1 else "")


def _read_pair(js: Path, root: Path, counts: dict) -> tuple[dict, list[dict]]:
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IcgError(js, f"unreadable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise IcgError(js, "top level is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise IcgError(js, f"missing keys {missing}")
    stem = js.stem
    ref, flu = js.with_name(f"{stem}-ref-reg.png"), js.with_name(f"{stem}-flu-reg.png")
    for p in (ref, flu):
        if not p.exists() or p.stat().st_size == 0:
            raise IcgError(p, "image missing or empty")
    subject = str(meta["subject-id"])
    s_ref, s_flu = str(meta["reference-study-id"]), str(meta["followup-study-id"])
    rel = js.relative_to(root)
    branch = _branch(rel)
    origin = str(meta.get("bmj-origin", branch))
    credentialed = origin not in OPEN_ORIGINS
    ref_find, ref_imp = _report(meta["reference-report"], js, "reference-report", counts)
    flu_find, flu_imp = _report(meta["followup-report"], js, "followup-report", counts)
    ref_lab = _labels(meta["reference-diseases"], js, "reference-diseases")
    flu_lab = _labels(meta["followup-diseases"], js, "followup-diseases")
    m = re.match(r"i(\d+)s", stem)
    order = {"reference": meta.get("reference-study-order"), "followup": meta.get("followup-study-order")}
    if order["reference"] is None and m:
        order["reference"] = int(m.group(1))
    times = {}
    for role in ("reference", "followup"):
        t = meta.get(f"{role}-study-time")
        if t:
            times[role] = pd.Timestamp(t)
        elif order[role] is not None:
            times[role] = EPOCH + pd.Timedelta(days=int(order[role]))
        else:
            times[role] = pd.NaT
    if pd.isna(times["followup"]) and not pd.isna(times["reference"]) and meta.get("time-interval") is not None:
        times["followup"] = times["reference"] + pd.Timedelta(days=float(meta["time-interval"]))
    partition = next((p for p in rel.parts if re.fullmatch(r"p1\d", p)), "")
    demo = {"age": _num(meta.get("age")), "sex": meta.get("sex") or "", "race": meta.get("race") or ""}
    view = meta.get("view") or "PA"
    ids = {"reference": str(meta.get("reference-dicom-id") or f"{subject}_{s_ref}"),
           "followup": str(meta.get("followup-dicom-id") or f"{subject}_{s_flu}")}
    pair = {
        "pair_id": f"{subject}_{s_ref}_{s_flu}", "subject_id": subject, "split": meta.get("split") or "",
        "prior_dicom_id": ids["reference"], "followup_dicom_id": ids["followup"],
        "prior_study_id": s_ref, "followup_study_id": s_flu,
        "prior_path": str(ref), "followup_path": str(flu),
        "prior_findings": ref_find, "prior_impression": ref_imp,
        "followup_findings": flu_find, "followup_impression": flu_imp, **demo,
        "description": meta.get("progression-description") or "",
        "changes_of_findings": meta.get("changes-of-findings") or "",
        "reg_score": _num(meta.get("reg_metric")), "registered_path": str(flu),
        "source": "icg", "icg_branch": branch, "credentialed": credentialed, "icg_json": str(js),
    }
    for lab in CHEXPERT_LABELS:
        pair[label_col("prior", lab)] = ref_lab[lab]
        pair[label_col("followup", lab)] = flu_lab[lab]
    extra = meta.get(EXTRA_KEY) or {}
    for k, v in extra.items():
        pair.setdefault(k, v)
    records = []
    for role, path, study, (fnd, imp), labs in (
            ("reference", ref, s_ref, (ref_find, ref_imp), ref_lab),
            ("followup", flu, s_flu, (flu_find, flu_imp), flu_lab)):
        records.append({"source": "icg", "subject_id": subject, "study_id": study, "dicom_id": ids[role],
                        "image_path": str(path), "view": view, "study_time": times[role],
                        "partition": partition, "findings": fnd, "impression": imp, "report_path": "",
                        **demo, **labs, "icg_branch": branch, "credentialed": credentialed})
    return pair, records


def read_icg(root, check_images: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read every pair folder under `root` -> (records, pairs, skipped).

    A pair whose JSON is unreadable or lacks a required key, or whose image is missing (or, with
    `check_images`, undecodable or blank), is skipped and listed in `skipped` (path, problem), never
    half-read. Records are one row per image (dicom id), the first pair that shows it supplying its path.
    """
    root = Path(root).resolve()  # image paths in the records are absolute, like every other source's
    if not root.is_dir():
        raise FileNotFoundError(f"ICG-CXR root {root} is not a folder")
    counts = {"placeholder_report_sections": 0}
    pairs, records, skipped = [], [], []
    jsons = sorted(p for p in root.rglob("*.json") if p.parent.name == p.stem)
    for js in jsons:
        try:
            pair, recs = _read_pair(js, root, counts)
            if check_images:
                for p in (pair["prior_path"], pair["registered_path"]):
                    read_image(p)
        except (IcgError, ValueError) as e:
            skipped.append({"path": getattr(e, "path", str(js)), "problem": getattr(e, "problem", str(e))})
            continue
        pairs.append(pair)
        records.extend(recs)
    label_cols = [label_col(p, lab) for p in ("prior", "followup") for lab in CHEXPERT_LABELS]
    rec_cols = RECORD_COLUMNS + CHEXPERT_LABELS + ["icg_branch", "credentialed"]
    rec = pd.DataFrame(records, columns=rec_cols).drop_duplicates("dicom_id", keep="first")
    rec = rec.reset_index(drop=True)
    base = PAIR_COLUMNS + label_cols + PAIR_EXTRA + ["source", "icg_branch", "credentialed", "icg_json"]
    extras = sorted({k for p in pairs for k in p} - set(base))
    pr = pd.DataFrame(pairs, columns=base + extras)
    if pr["pair_id"].duplicated().any():
        dup = pr.loc[pr["pair_id"].duplicated(), "pair_id"].tolist()[:5]
        raise IcgError(root, f"pair ids occur in more than one folder: {dup}")
    skipped = pd.DataFrame(skipped, columns=["path", "problem"])
    if len(skipped):
        warnings.warn(f"ICG-CXR {root}: skipped {len(skipped)} of {len(jsons)} pair folders "
                      f"(first: {skipped.iloc[0]['path']}: {skipped.iloc[0]['problem']})", stacklevel=2)
    pr.attrs["placeholder_report_sections"] = counts["placeholder_report_sections"]
    return rec, pr, skipped


def read_icg_records(root, check_images: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The data-source entry point (sources.py dispatches source='icg' here): (records, pairs)."""
    rec, pr, _ = read_icg(root, check_images=check_images)
    return rec, pr


# --------------------------------------------------------------------------- writing

def _icg_label_dict(row, prefix: str) -> dict[str, float | int]:
    out = {}
    for lab in CHEXPERT_LABELS:
        v = row.get(label_col(prefix, lab), np.nan)
        v = _num(v)
        out[lab] = MISSING_LABEL if np.isnan(v) else float(v)
    return out


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if np.isnan(v) else float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    return v


def _str(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _copy_png(src: str, dst: Path) -> None:
    """Copy a PNG byte for byte; store a JPEG's decoded 8-bit pixels as PNG (lossless from then on);
    anything else (DICOM) is read by io.read_image and written as 8-bit PNG."""
    suffix = Path(src).suffix.lower()
    if suffix == ".png":
        tmp = dst.with_name(dst.name + ".part")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    elif suffix in (".jpg", ".jpeg"):
        read_image(src)  # fails loudly on a missing / truncated / blank file
        with Image.open(src) as im:
            atomic_write_png(dst, np.asarray(im.convert("L"), dtype=np.uint8))
    else:
        atomic_write_png(dst, to_uint8(read_image(src)))


def rows_credentialed(table: pd.DataFrame) -> bool:
    """Whether any row of a table is credentialed data: a true `credentialed` value, or no such column (what
    the project cannot classify counts as credentialed; a blank value too, as `credentialed_flags` reads it)."""
    return "credentialed" not in table.columns or bool(credentialed_flags(table["credentialed"]).any())


def write_icg(pairs: pd.DataFrame, out_root, interpretations: pd.DataFrame | None = None,
              records: pd.DataFrame | None = None, origin: str = "phantom") -> pd.DataFrame:
    """Export registered triples as ICG-CXR pair folders under `out_root/<branch>/pa/1/<split>/p<subject>/`.

    `pairs` is notebook 03's table (PAIR_COLUMNS, labels, `registered_path`, `description`, `reg_score`).
    `interpretations` (pair_id, changes_of_findings) supplies the interpretation; else the pairs' own
    `changes_of_findings` column, else "". `records` (optional, notebook 01's; else the pairs'
    `prior_time` / `followup_time`) gives study times, which
    set the study orders `iUU`/`iVV` and `time-interval`; without it the order is the rank of the study
    id within the patient. `origin` is recorded as `bmj-origin` ('mimic' data lands under `mimic_cxr/`
    and stays credentialed on reading back). Every pair column without an ICG key goes to `bmj-extra`.
    Returns one row per exported pair: pair_id, folder, json path.
    """
    out_root = Path(out_root)
    df = pairs.copy()
    if interpretations is not None:
        interp = interpretations.set_index("pair_id")["changes_of_findings"]
        df["changes_of_findings"] = df["pair_id"].map(interp).fillna("")
    need = ["pair_id", "subject_id", "prior_study_id", "followup_study_id", "prior_path", "registered_path"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"write_icg: pairs table lacks columns {missing}")
    if origin in OPEN_ORIGINS and "credentialed" in df.columns and rows_credentialed(df):
        raise ValueError(f"write_icg: origin {origin!r} would mark credentialed rows as open data; export them "
                         "with their own origin (e.g. 'mimic')")
    times: dict[tuple[str, str], pd.Timestamp] = {}
    if records is None and {"prior_time", "followup_time"} <= set(df.columns):  # notebook 01's pair times
        records = pd.DataFrame({"subject_id": list(df["subject_id"]) * 2,
                                "study_id": list(df["prior_study_id"]) + list(df["followup_study_id"]),
                                "study_time": pd.to_datetime(list(df["prior_time"]) + list(df["followup_time"]))})
    if records is not None and "study_time" in records:
        r = records.dropna(subset=["study_time"])
        times = {(str(s), str(t)): pd.Timestamp(v) for s, t, v in
                 zip(r["subject_id"], r["study_id"], r["study_time"])}
    order: dict[tuple[str, str], int] = {}
    for subj, g in df.groupby(df["subject_id"].astype(str)):
        studies = sorted(set(g["prior_study_id"].astype(str)) | set(g["followup_study_id"].astype(str)),
                         key=lambda s: (times.get((subj, s), pd.Timestamp.max), s))
        order.update({(subj, s): i + 1 for i, s in enumerate(studies)})
    branch = {"mimic": "mimic_cxr", "chexpertplus": "chexpertplus"}.get(origin, origin)
    known = set(PAIR_COLUMNS + PAIR_EXTRA) | {label_col(p, lab) for p in ("prior", "followup")
                                               for lab in CHEXPERT_LABELS}
    known |= {"source", "icg_branch", "credentialed", "icg_json", "followup_path", "prior_time", "followup_time"}
    extra_cols = [c for c in df.columns if c not in known]
    rows = []
    for row in df.to_dict("records"):
        subj, s_ref, s_flu = str(row["subject_id"]), str(row["prior_study_id"]), str(row["followup_study_id"])
        o_ref, o_flu = order[(subj, s_ref)], order[(subj, s_flu)]
        name = f"i{o_ref:02d}s{s_ref}-i{o_flu:02d}s{s_flu}"
        split = _str(row.get("split")) or "unsplit"
        folder = out_root / branch / "pa" / "1" / split / f"p{subj}" / name
        folder.mkdir(parents=True, exist_ok=True)
        t_ref, t_flu = times.get((subj, s_ref)), times.get((subj, s_flu))
        meta = {
            "changes-of-findings": _str(row.get("changes_of_findings")),
            "progression-description": _str(row.get("description")),
            "reference-report": {"findings": _str(row.get("prior_findings")),
                                 "impression": _str(row.get("prior_impression"))},
            "followup-report": {"findings": _str(row.get("followup_findings")),
                                "impression": _str(row.get("followup_impression"))},
            "time-interval": (t_flu - t_ref).days if t_ref is not None and t_flu is not None else None,
            "view": _str(row.get("view")) or "PA",
            "subject-id": subj, "reference-study-id": s_ref, "followup-study-id": s_flu,
            "reference-dicom-id": _str(row.get("prior_dicom_id")),
            "followup-dicom-id": _str(row.get("followup_dicom_id")),
            "reference-study-order": o_ref, "followup-study-order": o_flu,
            "reference-study-index": o_ref - 1, "followup-study-index": o_flu - 1,
            "reference-study-time": t_ref.isoformat() if t_ref is not None else None,
            "followup-study-time": t_flu.isoformat() if t_flu is not None else None,
            "age": _jsonable(_num(row.get("age"))), "sex": _str(row.get("sex")), "race": _str(row.get("race")),
            "split": _str(row.get("split")),
            "reg_metric": _jsonable(_num(row.get("reg_score"))),
            "reference-diseases": _icg_label_dict(row, "prior"),
            "followup-diseases": _icg_label_dict(row, "followup"),
            "bmj-origin": origin,
            EXTRA_KEY: {c: _jsonable(row[c]) for c in extra_cols},
        }
        _copy_png(row["prior_path"], folder / f"{name}-ref-reg.png")
        _copy_png(row["registered_path"], folder / f"{name}-flu-reg.png")
        js = folder / f"{name}.json"
        atomic_write_bytes(js, (json.dumps(meta, indent=4, ensure_ascii=False) + "\n").encode("utf-8"))
        rows.append({"pair_id": row["pair_id"], "folder": str(folder), "json": str(js)})
    return pd.DataFrame(rows, columns=["pair_id", "folder", "json"])
