"""ICG-CXR interoperability (ProgEmu, Ma et al. MICCAI 2025, "ICG-CXR Dataset"; DESIGN "Data sources" 3).

ICG-CXR stores one folder per pair of consecutive studies::

    <root>/mimic_cxr/pa/1/p10/p10000032/i01s50414267-i02s53189527/
        i01s50414267-i02s53189527.json         prompt, interpretation, reports, labels, metadata
        i01s50414267-i02s53189527-ref-reg.png  prior ("reference") image, registered
        i01s50414267-i02s53189527-flu-reg.png  follow-up image, registered
    <root>/chexpertplus/pa/1/train/p00023/i01s0001-i04s0002/...

`read_icg_records` turns such a tree into the chain's records and pairs (schema.RECORD_COLUMNS,
schema.PAIR_COLUMNS + prior_/followup_ labels) plus `description` (the progression prompt),
`changes_of_findings` (the interpretation) and `registered_path`, so stage-2 training and evaluation use
it like notebook 03's pairs. The pairs come registered by the dataset: step 02 does not register them
again (`registration_table`) and step 03 takes their own description (`description_table`). The JSON's
`reg_metric` is ProgEmu's mean squares (lower is better) and goes to its own column `REG_METRIC_COLUMN`,
never to the chain's `reg_score` (a correlation, higher is better). Study dates ICG-CXR does not give stay
unknown (NaT); the study order is kept (`prior_study_order` / `followup_study_order`).

`write_icg` exports pairs in the same format. A pair read from ICG-CXR keeps its JSON as read (`icg_meta`)
and its folder (`icg_folder`): writing it back starts from that JSON and changes only the values the table
changed, so read -> write -> read keeps every key and value (unknown keys, the licence placeholder of the
reports, study orders and indices, -100 labels) and the folder names. Our own triples get the same keys,
with what the project adds under `bmj-*` keys. The origin of each row comes from the rows themselves (the
folder's branch, or the `source` column), never from a default.

ICG-CXR is derived from credentialed data (MIMIC-CXR, CheXpertPlus): every row read from it carries
`credentialed = True` (and `source = "icg"`), which the LLM data-use guard refuses to non-allowed hosts.
Only a folder our own writer marked with a non-credentialed origin (e.g. the phantom) is read as such.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from bmjlib.io import (atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_png, read_image,
                       to_uint8)
from bmjlib.runtime import resolve, step_dir
from bmjlib.schema import CHEXPERT_LABELS, PAIR_COLUMNS, RECORD_COLUMNS, label_col
from bmjlib.text import progression
from bmjlib.text.progression import credentialed_flags

MISSING_LABEL = -100          # ICG-CXR's value for a label the source did not provide
BRANCHES = ("mimic_cxr", "chexpertplus")
# The data source behind each branch folder, and back (our writer puts other origins under their own name).
BRANCH_ORIGIN = {"mimic_cxr": "mimic", "chexpertplus": "chexpertplus"}
ORIGIN_BRANCH = {v: k for k, v in BRANCH_ORIGIN.items()}
# Origins our writer may declare (key "bmj-origin") that are not credentialed data.
OPEN_ORIGINS = {"phantom", "csv"}
# ProgEmu's `reg_metric` (register_chexpertplus.py): SimpleITK's mean squares after its affine registration of
# 512 px images in 0-255, so LOWER is better; 0 = a pair it left as it was (already similar), -100 = a pair it
# did not register (read as missing here; the JSON keeps it). Its own column, never the chain's `reg_score`.
REG_METRIC_COLUMN = "reg_metric_progemu_mse"
META_COLUMN = "icg_meta"      # the pair's JSON as read (text): the writer starts from it, so nothing is lost
FOLDER_COLUMN = "icg_folder"  # the pair folder relative to the root read: written back under the same path
# Split names of the sources (CheXpert's "valid", MIMIC's "validate") -> the chain's train / val / test.
SPLIT_NAMES = {"valid": "val", "validate": "val", "validation": "val"}
REQUIRED_KEYS = ("progression-description", "reference-report", "followup-report",
                 "reference-diseases", "followup-diseases", "subject-id",
                 "reference-study-id", "followup-study-id")
# CheXpertPlus pairs ship with this text in place of the reports (licence); it is not a report.
PLACEHOLDER_RE = re.compile(r"^\s*Due to the CheXpertPlus license", re.I)
EXTRA_KEY = "bmj-extra"            # our writer keeps any further pair columns here, so nothing is lost
REG_SCORE_KEY = "bmj-reg-score"    # the chain's registration score (correlation) of our own exports
CREDENTIALED_KEY = "bmj-credentialed"  # true: a row of an open origin (csv) whose text is credentialed anyway
PAIR_EXTRA = ["description", "changes_of_findings", "reg_score", "registered_path", REG_METRIC_COLUMN, "view",
              "prior_study_order", "followup_study_order"]


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


def _branch(js: Path, declared: str | None = None) -> str:
    """The branch folder on the JSON's path: mimic_cxr / chexpertplus, or the folder of the origin our writer
    declared (`declared`); "" when there is none."""
    names = set(BRANCHES) | ({ORIGIN_BRANCH.get(declared, declared)} if declared else set())
    return next((p for p in reversed(js.parent.parent.parts) if p in names), "")


def _order(v) -> float:
    """A study order / index as a number (NaN when absent or not a whole number)."""
    f = _num(v)
    return f if np.isfinite(f) and float(f).is_integer() else np.nan


def _split(v) -> str:
    s = "" if v is None else str(v).strip()
    return SPLIT_NAMES.get(s.lower(), s)


def _reg_metric(v) -> float:
    """ProgEmu's reg_metric -> REG_METRIC_COLUMN: its value, or NaN for null and its -100 ('not registered')."""
    f = _num(v)
    return np.nan if f == MISSING_LABEL else f


def _time(v) -> pd.Timestamp:
    try:
        return pd.Timestamp(v) if v not in (None, "") else pd.NaT
    except (TypeError, ValueError):
        return pd.NaT


def _fields(meta: dict, path: Path, counts: dict | None = None) -> dict:
    """The pair-table values the JSON `meta` of pair folder file `path` holds (what `_read_pair` reads and
    `write_icg` compares against). Study orders the JSON lacks come from the folder name (iUUs...-iVVs...)."""
    counts = counts if counts is not None else {"placeholder_report_sections": 0}
    subject = str(meta["subject-id"])
    s_ref, s_flu = str(meta["reference-study-id"]), str(meta["followup-study-id"])
    ref_find, ref_imp = _report(meta["reference-report"], path, "reference-report", counts)
    flu_find, flu_imp = _report(meta["followup-report"], path, "followup-report", counts)
    out = {
        "subject_id": subject, "split": _split(meta.get("split")),
        "prior_dicom_id": str(meta.get("reference-dicom-id") or f"{subject}_{s_ref}"),
        "followup_dicom_id": str(meta.get("followup-dicom-id") or f"{subject}_{s_flu}"),
        "prior_study_id": s_ref, "followup_study_id": s_flu,
        "prior_findings": ref_find, "prior_impression": ref_imp,
        "followup_findings": flu_find, "followup_impression": flu_imp,
        "age": _num(meta.get("age")), "sex": meta.get("sex") or "", "race": meta.get("race") or "",
        "description": meta.get("progression-description") or "",
        "changes_of_findings": meta.get("changes-of-findings") or "",
        REG_METRIC_COLUMN: _reg_metric(meta.get("reg_metric")), "reg_score": _num(meta.get(REG_SCORE_KEY)),
        "view": meta.get("view") or "PA",
        "prior_study_order": _order(meta.get("reference-study-order")),
        "followup_study_order": _order(meta.get("followup-study-order")),
    }
    m = re.match(r"i(\d+)s.*-i(\d+)s", Path(path).stem)
    for i, prefix in enumerate(("prior", "followup")):
        if m and np.isnan(out[f"{prefix}_study_order"]):
            out[f"{prefix}_study_order"] = float(m.group(i + 1))
    for prefix, key in (("prior", "reference-diseases"), ("followup", "followup-diseases")):
        for lab, v in _labels(meta[key], path, key).items():
            out[label_col(prefix, lab)] = v
    return out


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
    declared = _str(meta.get("bmj-origin")) or None
    branch = _branch(js, declared)
    origin = declared or BRANCH_ORIGIN.get(branch, "")
    credentialed = origin not in OPEN_ORIGINS or meta.get(CREDENTIALED_KEY) is True
    f = _fields(meta, js, counts)
    rel = js.relative_to(root)
    partition = next((p for p in rel.parts if re.fullmatch(r"p1\d", p)), "")
    pair = {"pair_id": f"{f['subject_id']}_{f['prior_study_id']}_{f['followup_study_id']}", **f,
            "prior_path": str(ref), "followup_path": str(flu), "registered_path": str(flu),
            "source": "icg", "icg_branch": branch, "icg_origin": origin, "credentialed": credentialed,
            "icg_json": str(js), FOLDER_COLUMN: rel.parent.as_posix(), META_COLUMN: json.dumps(meta, ensure_ascii=False)}
    extra = meta.get(EXTRA_KEY) or {}
    for k, v in extra.items():
        pair.setdefault(k, v)
    # Study times only where the JSON gives them (our writer's keys); ICG-CXR itself gives none: they stay NaT.
    records = []
    for role, prefix, path in (("reference", "prior", ref), ("followup", "followup", flu)):
        records.append({"source": "icg", "subject_id": f["subject_id"], "study_id": f[f"{prefix}_study_id"],
                        "dicom_id": f[f"{prefix}_dicom_id"], "image_path": str(path), "view": f["view"],
                        "study_time": _time(meta.get(f"{role}-study-time")), "partition": partition,
                        "findings": f[f"{prefix}_findings"], "impression": f[f"{prefix}_impression"],
                        "report_path": "", "age": f["age"], "sex": f["sex"], "race": f["race"],
                        **{lab: f[label_col(prefix, lab)] for lab in CHEXPERT_LABELS},
                        "icg_branch": branch, "credentialed": credentialed, "study_order": f[f"{prefix}_study_order"]})
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
    rec_cols = RECORD_COLUMNS + CHEXPERT_LABELS + ["icg_branch", "credentialed", "study_order"]
    rec = pd.DataFrame(records, columns=rec_cols).drop_duplicates("dicom_id", keep="first")
    # each patient's studies in their order (ICG-CXR gives orders, not dates)
    rec = rec.sort_values(["subject_id", "study_order", "study_id"], kind="stable").reset_index(drop=True)
    base = (PAIR_COLUMNS + label_cols + PAIR_EXTRA
            + ["source", "icg_branch", "icg_origin", "credentialed", "icg_json", FOLDER_COLUMN, META_COLUMN])
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


# Sources the writer knows as an origin when a row carries no ICG-CXR origin of its own.
KNOWN_ORIGINS = {"phantom", "mimic", "chexpertplus", "csv"}
# Pair columns -> ICG-CXR keys, for what `write_icg` compares with the JSON a pair was read from.
SCALAR_KEYS = [("description", "progression-description"), ("changes_of_findings", "changes-of-findings"),
               ("view", "view"), ("subject_id", "subject-id"), ("prior_study_id", "reference-study-id"),
               ("followup_study_id", "followup-study-id"), ("prior_dicom_id", "reference-dicom-id"),
               ("followup_dicom_id", "followup-dicom-id"), ("prior_study_order", "reference-study-order"),
               ("followup_study_order", "followup-study-order"), ("age", "age"), ("sex", "sex"), ("race", "race"),
               ("split", "split"), (REG_METRIC_COLUMN, "reg_metric"), ("reg_score", REG_SCORE_KEY)]
REPORT_KEYS = [("prior", "reference-report"), ("followup", "followup-report")]
LABEL_KEYS = [("prior", "reference-diseases"), ("followup", "followup-diseases")]
NUMBER_COLUMNS = {"age", REG_METRIC_COLUMN, "reg_score"}
ORDER_COLUMNS = {"prior_study_order", "followup_study_order"}


def row_origins(pairs: pd.DataFrame) -> list[str]:
    """Each row's origin as the rows themselves say it: `icg_origin` (a pair read from ICG-CXR: its branch
    folder or its `bmj-origin`), else a `source` naming a dataset (KNOWN_ORIGINS); "" where they do not say."""
    n = len(pairs)
    own = pairs["icg_origin"].tolist() if "icg_origin" in pairs.columns else [""] * n
    src = pairs["source"].tolist() if "source" in pairs.columns else [""] * n
    out = []
    for o, s in zip(own, src):
        o, s = _str(o).strip(), _str(s).strip().lower()
        out.append(o or (s if s in KNOWN_ORIGINS else ""))
    return out


def _blank(v) -> bool:
    return v is None or v is pd.NaT or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v == "")


def _same(a, b) -> bool:
    """Equal as the pair table holds them after a CSV round trip: blanks alike, numbers by value ("00012" is
    12), text exactly."""
    if _blank(a) or _blank(b):
        return _blank(a) and _blank(b)
    fa, fb = _num(a), _num(b)
    if not (np.isnan(fa) or np.isnan(fb)):
        return math.isclose(fa, fb, rel_tol=1e-12, abs_tol=0.0)
    return str(a) == str(b)


def _raw(col: str, v):
    """A pair-table value as the ICG-CXR JSON writes it."""
    if col in ORDER_COLUMNS:
        f = _order(v)
        return None if np.isnan(f) else int(f)
    if col in NUMBER_COLUMNS:
        return _jsonable(_num(v))
    return _str(v)


def _merge(orig: dict, row: dict, path: Path) -> dict:
    """The JSON a pair was read from, with only the values the table changed replaced: every other key (the
    licence placeholder, -100 labels, orders, indices, unknown keys) stays as it was, in its place."""
    meta = json.loads(json.dumps(orig))
    was = _fields(orig, path)
    for col, key in SCALAR_KEYS:
        if col in row and not _same(row[col], was[col]):
            meta[key] = _raw(col, row[col])
    for prefix, key in REPORT_KEYS:
        for sec in ("findings", "impression"):
            col = f"{prefix}_{sec}"
            if col in row and not _same(row[col], was[col]):
                meta[key] = {**meta[key], sec: _str(row[col])} if isinstance(meta[key], dict) else {sec: _str(row[col])}
    for prefix, key in LABEL_KEYS:
        changed = [lab for lab in CHEXPERT_LABELS
                   if label_col(prefix, lab) in row and not _same(row[label_col(prefix, lab)], was[label_col(prefix, lab)])]
        if changed:
            labels = meta[key] if isinstance(meta[key], dict) else dict(zip(CHEXPERT_LABELS, meta[key]))
            new = _icg_label_dict(row, prefix)
            meta[key] = {**labels, **{lab: new[lab] for lab in changed}}
    return meta


def write_icg(pairs: pd.DataFrame, out_root, interpretations: pd.DataFrame | None = None,
              records: pd.DataFrame | None = None, origin: str | None = None) -> pd.DataFrame:
    """Export pairs as ICG-CXR pair folders; returns one row per pair: pair_id, folder, json path.

    A pair read from ICG-CXR (it carries `icg_meta` and `icg_folder`) is written to the same relative
    folder under `out_root`, from its own JSON with only the values the table changed replaced (`_merge`):
    read -> write -> read keeps every key and value. Any other pair (notebook 03's table: PAIR_COLUMNS,
    labels, `registered_path`, `description`, `reg_score`) goes to `out_root/<branch>/pa/1/<split>/p<subject>/`
    with the ICG-CXR keys, `reg_metric` from REG_METRIC_COLUMN (null for pairs ProgEmu did not register; the
    chain's own score goes to `bmj-reg-score`), its origin as `bmj-origin`, and every pair column without an
    ICG key under `bmj-extra`. `records` (optional, notebook 01's; else the pairs' `prior_time` /
    `followup_time`) gives study times where known: they set the study orders `iUU`/`iVV` and `time-interval`;
    without them the order is the rank of the study id within the patient, and no time is written.

    The origin of each row is the rows' own (`row_origins`: the ICG-CXR branch, else the `source` column);
    `origin` is only for a table whose rows do not say, and a row that says otherwise is an error. 'mimic' and
    'chexpertplus' land under mimic_cxr/ and chexpertplus/ and stay credentialed on reading back; a
    credentialed row of origin 'csv' is marked `bmj-credentialed`; one of origin 'phantom' is refused.
    `interpretations` (pair_id, changes_of_findings) replaces the interpretation of the pairs it lists.
    """
    out_root = Path(out_root)
    df = pairs.copy()
    if interpretations is not None:
        interp = interpretations.set_index("pair_id")["changes_of_findings"]
        own = df["changes_of_findings"] if "changes_of_findings" in df.columns else pd.Series("", index=df.index)
        df["changes_of_findings"] = df["pair_id"].map(interp).fillna(own).fillna("")
    need = ["pair_id", "subject_id", "prior_study_id", "followup_study_id", "prior_path", "registered_path"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"write_icg: pairs table lacks columns {missing}")
    origins = row_origins(df)
    if origin is not None:
        other = [(pid, o) for pid, o in zip(df["pair_id"], origins) if o and o != origin]
        if other:
            raise ValueError(f"write_icg: origin {origin!r} given, but {len(other)} pairs say they come from "
                             f"elsewhere (first: {other[0][0]}: {other[0][1]!r}); leave origin out to use their own")
        origins = [o or origin for o in origins]
    unknown = [pid for pid, o in zip(df["pair_id"], origins) if not o]
    if unknown:
        raise ValueError(f"write_icg: {len(unknown)} of {len(df)} pairs have no origin (first: {unknown[0]}): "
                         f"no `icg_origin` (an ICG-CXR branch) or `source` ({', '.join(sorted(KNOWN_ORIGINS))}) "
                         "says where their data come from; pass origin=")
    flags = (credentialed_flags(df["credentialed"]).tolist() if "credentialed" in df.columns
             else [o not in OPEN_ORIGINS for o in origins])  # a table without the column: the origin decides
    bad = [pid for pid, o, c in zip(df["pair_id"], origins, flags) if o == "phantom" and c]
    if bad:
        raise ValueError(f"write_icg: origin 'phantom' would mark credentialed rows as open data ({len(bad)} pairs, "
                         f"first: {bad[0]}); export them with their own origin (e.g. 'mimic')")
    times: dict[tuple[str, str], pd.Timestamp] = {}
    if records is None and {"prior_time", "followup_time"} <= set(df.columns):  # notebook 01's pair times
        records = pd.DataFrame({"subject_id": list(df["subject_id"]) * 2,
                                "study_id": list(df["prior_study_id"]) + list(df["followup_study_id"]),
                                "study_time": pd.to_datetime(list(df["prior_time"]) + list(df["followup_time"]))})
    if records is not None and "study_time" in records:
        r = records.assign(study_time=pd.to_datetime(records["study_time"], errors="coerce")).dropna(
            subset=["study_time"])
        times = {(str(s), str(t)): pd.Timestamp(v) for s, t, v in
                 zip(r["subject_id"], r["study_id"], r["study_time"])}
    order: dict[tuple[str, str], int] = {}
    for subj, g in df.groupby(df["subject_id"].astype(str)):
        studies = sorted(set(g["prior_study_id"].astype(str)) | set(g["followup_study_id"].astype(str)),
                         key=lambda s: (times.get((subj, s), pd.Timestamp.max), s))
        order.update({(subj, s): i + 1 for i, s in enumerate(studies)})
    known = set(PAIR_COLUMNS + PAIR_EXTRA) | {label_col(p, lab) for p in ("prior", "followup")
                                               for lab in CHEXPERT_LABELS}
    known |= {"source", "icg_branch", "icg_origin", "credentialed", "icg_json", FOLDER_COLUMN, META_COLUMN,
              "followup_path", "prior_time", "followup_time"}
    extra_cols = [c for c in df.columns if c not in known]
    plan = []
    for row, o, cred in zip(df.to_dict("records"), origins, flags):
        subj, s_ref, s_flu = str(row["subject_id"]), str(row["prior_study_id"]), str(row["followup_study_id"])
        extra = {c: _jsonable(row[c]) for c in extra_cols}
        own_json = _str(row.get(META_COLUMN)).strip()
        if own_json:  # read from ICG-CXR: its own folder and JSON
            rel = Path(_str(row.get(FOLDER_COLUMN)))
            if not rel.parts or rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"write_icg: pair {row['pair_id']}: {FOLDER_COLUMN} {str(rel)!r} is not a folder "
                                 "path inside the export")
            folder, name = out_root / rel, rel.name
            try:
                meta = _merge(json.loads(own_json), row, Path(f"{name}.json"))
            except (json.JSONDecodeError, IcgError, KeyError) as e:
                raise ValueError(f"write_icg: pair {row['pair_id']}: its {META_COLUMN} cannot be used ({e})") from None
            if extra:
                meta[EXTRA_KEY] = extra
        else:
            o_ref, o_flu = (_order(row.get(f"{p}_study_order")) for p in ("prior", "followup"))
            o_ref = int(o_ref) if not np.isnan(o_ref) else order[(subj, s_ref)]
            o_flu = int(o_flu) if not np.isnan(o_flu) else order[(subj, s_flu)]
            name = f"i{o_ref:02d}s{s_ref}-i{o_flu:02d}s{s_flu}"
            split = _str(row.get("split")) or "unsplit"
            folder = out_root / ORIGIN_BRANCH.get(o, o) / "pa" / "1" / split / f"p{subj}" / name
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
                "reg_metric": _raw(REG_METRIC_COLUMN, row.get(REG_METRIC_COLUMN)),
                REG_SCORE_KEY: _raw("reg_score", row.get("reg_score")),
                "reference-diseases": _icg_label_dict(row, "prior"),
                "followup-diseases": _icg_label_dict(row, "followup"),
                "bmj-origin": o,
                EXTRA_KEY: extra,
            }
            if o in OPEN_ORIGINS and cred:
                meta[CREDENTIALED_KEY] = True
        plan.append((row, folder, name, meta))
    dup = pd.Series([str(f) for _, f, _, _ in plan]).duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise ValueError(f"write_icg: two pairs would be written to one folder {plan[i][1]} (pair {plan[i][0]['pair_id']})")
    rows = []
    for row, folder, name, meta in plan:
        folder.mkdir(parents=True, exist_ok=True)
        _copy_png(row["prior_path"], folder / f"{name}-ref-reg.png")
        _copy_png(row["registered_path"], folder / f"{name}-flu-reg.png")
        js = folder / f"{name}.json"
        atomic_write_bytes(js, (json.dumps(meta, indent=4, ensure_ascii=False) + "\n").encode("utf-8"))
        rows.append({"pair_id": row["pair_id"], "folder": str(folder), "json": str(js)})
    return pd.DataFrame(rows, columns=["pair_id", "folder", "json"])


# --------------------------------------------------------------------------- the chain's steps 02 and 03 on ICG-CXR

REGISTERED_BY_DATASET = ("registered by ICG-CXR (ProgEmu's affine mean-squares registration, its reg_metric in "
                         f"{REG_METRIC_COLUMN}); not registered again")


def registration_table(pairs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Step 02 for pairs ICG-CXR ships registered (-ref-reg.png, -flu-reg.png): nothing is registered again.

    Returns (registration table, kept pairs). The table has `registration.register_pairs`' columns: status
    'ok' with the reason REGISTERED_BY_DATASET, no score of the chain's (score_* NaN; ProgEmu's metric stays in
    REG_METRIC_COLUMN), `registered_path` = the shipped follow-up; the kept pairs are `pairs` as they are."""
    if pairs.empty:
        raise ValueError("ICG-CXR registration: no pair from step 01")
    not_icg = ~pairs["source"].astype(str).eq("icg") if "source" in pairs.columns else pd.Series(True, index=pairs.index)
    blank = pairs["registered_path"].fillna("").astype(str).eq("") if "registered_path" in pairs.columns else not_icg
    if (not_icg | blank).any():
        first = pairs.loc[not_icg | blank, "pair_id"].iloc[0]
        raise ValueError(f"ICG-CXR registration: pair {first} is not an ICG-CXR pair with its registered follow-up "
                         "(source icg, registered_path): register it with registration.register_pairs")
    reg = pd.DataFrame({"pair_id": pairs["pair_id"], "status": "ok", "reason": REGISTERED_BY_DATASET,
                        "score_before": np.nan, "score_after": np.nan, "score_flipped": np.nan, "affine": "",
                        "overlap": np.nan, "iterations": np.nan,
                        REG_METRIC_COLUMN: pairs[REG_METRIC_COLUMN] if REG_METRIC_COLUMN in pairs else np.nan,
                        "registered_path": pairs["registered_path"]}).reset_index(drop=True)
    reg.attrs["threshold"], reg.attrs["floor"] = float("nan"), float("nan")
    return reg, pairs.reset_index(drop=True)


def description_step(run_dir):
    """Step 03 for ICG-CXR pairs: each pair's own `progression-description` is its description (the dataset's
    instruction; no LLM is called, so no text leaves the machine). 02_registration/pairs.csv ->
    03_descriptions/{pairs,failures}.csv + run.json, as `progression.run_step` writes them; a pair without a
    description is a failure with its reason. Returns a `progression.DescribeResult`."""
    t0 = time.perf_counter()
    src = resolve(run_dir) / "02_registration" / "pairs.csv"
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist: run step 02 (registration) first")
    ids = {c: str for c in ("pair_id", "subject_id", "prior_study_id", "followup_study_id", "prior_dicom_id",
                            "followup_dicom_id", "description", "split")}
    try:
        pairs = pd.read_csv(src, dtype=ids, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise progression.NoPairsError(f"{src}: empty file (no header, no rows): rerun step 02") from None
    if pairs.empty:
        raise progression.NoPairsError(f"{src}: 0 pairs: every pair failed or was rejected in step 02")
    if "description" not in pairs.columns:
        raise ValueError(f"{src}: no description column: not ICG-CXR pairs (source icg); describe them with "
                         "progression.run_step")
    has = pairs["description"].fillna("").str.strip() != ""
    out = step_dir(run_dir, "03_descriptions")
    described = pairs[has].copy()
    described["instruction_impression"] = [progression.instruction_impression(r)
                                           for r in described.to_dict("records")]
    failures = pd.DataFrame({"pair_id": pairs.loc[~has, "pair_id"],
                             "reason": "the ICG-CXR JSON has no progression-description", "attempts": 0,
                             "backend": "dataset", "model": ""},
                            columns=["pair_id", "reason", "attempts", "backend", "model"])
    decision = "ICG-CXR's own progression-description: no LLM call, nothing sent anywhere"
    atomic_write_csv(out / "pairs.csv", described.reset_index(drop=True))
    atomic_write_csv(out / "failures.csv", failures.reset_index(drop=True))
    atomic_write_json(out / "run.json", {"backend": "dataset", "model": "", "host": "", "source": "icg",
                                         "decision": decision, "pairs_in": len(pairs), "described": int(has.sum()),
                                         "failed": int((~has).sum()), "calls": 0, "cached": 0})
    if not has.any():
        raise progression.NoPairsError(f"{src}: none of the {len(pairs)} ICG-CXR pairs has a progression-description")
    return progression.DescribeResult(described.reset_index(drop=True), failures.reset_index(drop=True), decision,
                                      0, 0, time.perf_counter() - t0)
