"""Data sources: every dataset yields the same image records (paper §3, App. A.1; DESIGN "Data sources").

`load_source(source, root)` returns a `SourceData` whose `records` table has schema.RECORD_COLUMNS plus
the 14 CheXpert label columns, one row per image, whatever the source:

- ``"mimic"`` / ``"phantom"``: the MIMIC-CXR-JPG v2 layout (``files/p1X/pXXXXXXXX/sYYYYYYYY/<dicom>.jpg``,
  reports ``sYYYYYYYY.txt``, ``mimic-cxr-2.0.0-metadata.csv`` / ``-chexpert.csv``, and MIMIC-IV
  ``patients.csv`` / ``admissions.csv`` for age, sex and race). The phantom writes exactly this layout.
- ``"csv"``: a bring-your-own cohort, one CSV row per image (see `read_csv_cohort`).
- ``"icg"``: ICG-CXR pair folders, read by `bmjlib.data.icg.read_icg_records`, which also returns the pairs
  (ICG-CXR ships registered pairs with their own progression descriptions: the cohort step takes them as they
  are, step 02 does not register them again, step 03 calls no LLM). ICG-CXR gives study orders, not dates:
  their `study_time` stays empty (NaT).

Bad input never becomes silent zeros: an image file that is missing (or, with ``verify_images``,
truncated / blank / undecodable) and a report file that is absent each drop that image with a message
naming the file and the problem; `SourceData.problems` lists them and the caller counts them. Repeated
rows (the same image twice) are removed and counted (`SourceData.duplicates`). A file that is empty,
unparseable or has a header only, and a source with no usable image left, raise `SourceError`, one line
naming the file and the problem.

Every record carries `credentialed` (does its report text fall under a credentialed data use agreement?),
decided by the reader, never by a profile's name for the source alone: the phantom folder written by step
00 is not credentialed; MIMIC-CXR, CheXpert Plus and ICG-CXR are (ICG-CXR rows as the ICG reader marks
them); a bring-your-own CSV is, unless the profile declares ``data_credentialed: false``, and its rows whose
image paths have the MIMIC-CXR-JPG shape stay credentialed whatever the profile says. The column goes
with the pairs through every step, and the LLM data-use guard reads it.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bmjlib.data.icg import read_icg
from bmjlib.io import ImageError, atomic_write_csv, read_image
from bmjlib.runtime import resolve
from bmjlib.schema import CHEXPERT_LABELS, RECORD_COLUMNS
from bmjlib.text.llm import declared_credentialed, require_bool
from bmjlib.text.reports import parse_sections as _parse

log = logging.getLogger("bmjlib.data.sources")

MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
MIMIC_CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"
# Day offsets of a bring-your-own cohort become timestamps from this epoch (only the order matters).
EPOCH = pd.Timestamp("2000-01-01")
# Columns every record carries after RECORD_COLUMNS + CHEXPERT_LABELS.
PROVENANCE_COLUMNS = ["credentialed"]
# What a reader knows of its source; any other source (csv included) is credentialed unless declared not.
CREDENTIALED_BY_SOURCE = {"phantom": False, "mimic": True, "chexpertplus": True, "icg": True}
# An image path in the MIMIC-CXR(-JPG) layout (files/p1X/pNNNNNNNN/sNNNNNNNN/<dicom>.jpg, or converted).
MIMIC_PATH_RE = re.compile(r"(?:^|[/\\])files[/\\]p1\d[/\\]p\d{8}[/\\]s\d{8}[/\\][^/\\]+\.(?:jpg|jpeg|png|dcm)$", re.I)


class SourceError(ValueError):
    """A data source that leaves nothing usable (empty, header only, every row bad); names the file."""


@dataclass
class SourceData:
    records: pd.DataFrame                      # RECORD_COLUMNS + CHEXPERT_LABELS + credentialed, one row per image
    pairs: pd.DataFrame | None = None          # only for sources that ship their pairs (ICG-CXR)
    problems: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "problem"]))
    duplicates: int = 0                        # repeated rows removed (the same image listed again)
    origin: str = ""                           # the file or folder read, for messages downstream

    def report(self) -> str:
        """One line per kind of problem with its count, e.g. 'skipped 2 images: file does not exist (2)'."""
        dup = f"; removed {self.duplicates} repeated rows" if self.duplicates else ""
        if self.problems.empty:
            return "no problems: every image and report was readable" + dup
        kinds = self.problems["problem"].str.split("(").str[0].str.strip().value_counts()
        return f"skipped {len(self.problems)} images: " + "; ".join(f"{k} ({v})" for k, v in kinds.items()) + dup


def load_source(source: str, root: str | Path, verify_images: bool = False, credentialed: str | bool = "auto",
                **kw) -> SourceData:
    """Read a data source into records. `root`: the dataset folder (for "csv": the CSV file).

    `credentialed`: the profile's data_credentialed (auto | true | false; see the module docstring).
    """
    root = Path(root)
    declared = declared_credentialed(credentialed)
    verify_images = require_bool("verify_images", verify_images)
    if source in ("mimic", "phantom"):
        data = read_mimic(root, verify_images=verify_images, source=source, **kw)
    elif source == "csv":
        data = read_csv_cohort(root, verify_images=verify_images, **kw)
    elif source == "icg":
        records, pairs, skipped = read_icg(root, check_images=verify_images, **kw)
        if records.empty:
            first = f" (first: {skipped.iloc[0]['path']}: {skipped.iloc[0]['problem']})" if len(skipped) else ""
            raise SourceError(f"{root}: no usable ICG-CXR pair folder ({len(skipped)} skipped){first}")
        data = SourceData(_conform(records, "icg"), pairs, skipped.reset_index(drop=True), origin=str(root))
    else:
        raise ValueError(f"unknown data source {source!r}: expected mimic, phantom, csv or icg")
    return mark_credentialed(data, source, declared)


def mark_credentialed(data: SourceData, source: str, declared: str | bool = "auto") -> SourceData:
    """Set each record's (and shipped pair's) `credentialed` from the reader's knowledge and the profile's
    declaration (module docstring). A declared true marks everything; a declared false opens only sources
    the project cannot classify (csv) and never rows whose paths have the MIMIC-CXR-JPG shape."""
    rec = data.records
    known = CREDENTIALED_BY_SOURCE.get(source)
    if source == "phantom" and data.origin and not is_phantom_folder(data.origin):
        log.warning("%s: read as the phantom but not written by step 00 (no summary.json and truth/ beside it): "
                    "treated as credentialed", data.origin)
        known = True
    if source == "icg":
        flags = rec["credentialed"].fillna(True).astype(bool)
    elif known is not None:
        flags = pd.Series(known, index=rec.index)
    else:
        flags = pd.Series(declared is not False, index=rec.index)
        looks_mimic = rec["image_path"].astype(str).str.contains(MIMIC_PATH_RE)
        if declared is False and looks_mimic.any():
            log.warning("%s: %d rows have MIMIC-CXR-JPG image paths and stay credentialed although "
                        "data_credentialed is false", data.origin, int(looks_mimic.sum()))
        flags = flags | looks_mimic
    if declared is True:
        flags = pd.Series(True, index=rec.index)
    elif declared is False and known:
        log.warning("data_credentialed: false is ignored for source %s: its reader knows the data are credentialed",
                    source)
    rec = rec.assign(credentialed=flags.astype(bool).to_numpy())
    pairs = data.pairs
    if pairs is not None:  # a shipped pair is credentialed if it says so or either of its images is
        by_image = dict(zip(rec["image_path"], rec["credentialed"]))
        own = (pairs["credentialed"].fillna(True).astype(bool).tolist() if "credentialed" in pairs.columns
               else [True] * len(pairs))
        blank = [""] * len(pairs)
        prior, follow = (pairs[c].tolist() if c in pairs.columns else blank for c in ("prior_path", "followup_path"))
        pairs = pairs.assign(credentialed=[declared is True or o or bool(by_image.get(a) or by_image.get(b))
                                           for a, b, o in zip(prior, follow, own)])
    return SourceData(rec, pairs, data.problems, data.duplicates, data.origin)


def is_phantom_folder(root: str | Path) -> bool:
    """True for the `mimic/` folder step 00 writes: its parent holds the generator's summary.json and truth/."""
    parent = Path(root).parent
    return (parent / "summary.json").is_file() and (parent / "truth").is_dir()


def read_table(path: Path, what: str, **kw) -> pd.DataFrame:
    """pd.read_csv with every way a file can hold nothing usable turned into one SourceError naming it."""
    try:
        df = pd.read_csv(path, **kw)
    except pd.errors.EmptyDataError:
        raise SourceError(f"{path}: {what} is empty (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{path}: {what} cannot be parsed as CSV ({first})") from None
    if df.empty:
        raise SourceError(f"{path}: {what} has a header but no rows")
    return df


def _nothing_left(origin, summary: str, problems: list[tuple[str, str]]) -> SourceError:
    """The one-line error of a source with no usable image: where, how many went, and the first reason."""
    first = f"; first: {problems[0][0]}: {problems[0][1]}" if problems else ""
    return SourceError(f"{origin}: no usable image left: {summary} ({len(problems)} problems{first})")


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
    meta = read_table(_need(root / MIMIC_METADATA, "metadata CSV"), "metadata CSV",
                      dtype={"dicom_id": str, "subject_id": str, "study_id": str})
    labels = read_table(_need(root / MIMIC_CHEXPERT, "CheXpert labels CSV"), "CheXpert labels CSV",
                        dtype={"subject_id": str, "study_id": str})
    need = [c for c in ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime")
            if c not in meta.columns]
    if need:
        raise SourceError(f"{root / MIMIC_METADATA}: columns missing: {need}")
    missing = [c for c in ["subject_id", "study_id", *CHEXPERT_LABELS] if c not in labels.columns]
    if missing:
        raise ValueError(f"{root / MIMIC_CHEXPERT}: label columns missing: {missing}")
    n_meta, n_labels = len(meta), len(labels)
    meta = meta.drop_duplicates().drop_duplicates("dicom_id")
    labels = labels.drop_duplicates().drop_duplicates(["subject_id", "study_id"])
    duplicates = (n_meta - len(meta)) + (n_labels - len(labels))
    if duplicates:
        log.warning("%s: removed %d repeated rows (%d metadata, %d labels; the first of each kept)", root,
                    duplicates, n_meta - len(meta), n_labels - len(labels))
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
    if df.empty:
        raise _nothing_left(root / MIMIC_METADATA, f"all {len(keep)} images it lists were skipped", problems)
    df["findings"] = [sections[r].get("findings", "") for r in df["report_path"]]
    df["impression"] = [sections[r].get("impression", "") for r in df["report_path"]]
    out = SourceData(_conform(df, source), problems=pd.DataFrame(problems, columns=["path", "problem"]),
                     duplicates=duplicates, origin=str(root))
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
    raw = read_table(csv_path, "cohort CSV", dtype=str, keep_default_na=False)
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
    n_rows = len(raw)
    raw = raw.drop_duplicates()
    duplicates = n_rows - len(raw)
    if duplicates:
        log.warning("%s: removed %d repeated rows", csv_path, duplicates)
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
    no_id = (df["subject_id"].str.strip() == "").to_numpy()
    problems += [(p, "no patient id") for p in df.loc[no_id & ~bad_time.to_numpy(), "image_path"]]
    exists = np.array([Path(p).is_file() for p in df["image_path"]], dtype=bool)
    ok = ~bad_time.to_numpy() & ~no_id
    problems += [(p, "image file does not exist") for p in df.loc[~exists & ok, "image_path"]]
    df = df[exists & ok]
    # the same image file in two valid rows with other values: the first row is kept, the others are problems
    again = df["image_path"].duplicated().to_numpy()
    problems += [(p, "image listed again with other values (first row kept)") for p in df.loc[again, "image_path"]]
    df = df[~again]
    if df.empty:
        raise _nothing_left(csv_path, f"all {n_rows} rows were skipped", problems)
    out = SourceData(_conform(df, "csv"), problems=pd.DataFrame(problems, columns=["path", "problem"]),
                     duplicates=duplicates, origin=str(csv_path))
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
    new = pd.DataFrame([(p, m) for _, p, m in bad], columns=["path", "problem"])
    problems = pd.concat([data.problems, new], ignore_index=True) if len(new) else data.problems
    kept = rec.drop(index=[i for i, _, _ in bad]).reset_index(drop=True)
    if kept.empty:
        raise _nothing_left(data.origin or "data source", f"none of the {len(rec)} images decodes",
                            [tuple(r) for r in new.itertuples(index=False)])
    return SourceData(kept, data.pairs, problems, data.duplicates, data.origin)


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
    if "credentialed" not in df.columns:
        df["credentialed"] = True  # until mark_credentialed decides; never open by default
    return df[RECORD_COLUMNS + CHEXPERT_LABELS + PROVENANCE_COLUMNS].reset_index(drop=True)


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
