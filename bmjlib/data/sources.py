"""Data sources: every dataset yields the same image records (paper §3, App. A.1; DESIGN "Data sources").

`load_source(source, root)` returns a `SourceData` whose `records` table has schema.RECORD_COLUMNS plus
the 14 CheXpert label columns, one row per image, whatever the source:

- ``"mimic"`` / ``"phantom"``: the MIMIC-CXR-JPG v2 layout (``files/p1X/pXXXXXXXX/sYYYYYYYY/<dicom>.jpg``,
  reports ``sYYYYYYYY.txt``, ``mimic-cxr-2.0.0-metadata.csv`` / ``-chexpert.csv``, and MIMIC-IV
  ``patients.csv`` / ``admissions.csv`` for age, sex and race). The phantom writes exactly this layout.
- ``"csv"``: a bring-your-own cohort, one CSV row per image (see `read_csv_cohort`).
- ``"icg"``: ICG-CXR pair folders, read by `bmjlib.data.icg.read_icg_records`, which also returns the pairs
  (ICG-CXR ships pre-registered pairs, so the cohort step takes them as they are).

Bad input never becomes silent zeros: an image file that is missing (or, with ``verify_images``,
truncated / blank / undecodable) and a report file that is absent each drop that image with a message
naming the file and the problem; `SourceData.problems` lists them and the caller counts them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bmjlib.data.icg import read_icg_records
from bmjlib.io import ImageError, atomic_write_csv, read_image
from bmjlib.runtime import resolve
from bmjlib.schema import CHEXPERT_LABELS, RECORD_COLUMNS
from bmjlib.text.reports import parse_sections as _parse

MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
MIMIC_CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"
# Day offsets of a bring-your-own cohort become timestamps from this epoch (only the order matters).
EPOCH = pd.Timestamp("2000-01-01")


@dataclass
class SourceData:
    records: pd.DataFrame                      # RECORD_COLUMNS + CHEXPERT_LABELS, one row per usable image
    pairs: pd.DataFrame | None = None          # only for sources that ship their pairs (ICG-CXR)
    problems: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "problem"]))

    def report(self) -> str:
        """One line per kind of problem with its count, e.g. 'skipped 2 images: file does not exist (2)'."""
        if self.problems.empty:
            return "no problems: every image and report was readable"
        kinds = self.problems["problem"].str.split("(").str[0].str.strip().value_counts()
        return f"skipped {len(self.problems)} images: " + "; ".join(f"{k} ({v})" for k, v in kinds.items())


def load_source(source: str, root: str | Path, verify_images: bool = False, **kw) -> SourceData:
    """Read a data source into records. `root`: the dataset folder (for "csv": the CSV file)."""
    root = Path(root)
    if source in ("mimic", "phantom"):
        return read_mimic(root, verify_images=verify_images, source=source, **kw)
    if source == "csv":
        return read_csv_cohort(root, verify_images=verify_images, **kw)
    if source == "icg":
        records, pairs = read_icg_records(root, check_images=verify_images, **kw)
        return SourceData(_conform(records, "icg"), pairs)
    raise ValueError(f"unknown data source {source!r}: expected mimic, phantom, csv or icg")


# --------------------------------------------------------------------------- MIMIC-CXR-JPG layout

def mimic_image_path(root: Path, subject_id: str, study_id: str, dicom_id: str) -> Path:
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}" / f"{dicom_id}.jpg"


def mimic_report_path(root: Path, subject_id: str, study_id: str) -> Path:
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}.txt"


def _study_time(date: pd.Series, time: pd.Series) -> pd.Series:
    """StudyDate (YYYYMMDD) + StudyTime (HHMMSS.fff, leading zeros dropped by the CSV) -> Timestamp."""
    day = pd.to_datetime(date.astype("Int64").astype(str), format="%Y%m%d", errors="coerce")
    t = pd.to_numeric(time, errors="coerce").fillna(0.0)
    hh, rest = np.divmod(t.to_numpy(), 10000)
    mm, ss = np.divmod(rest, 100)
    return day + pd.to_timedelta(hh * 3600 + mm * 60 + ss, unit="s")


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found (expected the MIMIC-CXR-JPG v2 layout)")
    return path


def read_mimic(root: str | Path, verify_images: bool = False, source: str = "mimic") -> SourceData:
    """Read the MIMIC-CXR-JPG layout (also the phantom's) into records; see the module docstring."""
    root = Path(root)
    meta = pd.read_csv(_need(root / MIMIC_METADATA, "metadata CSV"),
                       dtype={"dicom_id": str, "subject_id": str, "study_id": str})
    labels = pd.read_csv(_need(root / MIMIC_CHEXPERT, "CheXpert labels CSV"),
                         dtype={"subject_id": str, "study_id": str})
    missing = [c for c in CHEXPERT_LABELS if c not in labels.columns]
    if missing:
        raise ValueError(f"{root / MIMIC_CHEXPERT}: label columns missing: {missing}")
    df = meta.merge(labels[["subject_id", "study_id", *CHEXPERT_LABELS]], on=["subject_id", "study_id"], how="left")
    df["source"] = source
    df["view"] = df["ViewPosition"].fillna("").astype(str).str.upper()
    df["study_time"] = _study_time(df["StudyDate"], df["StudyTime"])
    df["partition"] = "p" + df["subject_id"].str[:2]
    df["image_path"] = [str(mimic_image_path(root, s, st, d))
                        for s, st, d in zip(df["subject_id"], df["study_id"], df["dicom_id"])]
    df["report_path"] = [str(mimic_report_path(root, s, st)) for s, st in zip(df["subject_id"], df["study_id"])]
    df = df.merge(_mimic_demographics(root, df), on="subject_id", how="left")

    problems = []
    keep = np.ones(len(df), dtype=bool)
    sections: dict[str, dict[str, str]] = {}
    for i, (img, rep) in enumerate(zip(df["image_path"], df["report_path"])):
        if not Path(img).exists():
            problems.append((img, "image file does not exist"))
            keep[i] = False
            continue
        if rep not in sections:
            try:
                sections[rep] = parse_sections(Path(rep).read_text(errors="replace"))
            except FileNotFoundError:
                sections[rep] = None
        if sections[rep] is None:
            problems.append((rep, f"report file absent (image {Path(img).name} skipped)"))
            keep[i] = False
    df = df[keep].copy()
    df["findings"] = [sections[r].get("findings", "") for r in df["report_path"]]
    df["impression"] = [sections[r].get("impression", "") for r in df["report_path"]]
    out = SourceData(_conform(df, source), problems=pd.DataFrame(problems, columns=["path", "problem"]))
    return verify(out) if verify_images else out


def _mimic_demographics(root: Path, df: pd.DataFrame) -> pd.DataFrame:
    """Age at the first study (MIMIC-IV anchor_age + years since anchor_year), sex, most frequent race.

    MIMIC-CXR dates are shifted consistently with MIMIC-IV, so anchor_year lines up with StudyDate.
    The files are optional: without them age/sex/race stay empty.
    """
    subj = pd.DataFrame({"subject_id": df["subject_id"].unique()})
    pth = root / "patients.csv"
    if pth.exists():
        p = pd.read_csv(pth, dtype={"subject_id": str})
        first = df.groupby("subject_id")["study_time"].min().dt.year.rename("year").reset_index()
        p = p.merge(first, on="subject_id", how="right")
        p["age"] = (p["anchor_age"] + (p["year"] - p["anchor_year"]).fillna(0)).clip(lower=0)
        p["sex"] = p["gender"].fillna("").astype(str).str.upper()
        subj = subj.merge(p[["subject_id", "age", "sex"]], on="subject_id", how="left")
    adm = root / "admissions.csv"
    if adm.exists():
        a = pd.read_csv(adm, dtype={"subject_id": str})
        col = "race" if "race" in a.columns else "ethnicity"  # MIMIC-IV v2 renamed ethnicity -> race
        if col in a.columns:
            race = (a.dropna(subset=[col]).groupby("subject_id")[col]
                    .agg(lambda s: s.value_counts().index[0]).rename("race").reset_index())
            subj = subj.merge(race, on="subject_id", how="left")
    return subj


def parse_sections(text: str) -> dict[str, str]:
    """Report sections with lower-case keys (findings, impression, ...): bmjlib.text.reports.parse_sections."""
    return _parse(text)


# --------------------------------------------------------------------------- bring-your-own CSV

CSV_ALIASES = {
    "subject_id": ["subject_id", "patient_id", "patient"],
    "image_path": ["image_path", "path", "image", "file"],
    "study_id": ["study_id", "study"],
    "study_time": ["study_time", "date", "study_date", "datetime"],
    "day": ["day", "day_offset", "days"],
    "view": ["view", "projection", "ViewPosition"],
    "report": ["report", "report_text"],
}


def read_csv_cohort(csv_path: str | Path, image_root: str | Path | None = None, verify_images: bool = False,
                    columns: dict[str, str] | None = None) -> SourceData:
    """A bring-your-own cohort: one CSV row per image.

    Required: a patient column (``subject_id`` / ``patient_id`` / ``patient``), an image path (``image_path``
    / ``path`` / ``image``; relative paths are taken from `image_root`, default the CSV's folder), and a time:
    a date (``study_time`` / ``date``) or a day offset (``day``). Optional: ``study_id`` (default: the image
    file's stem, one study per image), ``view`` (``PA``/``AP``/``LATERAL``; default empty = unknown), report
    text (``report``, split into sections) or ``findings`` / ``impression``, ``age``, ``sex``, ``race``, and
    any of the 14 CheXpert label columns. `columns` maps our name -> your column name where aliases miss.
    """
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path}: cohort CSV not found")
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    img_root = Path(image_root) if image_root is not None else csv_path.parent
    col = {}
    for ours, aliases in CSV_ALIASES.items():
        names = [columns[ours]] if columns and ours in columns else aliases
        col[ours] = next((c for c in names if c in raw.columns), None)
    for need in ("subject_id", "image_path"):
        if col[need] is None:
            raise ValueError(f"{csv_path}: no {need} column (tried {CSV_ALIASES[need]}); pass columns={{...}}")
    if col["study_time"] is None and col["day"] is None:
        raise ValueError(f"{csv_path}: needs a date column ({CSV_ALIASES['study_time']}) or a day offset "
                         f"({CSV_ALIASES['day']})")
    df = pd.DataFrame({"subject_id": raw[col["subject_id"]].astype(str)})
    paths = [Path(p) for p in raw[col["image_path"]]]
    df["image_path"] = [str(p if p.is_absolute() else (img_root / p).resolve()) for p in paths]
    df["dicom_id"] = [p.stem for p in paths]
    df["study_id"] = raw[col["study_id"]].astype(str) if col["study_id"] else df["dicom_id"]
    if col["study_time"]:
        df["study_time"] = pd.to_datetime(raw[col["study_time"]], errors="coerce")
    else:
        df["study_time"] = EPOCH + pd.to_timedelta(pd.to_numeric(raw[col["day"]], errors="coerce"), unit="D")
    bad_time = df["study_time"].isna()
    df["view"] = raw[col["view"]].str.upper() if col["view"] else ""
    if col["report"]:
        secs = [parse_sections(t) if t else {} for t in raw[col["report"]]]
        df["findings"] = [s.get("findings", "") for s in secs]
        df["impression"] = [s.get("impression", "") for s in secs]
    for c in ("findings", "impression", "age", "sex", "race", *CHEXPERT_LABELS):
        if c in raw.columns:
            df[c] = raw[c]
    for c in CHEXPERT_LABELS:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    if "age" in df.columns:
        df["age"] = pd.to_numeric(df["age"], errors="coerce")
    if "sex" in df.columns:
        df["sex"] = df["sex"].str.upper()
    df["source"] = "csv"
    df["partition"] = ""
    df["report_path"] = ""
    problems = [(p, "no valid date or day offset") for p in df.loc[bad_time, "image_path"]]
    exists = np.array([Path(p).exists() for p in df["image_path"]])
    problems += [(p, "image file does not exist") for p in df.loc[~exists & ~bad_time.to_numpy(), "image_path"]]
    df = df[exists & ~bad_time.to_numpy()]
    out = SourceData(_conform(df, "csv"), problems=pd.DataFrame(problems, columns=["path", "problem"]))
    return verify(out) if verify_images else out


# --------------------------------------------------------------------------- shared

def verify(data: SourceData, views: tuple[str, ...] | None = None) -> SourceData:
    """Decode every image (of `views`, default all) with io.read_image; drop and list the unreadable ones."""
    rec = data.records
    check = rec["view"].isin(views) if views else pd.Series(True, index=rec.index)
    bad = []
    for i, p in rec.loc[check, "image_path"].items():
        try:
            read_image(p)
        except ImageError as e:
            bad.append((i, e.path, e.problem))
    problems = pd.concat([data.problems, pd.DataFrame([(p, m) for _, p, m in bad], columns=["path", "problem"])],
                         ignore_index=True)
    return SourceData(rec.drop(index=[i for i, _, _ in bad]).reset_index(drop=True), data.pairs, problems)


def _conform(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Columns in schema order (RECORD_COLUMNS + labels), missing ones filled, ids as strings."""
    df = df.copy()
    for c in RECORD_COLUMNS:
        if c not in df.columns:
            df[c] = np.nan if c == "age" else ""
    for c in CHEXPERT_LABELS:
        if c not in df.columns:
            df[c] = np.nan
    for c in ("subject_id", "study_id", "dicom_id", "view", "findings", "impression", "sex", "race",
              "partition", "report_path"):
        df[c] = df[c].fillna("").astype(str)
    df["source"] = source
    df["age"] = pd.to_numeric(df["age"], errors="coerce")
    return df[RECORD_COLUMNS + CHEXPERT_LABELS].reset_index(drop=True)


def source_root(source: str, data_root: str | Path, run_dir: str | Path) -> Path:
    """Where a notebook reads its data: the phantom written by step 00 in the run folder, else `data_root`."""
    if source == "phantom":
        return resolve(run_dir) / "00_phantom" / "mimic"
    if not str(data_root):
        raise ValueError(f"source={source!r} needs data_root (the dataset folder, or the cohort CSV for 'csv')")
    return Path(data_root)


def hannover_cohort_csv(hannover_dir: str | Path, out_csv: str | Path) -> Path:
    """The Hannover COVID-19 repository's data.csv as a bring-your-own cohort CSV.

    One row per image: patient, image (absolute path to png/<image_id>.png), day (= -admission_offset:
    the repository counts days before admission as negative offsets of the exam), view (its projection),
    sex. Its pairs.csv (57 pairs of consecutive exam days) is exactly what the cohort step builds from this
    with views PA and AP.
    """
    h = Path(hannover_dir)
    d = pd.read_csv(h / "data.csv", dtype=str)
    byo = pd.DataFrame({"patient": d["patient_id"], "image": [str((h / "png" / f"{i}.png").resolve()) for i in d["image_id"]],
                        "day": -pd.to_numeric(d["admission_offset"]), "view": d["projection"].str.upper(),
                        "sex": d["sex"].str.upper()})
    return atomic_write_csv(out_csv, byo)
