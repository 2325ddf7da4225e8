"""Cohort building: PA images, patient journeys, consecutive pairs, splits, counts (paper §3, App. A.1, Fig. 7).

From the records of any data source (`bmjlib.data.sources`) to the pairs the rest of the chain uses:

1. **PA only** (§3: "we only use posteroanterior (PA) ... and discard AP and lateral views"), as recorded
   in the metadata; mislabeled views are caught later by the registration score (notebook 02). The profile's
   `views` departs from the paper for cohorts that are mostly bedside films: "PA,AP", or "frontal" (PA, AP
   and their variants such as "AP AXIAL"); the counts table names the views kept.
2. **Journeys**: each patient's PA studies ordered by StudyDate + StudyTime; one image per study (the first
   PA dicom_id in sorted order when a study has several); **consecutive** studies form candidate pairs.
   Studies at the same time form one time point, and pairs join every study of a time point with every
   study of the next one (for MIMIC, times are distinct and this is simply consecutive studies).
3. **Positive-finding filter** (§3: "we prioritize studies with at least one finding as identified by
   CheXpert and filter the rest"): a candidate pair is kept when at least one of its two studies has a
   CheXpert label equal to 1 among the 12 observations other than "No Finding" and "Support Devices";
   pairs whose two studies are both negative / uncertain / blank are dropped. Data with no such label at
   all (a CSV cohort without labels; ICG-CXR's CheXpertPlus branch, whose labels are -100 but "No Finding")
   cannot be filtered: the filter is then not applicable, skipped with a message, and the counts table says so.
4. **Partition** (§3): MIMIC's p10-p18 folders are split into train / validation by patient (a seeded
   permutation, `val_fraction` of patients to validation), p19 is the test set. Sources without MIMIC
   folders send a seeded `test_fraction` of patients to test first.

Stage-1 images (§4.2) are the train/val-partition PA images with a non-empty IMPRESSION.

A source that ships its own pairs (ICG-CXR) gives the candidates as they are (registered, in the dataset's
split); the views and the positive-finding filter apply to them in the same way.

Every pair carries its source and `credentialed` (true if either image's record is; see
`bmjlib.data.sources`), so the data-use guard of notebook 03 decides from the rows. A cohort that ends
with no pair raises `CohortError`, one line naming the data and the stage where the pairs ran out.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from bmjlib.data.sources import SourceError
from bmjlib.io import Manifest, atomic_write_text, fingerprint, save_figure, sha256_file
from bmjlib.schema import CHEXPERT_LABELS, PAIR_COLUMNS, label_col
from bmjlib.text.llm import require_bool

# `views: frontal`: any frontal view, PA or AP, also with a qualifier as MIMIC-CXR records it ("AP AXIAL", "PA LLD").
FRONTAL = "FRONTAL"
FRONTAL_RE = r"^(?:PA|AP)(?:\s|$)"
# CheXpert observations that do not count as a finding for the positive-finding filter.
NOT_FINDINGS = ("No Finding", "Support Devices")
FINDING_LABELS = [c for c in CHEXPERT_LABELS if c not in NOT_FINDINGS]
# The paper's MIMIC-CXR numbers, set beside ours in the counts table (§3, App. A.1).
PAPER_COUNTS = {"PA image-report pairs": 157148, "stage-1 images (train/val PA with impression)": 69846,
                "train pairs": 9354, "val pairs": 1056, "test pairs": 1214}


# Columns after PAIR_COLUMNS and the labels: where the pair's text comes from, and whether it is credentialed.
PROVENANCE = ["source", "credentialed"]


class CohortError(SourceError):
    """A cohort with no pair left; the message names the data and the stage where the pairs ran out."""


@dataclass
class Cohort:
    records: pd.DataFrame     # every usable image, with `split` (by patient)
    candidates: pd.DataFrame  # consecutive pairs of `views` (or the pairs a source ships) before the filters
    pairs: pd.DataFrame       # PAIR_COLUMNS + prior_/followup_ labels + times + PROVENANCE, after the filter
    stage1: pd.DataFrame      # image-report rows for stage 1
    problems: pd.DataFrame    # skipped inputs (path, problem)
    settings: dict
    duplicates: int = 0       # repeated input rows removed by the reader
    positive_filter: str = "applied"  # "applied" | "off" (require_positive false) | "not applicable" (no labels)
    shipped: bool = False     # the source shipped its pairs (ICG-CXR): candidates are those, before `views`


def parse_views(views) -> tuple[str, ...]:
    """The profile's `views` ("PA" | "PA,AP" | "frontal"; or a tuple of names) -> upper-case view names."""
    items = views.split(",") if isinstance(views, str) else list(views)
    out = tuple(dict.fromkeys(str(v).strip().upper() for v in items if str(v).strip()))
    if not out:
        raise ValueError(f"views {views!r}: empty; give the views to keep, e.g. PA, PA,AP or frontal")
    return out


def view_mask(view: pd.Series, views) -> pd.Series:
    """True where a recorded view is one of `views` (FRONTAL: any PA or AP view)."""
    views = parse_views(views)
    v = view.fillna("").astype(str).str.strip().str.upper()
    keep = v.isin(views)
    if FRONTAL in views:
        keep |= v.str.contains(FRONTAL_RE, regex=True)
    return keep


def views_label(views) -> str:
    """How the counts table names the views kept: "PA", "PA+AP", "frontal"."""
    return "+".join("frontal" if v == FRONTAL else v for v in parse_views(views))


def has_positive_finding(labels: pd.DataFrame) -> pd.Series:
    """True where any of FINDING_LABELS is exactly 1 (positive; -1 uncertain and blank do not count)."""
    return (labels[FINDING_LABELS] == 1).any(axis=1)


def assign_splits(records: pd.DataFrame, seed: int = 0, val_fraction: float = 0.1,
                  test_fraction: float = 0.1) -> pd.Series:
    """Split by patient: partition p19 -> test, p10-p18 -> train/val; without partitions, a seeded test share.

    Returns a Series subject_id -> "train" | "val" | "test". Deterministic from `seed`.
    """
    subj = records.groupby("subject_id")["partition"].first().sort_index()
    rng = np.random.default_rng(seed)
    split = pd.Series("train", index=subj.index, dtype=object)
    known = subj != ""
    split[known & (subj == "p19")] = "test"
    unknown = subj.index[~known].to_numpy()
    if len(unknown):
        unknown = rng.permutation(unknown)
        n_test = int(round(test_fraction * len(unknown)))
        split[unknown[:n_test]] = "test"
    pool = rng.permutation(split.index[split == "train"].to_numpy())
    split[pool[: int(round(val_fraction * len(pool)))]] = "val"
    split.name = "split"
    return split


def consecutive_pairs(records: pd.DataFrame, views: tuple[str, ...] | str = ("PA",)) -> pd.DataFrame:
    """Candidate pairs: consecutive time points of each patient's studies of `views` (see module doc)."""
    rec = records[view_mask(records["view"], views)].sort_values(["subject_id", "study_time", "study_id", "dicom_id"])
    # One image per study: the first in sorted dicom_id order.
    study = rec.sort_values("dicom_id").drop_duplicates(["subject_id", "study_id"])
    study = study.sort_values(["subject_id", "study_time", "study_id"])
    rows = []
    for sid, g in study.groupby("subject_id", sort=True):
        points = [grp for _, grp in g.groupby("study_time", sort=True)]
        for a, b in zip(points, points[1:]):
            for _, p in a.iterrows():
                for _, f in b.iterrows():
                    rows.append((p, f))
    return _pair_table(rows)


def _pair_table(rows) -> pd.DataFrame:
    cols = PAIR_COLUMNS + [label_col(w, l) for w in ("prior", "followup") for l in CHEXPERT_LABELS]
    out = []
    for p, f in rows:
        r = {"pair_id": f"{p.subject_id}_{p.study_id}_{f.study_id}", "subject_id": p.subject_id,
             "split": p.get("split", ""),
             "prior_dicom_id": p.dicom_id, "followup_dicom_id": f.dicom_id,
             "prior_study_id": p.study_id, "followup_study_id": f.study_id,
             "prior_path": p.image_path, "followup_path": f.image_path,
             "prior_findings": p.findings, "prior_impression": p.impression,
             "followup_findings": f.findings, "followup_impression": f.impression,
             "age": p.age, "sex": p.sex, "race": p.race,
             "prior_time": p.study_time, "followup_time": f.study_time, "source": p.get("source", ""),
             "credentialed": _flag(p.get("credentialed", True)) or _flag(f.get("credentialed", True))}
        for l in CHEXPERT_LABELS:
            r[label_col("prior", l)] = p[l]
            r[label_col("followup", l)] = f[l]
        out.append(r)
    return pd.DataFrame(out, columns=cols + ["prior_time", "followup_time"] + PROVENANCE)


def _flag(v) -> bool:
    """A record's `credentialed` value; anything but an explicit false counts as credentialed."""
    return not (v is False or str(v).strip().lower() in ("false", "0", "0.0"))


def build_cohort(data, views: tuple[str, ...] | str = ("PA",), require_positive: bool = True, seed: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.1) -> Cohort:
    """Records of a source (`sources.SourceData`) -> pairs, splits and stage-1 images (module docstring).

    `views`: the profile's `views` ("PA", "PA,AP", "frontal") or a tuple of view names."""
    require_positive = require_bool("require_positive", require_positive)
    views = parse_views(views)
    rec = data.records.copy()
    split = assign_splits(rec, seed, val_fraction, test_fraction)
    rec["split"] = rec["subject_id"].map(split)
    shipped = data.pairs is not None
    if shipped:  # ICG-CXR: the dataset's own pairs (already registered), of the views asked for
        cand = data.pairs.copy()
        if "split" not in cand.columns or (cand["split"].fillna("") == "").all():
            cand["split"] = cand["subject_id"].map(split)
        else:  # the dataset's split decides its patients' images too (stage 1 never sees a test patient)
            own = cand[cand["split"].fillna("") != ""].groupby("subject_id")["split"].first()
            rec["split"] = rec["subject_id"].map(own).fillna(rec["split"])
        of_view = view_mask(cand["view"], views) if "view" in cand.columns else pd.Series(True, index=cand.index)
    else:
        cand = consecutive_pairs(rec, views)
        of_view = pd.Series(True, index=cand.index)
    filt = "off"
    keep = of_view.copy()
    if require_positive and len(cand):
        label_cols = [label_col(w, l) for w in ("prior", "followup") for l in FINDING_LABELS]
        if cand.reindex(columns=label_cols).notna().to_numpy().any():
            pri = cand[[label_col("prior", l) for l in FINDING_LABELS]].set_axis(FINDING_LABELS, axis=1)
            fol = cand[[label_col("followup", l) for l in FINDING_LABELS]].set_axis(FINDING_LABELS, axis=1)
            keep &= has_positive_finding(pri) | has_positive_finding(fol)
            filt = "applied"
        else:
            filt = "not applicable"
    elif require_positive:
        filt = "applied"
    pairs = cand[keep.to_numpy()].reset_index(drop=True)
    if pairs.empty:
        why = _why_no_pairs(rec, cand, views, of_view if shipped else None)
        raise CohortError(f"{getattr(data, 'origin', '') or 'data source'}: 0 pairs: {why}")
    pa = rec[view_mask(rec["view"], views)]
    stage1 = pa[pa["split"].isin(["train", "val"]) & (pa["impression"].str.strip() != "")].reset_index(drop=True)
    settings = {"views": list(views), "require_positive": require_positive, "seed": seed,
                "val_fraction": val_fraction, "test_fraction": test_fraction}
    return Cohort(rec, cand, pairs, stage1, data.problems, settings, getattr(data, "duplicates", 0), filt, shipped)


def views_note(c: Cohort) -> str:
    """One line on the views kept: how many images are of them, and which views the data have."""
    views = views_label(c.settings["views"])
    kept = int(view_mask(c.records["view"], c.settings["views"]).sum())
    found = ", ".join(f"{v or 'blank'} {n}" for v, n in c.records["view"].value_counts().items())
    return f"views: {views}: {kept} of {len(c.records)} images (views in the data: {found})"


def positive_filter_note(c: Cohort) -> str:
    """One line on the positive-finding filter of this cohort (printed by notebook 01)."""
    if c.positive_filter == "not applicable":
        return (f"require_positive: not applicable: none of the {len(c.candidates)} candidate pairs has a CheXpert "
                f"finding label (1, 0 or -1) in either study, so the filter was skipped; all {len(c.pairs)} pairs "
                "of the views kept are used")
    if c.positive_filter == "off":
        return f"require_positive: false: the positive-finding filter is off; {len(c.pairs)} pairs kept"
    return (f"positive-finding filter (require_positive: true): {len(c.pairs)} of {len(c.candidates)} candidate "
            "pairs have a positive CheXpert finding in either study")


def _why_no_pairs(rec: pd.DataFrame, cand: pd.DataFrame, views, of_view: pd.Series | None = None) -> str:
    """Where the pairs ran out, and which setting removed them, in words (for CohortError). `of_view`: which of
    the pairs a source ships are of `views` (None: the pairs were built from the records)."""
    shown = views_label(views)
    hint = "views: PA,AP or views: frontal keeps bedside AP films"
    if rec.empty:
        return "no usable image"
    if of_view is not None:
        if cand.empty:
            return "the dataset ships no pair"
        if not of_view.any():
            found = ", ".join(f"{v or 'blank'} {n}" for v, n in cand["view"].value_counts().head(5).items())
            return (f"none of the {len(cand)} pairs the dataset ships has view {shown} (views found: {found}); "
                    f"the `views` setting removed them ({hint})")
        n_view = int(of_view.sum())
    else:
        in_view = view_mask(rec["view"], views)
        n_view = int(in_view.sum())
        if n_view == 0:
            found = ", ".join(f"{v or 'blank'} {n}" for v, n in rec["view"].value_counts().head(5).items())
            return (f"none of the {len(rec)} images has view {shown} (views found: {found}); the `views` setting "
                    f"removed them ({hint})")
        if cand.empty:
            return (f"no patient has two {shown} studies at different times ({n_view} {shown} images of "
                    f"{rec.loc[in_view, 'subject_id'].nunique()} patients)")
    n_cand = n_view if of_view is not None else len(cand)
    return (f"none of the {n_cand} candidate pairs has a positive CheXpert finding in either study: the "
            f"positive-finding filter removed them all (require_positive: false keeps them)")


def counts_table(c: Cohort) -> pd.DataFrame:
    """The §3 counts: images, image-report pairs of the views kept (PA in the paper), stage-1 images, candidate
    and kept pairs per split. Rows name the views kept and what the positive-finding filter did."""
    views = views_label(c.settings["views"])
    pa = c.records[view_mask(c.records["view"], c.settings["views"])]
    pa_report = pa[(pa["impression"].str.strip() != "") | (pa["findings"].str.strip() != "")]
    if c.shipped:
        n_view = (int(view_mask(c.candidates["view"], c.settings["views"]).sum()) if "view" in c.candidates.columns
                  else len(c.candidates))
        cand_rows = [("pairs shipped by the dataset (registered)", len(c.candidates)),
                     (f"shipped pairs of view {views}", n_view)]
    else:
        cand_rows = [(f"candidate consecutive {views} pairs", len(c.candidates))]
    kept = {"applied": "pairs with >= 1 positive finding",
            "off": "pairs kept (positive-finding filter off: require_positive false)",
            "not applicable": "pairs kept (positive-finding filter not applicable: no CheXpert finding labels)"}
    rows = [("patients", c.records["subject_id"].nunique()),
            ("images (all views)", len(c.records)),
            ("skipped inputs (unreadable / missing)", len(c.problems)),
            ("repeated input rows removed", c.duplicates),
            (f"{views} images", len(pa)),
            (f"{views} image-report pairs", len(pa_report)),
            (f"stage-1 images (train/val {views} with impression)", len(c.stage1)),
            *cand_rows,
            (kept[c.positive_filter], len(c.pairs))]
    for s in ("train", "val", "test"):
        rows.append((f"{s} pairs", int((c.pairs["split"] == s).sum())))
    for s in ("train", "val", "test"):
        rows.append((f"{s} patients", int(c.records.loc[c.records["split"] == s, "subject_id"].nunique())))
    df = pd.DataFrame(rows, columns=["item", "ours"])
    df["paper (MIMIC-CXR)"] = df["item"].map(PAPER_COUNTS).astype("Int64")
    return df


def plot_demographics(c: Cohort, fig_dir: str | Path, name: str = "fig7_demographics") -> list[Path]:
    """Fig. 7 analogue: age distribution and sex / race composition of the pair cohort per split (seaborn)."""
    matplotlib.use(matplotlib.get_backend())
    if c.pairs.empty:
        raise CohortError("Fig. 7: the cohort has no pair to plot (build_cohort names the filter that removed them)")
    p = c.pairs.drop_duplicates("subject_id")[["subject_id", "split", "age", "sex", "race"]].copy()
    p["split"] = pd.Categorical(p["split"], ["train", "val", "test"])
    panels = ["age", "sex"] + (["race"] if (p["race"].fillna("") != "").any() else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    sns.histplot(data=p, x="age", hue="split", stat="density", common_norm=False, element="step",
                 bins=15, ax=axes[0])
    axes[0].set_title("(a) age per split (patients in pairs)")
    for ax, col, tag in zip(axes[1:], panels[1:], "bc"):
        short = p[col].fillna("").replace("", "unknown").str.split("/").str[0].str.title()  # "BLACK/AFRICAN ..." -> "Black"
        frac = (p.assign(v=short).groupby("split", observed=False)["v"]
                .value_counts(normalize=True).rename("fraction").reset_index())
        sns.barplot(data=frac, x="v", y="fraction", hue="split", ax=ax)
        ax.set_xlabel(col)
        ax.set_title(f"({tag}) {col} per split")
        ax.tick_params(axis="x", rotation=30)
        for t in ax.get_xticklabels():
            t.set_ha("right")
    fig.tight_layout()
    paths = save_figure(fig, fig_dir, name)
    plt.close(fig)
    return paths


def write_cohort(c: Cohort, out: str | Path) -> dict[str, Path]:
    """Write records.csv, pairs.csv, stage1.csv, counts.csv, problems.csv (atomic), recorded in manifest.json."""
    out = Path(out)
    files = {"records.csv": c.records, "candidates.csv": c.candidates, "pairs.csv": c.pairs,
             "stage1.csv": c.stage1, "counts.csv": counts_table(c), "problems.csv": c.problems}
    man = Manifest(out / "manifest.json")
    key = fingerprint(c.settings)
    for name, df in files.items():
        text = df.to_csv(index=False)
        path = out / name
        if not (path.exists() and path.read_text() == text):  # a rerun with equal content touches nothing
            atomic_write_text(path, text)
        man.record(name, key)
    man.save()
    return {k: out / k for k in files}


def write_data_manifest(pairs: pd.DataFrame, records: pd.DataFrame, manifest_dir: str | Path, tag: str,
                        root: str | Path | None = None) -> list[Path]:
    """Committed, reviewable lists (DESIGN: data_manifest/): pairs with sha256 of inputs, splits by patient.

    Paths are written relative to `root` (the data root) so the lists do not depend on where a run lives.
    The registered images' sha256 are listed by notebook 02 (`registration.write_registration_manifest`).
    Files are rewritten only when their content changes.
    """
    d = Path(manifest_dir)
    rel = (lambda p: str(Path(p).relative_to(root)) if root and str(p).startswith(str(root)) else str(p))
    pl = pairs[["pair_id", "subject_id", "split", "prior_path", "followup_path"]].copy()
    cache: dict[str, str] = {}
    h = lambda p: cache.setdefault(p, sha256_file(p))
    pl["prior_sha256"] = [h(p) for p in pl["prior_path"]]
    pl["followup_sha256"] = [h(p) for p in pl["followup_path"]]
    pl["prior_path"] = [rel(p) for p in pl["prior_path"]]
    pl["followup_path"] = [rel(p) for p in pl["followup_path"]]
    sp = records.groupby("subject_id")["split"].first().reset_index().sort_values("subject_id")
    written = []
    for name, df in ((f"{tag}_pairs.csv", pl.sort_values("pair_id")), (f"{tag}_splits.csv", sp)):
        path = d / name
        text = df.to_csv(index=False)
        if not (path.exists() and path.read_text() == text):
            atomic_write_text(path, text)
        written.append(path)
    return written


def check_against_phantom(c: Cohort, truth_dir: str | Path) -> pd.DataFrame:
    """Our counts beside the numbers the phantom generator recorded in its truth files.

    Candidate pairs must equal truth/pairs.csv (consecutive studies whose image is recorded PA); kept pairs
    must include every pair with a finding of grade >= 2 in either study (never hedged in a report) and
    lie within the pairs with any finding (a grade-1 finding may be reported as uncertain, -1).
    """
    t = Path(truth_dir)
    img = pd.read_csv(t / "images.csv", dtype={"subject_id": str, "study_id": str})
    tp = pd.read_csv(t / "pairs.csv", dtype={"subject_id": str, "prior_study_id": str, "followup_study_id": str})
    sev = img.groupby("study_id")[[c for c in img.columns if c.endswith("_sev")]].max().max(axis=1)
    worst = np.maximum(tp["prior_study_id"].map(sev).to_numpy(), tp["followup_study_id"].map(sev).to_numpy())
    kept = set(c.pairs["pair_id"])
    must, may = set(tp.loc[worst >= 2, "pair_id"]), set(tp.loc[worst >= 1, "pair_id"])
    rows = [("PA images (recorded)", int((img["view_recorded"] == "PA").sum()),
             int(c.records["view"].eq("PA").sum())),
            ("candidate consecutive PA pairs", len(tp), len(c.candidates)),
            ("candidate pair ids identical", True, set(tp["pair_id"]) == set(c.candidates["pair_id"])),
            ("kept pairs with a grade>=2 finding", len(must), len(must & kept)),
            ("kept pairs without any finding", 0, len(kept - may)),
            ("test patients (p19)", int(img.loc[img["subject_id"].str.startswith("19"), "subject_id"].nunique()),
             int(c.records.loc[c.records["split"] == "test", "subject_id"].nunique()))]
    df = pd.DataFrame(rows, columns=["check", "phantom truth", "cohort"])
    df["match"] = [a == b for a, b in zip(df["phantom truth"], df["cohort"])]
    return df
