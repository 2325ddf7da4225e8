"""How good the registration is: accuracy against the phantom's true transforms, the mislabeled-view filter,
speed beside ProgEmu's configuration, and the Fig. 8 analogue (paper §3, App. A.4, Fig. 8).

- **TRE** (target registration error): for a pair with an estimated transform, the distance in pixels
  between where the estimated and the true prior->follow-up affine send each pixel of the prior's lung
  fields (truth masks; a central grid when no mask is there), expressed at 256 px (distances scaled by
  256 / the image's longer side). Reported as the mean over pairs of the per-pair mean, and the 95th
  percentile over pairs; only pairs whose two images are truly PA count: all those with an estimated
  transform (whatever their status), and separately the kept (``ok``) ones.
- **Filter quality**: recall of the mislabeled pairs (either image not truly PA) among the pairs removed
  (status other than ``ok``), and the number / share of good pairs wrongly removed.
- **Benchmark**: the same truly-PA pairs registered by our configuration and by ProgEmu's `register_chexpertplus.py`
  configuration (`registration.PROGEMU`), one after the other in one process with one ITK thread, each at its
  own resolution (ours 256 px, ProgEmu's 512 px) and each at the other's (so speed and TRE also compare at
  equal resolution); per pair the seconds (reading, resizing, registering, resampling and scoring) and the TRE
  against the phantom's true transform. `bmjlib.bench.registration` adds the bootstrap intervals and writes
  the published table.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from bmjlib.data.registration import (PROGEMU, RegConfig, apply_affine, parse_affine, register_pair, resample,
                                      set_itk_threads)
from bmjlib.data.sources import mimic_image_path
from bmjlib.io import read_image, resize_image, save_figure
from bmjlib.phantom.cohort import write_cohort
from bmjlib.schema import HANNOVER_ATTRIBUTION

FIG8_CREDIT = "Images: " + HANNOVER_ATTRIBUTION


def _tre_points(truth_dir: Path, dicom_id: str, shape: tuple[int, int], max_points: int = 2000) -> np.ndarray:
    m = truth_dir / "masks" / f"{dicom_id}.npz"
    if m.exists():
        with np.load(m) as z:
            keys = [k for k in ("left_lung", "right_lung") if k in z.files]
            mask = np.any([z[k] for k in keys], axis=0) if keys else None
        if mask is not None and mask.any():
            yy, xx = np.nonzero(mask)
            step = max(1, len(xx) // max_points)
            return np.stack([xx[::step], yy[::step]], 1).astype(float)
    h, w = shape
    yy, xx = np.mgrid[0.15 * h:0.85 * h:max(1, h // 32), 0.15 * w:0.85 * w:max(1, w // 32)]
    return np.stack([xx.ravel(), yy.ravel()], 1)


def pair_tre(est: np.ndarray, true: np.ndarray, pts: np.ndarray, shape: tuple[int, int]) -> float:
    """Mean TRE (px at 256) of one pair over `pts` (prior pixels)."""
    d = np.linalg.norm(apply_affine(est, pts) - apply_affine(true, pts), axis=1)
    return float(d.mean() * 256.0 / max(shape))


def phantom_accuracy(reg: pd.DataFrame, truth_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """Join a registration table with the phantom truth -> (per-pair table, summary dict)."""
    truth_dir = Path(truth_dir)
    tp = pd.read_csv(truth_dir / "pairs.csv", dtype={"subject_id": str, "prior_dicom_id": str})
    df = reg.merge(tp[["pair_id", "prior_dicom_id", "affine", "any_mislabeled"]].rename(columns={"affine": "true_affine"}),
                   on="pair_id", how="inner")
    df["any_mislabeled"] = df["any_mislabeled"].astype(str).str.lower().isin(["true", "1"])
    view = pd.read_csv(truth_dir / "images.csv", usecols=["dicom_id", "view_true"], dtype=str).set_index("dicom_id")["view_true"]
    tv = tp.set_index("pair_id")
    pv, fv = (df["pair_id"].map(tv[c]).map(view) for c in ("prior_dicom_id", "followup_dicom_id"))
    df["true_views"] = pv.fillna("?") + "->" + fv.fillna("?")
    shapes: dict[str, tuple[int, int]] = {}
    tre, tre0 = [], []
    for r in df.itertuples(index=False):
        if not r.affine or not isinstance(r.affine, str):
            tre.append(np.nan), tre0.append(np.nan)
            continue
        shape = shapes.setdefault(r.prior_dicom_id, _shape_of(truth_dir, r.prior_dicom_id, r))
        pts = _tre_points(truth_dir, r.prior_dicom_id, shape)
        true = parse_affine(r.true_affine)
        tre.append(pair_tre(parse_affine(r.affine), true, pts, shape))
        tre0.append(pair_tre(np.array([[1.0, 0, 0], [0, 1.0, 0]]), true, pts, shape))
    df["tre_px256"], df["tre_before_px256"] = tre, tre0
    good = df[~df["any_mislabeled"]]
    g = good["tre_px256"].dropna()
    removed = df["status"] != "ok"
    kept = good.loc[good["status"] == "ok", "tre_px256"].dropna()
    n_mis = int(df["any_mislabeled"].sum())
    summary = {
        "pairs": len(df), "truly PA pairs": len(good), "mislabeled pairs": n_mis,
        "TRE mean (px @256)": float(g.mean()) if len(g) else np.nan,
        "TRE p95 (px @256)": float(np.percentile(g, 95)) if len(g) else np.nan,
        "TRE max (px @256)": float(g.max()) if len(g) else np.nan,
        "TRE mean, kept pairs (px @256)": float(kept.mean()) if len(kept) else np.nan,
        "TRE p95, kept pairs (px @256)": float(np.percentile(kept, 95)) if len(kept) else np.nan,
        "TRE before registration mean (px @256)": float(good["tre_before_px256"].dropna().mean()) if len(g) else np.nan,
        "good pairs with TRE <= 1 px": float((g <= 1).mean()) if len(g) else np.nan,
        "recall of mislabeled pairs removed": float(removed[df["any_mislabeled"]].mean()) if n_mis else np.nan,
        "recall of pairs with a true lateral removed": _recall(removed, df["true_views"].str.contains("LATERAL")),
        "recall of pairs with a true AP removed": _recall(removed, df["any_mislabeled"] & ~df["true_views"].str.contains("LATERAL")),
        "good pairs wrongly removed": int(removed[~df["any_mislabeled"]].sum()),
        "good pairs wrongly removed (share)": float(removed[~df["any_mislabeled"]].mean()) if len(good) else np.nan,
        "  of which misregistered (TRE > 2 px)": int((good.loc[good["status"] != "ok", "tre_px256"] > 2).sum()),
    }
    return df, summary


def _recall(removed: pd.Series, positive: pd.Series) -> float:
    return float(removed[positive].mean()) if positive.any() else float("nan")


def _shape_of(truth_dir: Path, dicom_id: str, row) -> tuple[int, int]:
    m = truth_dir / "masks" / f"{dicom_id}.npz"
    if m.exists():
        with np.load(m) as z:
            return tuple(z[z.files[0]].shape)
    path = getattr(row, "prior_path", None)
    return read_image(path).shape if path else (256, 256)


def score_histogram(acc: pd.DataFrame, threshold: float, fig_dir, name: str = "registration_scores"):
    """Registration score after registration, truly PA pairs vs mislabeled, with the threshold."""
    d = acc.dropna(subset=["score_after"]).assign(
        pair=lambda x: np.where(x["any_mislabeled"], "mislabeled view", "truly PA"))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    sns.histplot(data=d, x="score_after", hue="pair", bins=30, element="step", ax=ax)
    ax.axvline(threshold, color="k", ls="--", lw=1)
    ax.set_xlabel("registration score (NCC after registration)")
    ax.set_title("phantom: score by true view, threshold dashed")
    fig.tight_layout()
    paths = save_figure(fig, fig_dir, name)
    plt.close(fig)
    return paths


def plot_fig8(prior_path, followup_path, affine, fig_dir, name: str = "fig8_registration",
              attribution: str = "") -> list[Path]:
    """Fig. 8 analogue: top row prior, follow-up before registration, |difference|; bottom row prior, the
    registered follow-up, |difference|. `affine`: the prior->follow-up transform (six numbers or 2x3)."""
    prior, follow = read_image(prior_path), read_image(followup_path)
    M = parse_affine(affine) if isinstance(affine, str) else np.asarray(affine)
    before = resize_image(follow, prior.shape)
    after, valid = resample(follow, M, prior.shape)
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.4))
    rows = [("before registration", before, np.ones_like(valid)), ("after registration", after, valid)]
    for ax_row, (label, img, v) in zip(axes, rows):
        diff = np.where(v, np.abs(prior - img), 0)
        for ax, im, title, cmap in zip(ax_row, (prior, img, diff),
                                       ("prior (fixed)", f"follow-up, {label}", f"|prior - follow-up|, {label}"),
                                       ("gray", "gray", "magma")):
            ax.imshow(im, cmap=cmap, vmin=0, vmax=1 if cmap == "gray" else 0.6)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    if attribution:
        fig.text(0.5, 0.01, attribution, ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    paths = save_figure(fig, fig_dir, name)
    plt.close(fig)
    return paths


def phantom_pairs(phantom_dir: str | Path) -> pd.DataFrame:
    """The phantom's truth pairs with their image paths in its MIMIC layout."""
    phantom_dir = Path(phantom_dir)
    tp = pd.read_csv(phantom_dir / "truth" / "pairs.csv", dtype=str)
    root = phantom_dir / "mimic"
    tp["prior_path"] = [str(mimic_image_path(root, s, st, d))
                        for s, st, d in zip(tp["subject_id"], tp["prior_study_id"], tp["prior_dicom_id"])]
    tp["followup_path"] = [str(mimic_image_path(root, s, st, d))
                           for s, st, d in zip(tp["subject_id"], tp["followup_study_id"], tp["followup_dicom_id"])]
    return tp


def benchmark_arms(ours: RegConfig = RegConfig(), baseline: RegConfig = PROGEMU) -> list[tuple[str, RegConfig, bool]]:
    """(method, configuration, at its own resolution) of the benchmark: each configuration at its own size and,
    when the two sizes differ, each at the other's."""
    arms = [("ours", ours, True), ("progemu", baseline, True)]
    if ours.size != baseline.size:
        arms += [("ours", replace(ours, size=baseline.size), False), ("progemu", replace(baseline, size=ours.size), False)]
    return sorted(arms, key=lambda a: (a[0] != "ours", a[1].size))


def benchmark(phantom_dir: str | Path | None = None, n_pairs: int = 12, ours: RegConfig = RegConfig(),
              baseline: RegConfig = PROGEMU, seed: int = 0, phantom_size: int = 512, log=print) -> dict:
    """Ours vs ProgEmu's configuration on the same truly-PA phantom pairs (`benchmark_arms`); prints and returns
    the figures.

    Without `phantom_dir`, a phantom at `phantom_size` px (512: ProgEmu's own resolution is then native, and ours
    downsamples like it would from a real image) is written to a temporary folder first. Every image is read
    once before timing (warm file cache for every arm); then each arm registers every pair in this process
    with one ITK thread. Returns {"pairs", "phantom_dir", "phantom_size", "per_pair" (one row per arm and pair:
    method, size_px, own_resolution, pair_id, status, seconds, cpu_seconds, tre_px256), "arms" (one row per arm:
    pairs/s = pairs / summed per-pair seconds, the same in CPU time, TRE mean and p95 at 256 px, failed or
    diverged), "ours" and "progemu" (each
    at its own resolution, as dicts), "speedup" (ours / ProgEmu, each at its own resolution)}.
    """
    tmp = None
    if phantom_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bmj_regbench_")
        phantom_dir = Path(tmp.name)
        write_cohort(phantom_dir, n_patients=max(8, n_pairs), size=phantom_size, seed=seed, workers=None)
    phantom_dir = Path(phantom_dir)
    tp = phantom_pairs(phantom_dir)
    tp = tp[~tp["any_mislabeled"].str.lower().isin(["true", "1"])]
    tp = tp.sample(n=min(n_pairs, len(tp)), random_state=seed).sort_values("pair_id")
    for r in tp.itertuples(index=False):
        read_image(r.prior_path), read_image(r.followup_path)
    size = read_image(tp["prior_path"].iloc[0]).shape[0] if len(tp) else phantom_size
    set_itk_threads(1)
    rows, arms = [], []
    for method, cfg, own in benchmark_arms(ours, baseline):
        regs = []
        for r in tp.itertuples(index=False):
            c0 = time.process_time()  # CPU time too: what an idle core would give on a shared machine
            row = register_pair(r.prior_path, r.followup_path, cfg)
            regs.append({"pair_id": r.pair_id, **row, "cpu_seconds": time.process_time() - c0})
        reg = pd.DataFrame(regs)
        acc, s = phantom_accuracy(reg, phantom_dir / "truth")
        per = reg[["pair_id", "status", "seconds", "cpu_seconds"]].merge(acc[["pair_id", "tre_px256"]], on="pair_id",
                                                                          how="left")
        rows.append(per.assign(method=method, size_px=cfg.size, own_resolution=own))
        arms.append({"method": method, "size_px": cfg.size, "own_resolution": own, "pairs": len(per),
                     "config": f"{cfg.transform}, {cfg.metric}, {cfg.optimizer}, {len(cfg.shrink)} level(s), "
                               f"{cfg.sampling} sampled, {cfg.size} px",
                     "pairs_per_s": len(per) / per["seconds"].sum() if len(per) else np.nan,
                     "cpu_pairs_per_s": len(per) / per["cpu_seconds"].sum() if len(per) else np.nan,
                     "seconds": float(per["seconds"].sum()),
                     "tre_mean_px256": s["TRE mean (px @256)"], "tre_p95_px256": s["TRE p95 (px @256)"],
                     "failed_or_diverged": int(per["status"].isin(["failed", "diverged"]).sum())})
    arms = pd.DataFrame(arms)
    per_pair = pd.concat(rows, ignore_index=True)[["method", "size_px", "own_resolution", "pair_id", "status",
                                                   "seconds", "cpu_seconds", "tre_px256"]]
    own = {m: arms[(arms["method"] == m) & arms["own_resolution"]].iloc[0].to_dict() for m in ("ours", "progemu")}
    result = {"pairs": len(tp), "phantom_dir": str(phantom_dir), "phantom_size": int(size), "per_pair": per_pair,
              "arms": arms, **own, "speedup": own["ours"]["pairs_per_s"] / own["progemu"]["pairs_per_s"]}
    result["tre_not_worse"] = bool(own["ours"]["tre_mean_px256"] <= own["progemu"]["tre_mean_px256"])
    if log:
        log(f"registration benchmark on {len(tp)} truly-PA phantom pairs ({size} px images; 1 ITK thread, one process):")
        for v in arms.to_dict("records"):
            log(f"  {v['method']:8s} {v['size_px']:4d} px{' (own)' if v['own_resolution'] else '      '} "
                f"{v['pairs_per_s']:7.2f} pairs/s  TRE mean {v['tre_mean_px256']:.3f} px, p95 {v['tre_p95_px256']:.3f} "
                f"px @256  failed/diverged {v['failed_or_diverged']}  [{v['config']}]")
        log(f"  each at its own resolution: ours x{result['speedup']:.1f} the pairs/s of ProgEmu's configuration")
    if tmp is not None:
        tmp.cleanup()
    return result
