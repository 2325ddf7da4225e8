"""Figures and speed of the phantom cohort: gallery, finding distribution, one journey, benchmark.

Shown by notebook 00 (DESIGN "The phantom cohort"); the gallery is `figures/phantom_gallery.png`.
"""
from __future__ import annotations

import multiprocessing as mp
import textwrap
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from bmjlib.io import read_image, resize_image, save_figure
from bmjlib.phantom.anatomy import render
from bmjlib.phantom.body import Exposure, Pose
from bmjlib.phantom.body import State
from bmjlib.phantom.body import State as S
from bmjlib.phantom.body import image_ctr
from bmjlib.phantom.cohort import KEYS, plan_patient, sample_patient
from bmjlib.schema import FINDINGS, HANNOVER_ATTRIBUTION

GALLERY = [  # (title, state, side, view, devices, female)
    ("normal PA (F)", {}, {}, "PA", (), True),
    ("normal PA (M)", {}, {}, "PA", (), False),
    ("lateral", {}, {}, "LATERAL", (), False),
    ("AP + devices", {}, {}, "AP", ("ett", "central_line", "ng_tube", "ecg_leads"), False),
    ("cardiomegaly 1", {"cardiomegaly": 1}, {}, "PA", (), False),
    ("cardiomegaly 2", {"cardiomegaly": 2}, {}, "PA", (), False),
    ("cardiomegaly 3", {"cardiomegaly": 3}, {}, "PA", ("pacemaker",), False),
    ("effusion R 1", {"effusion": 1}, {"effusion": "right"}, "PA", (), True),
    ("effusion L 2", {"effusion": 2}, {"effusion": "left"}, "PA", (), True),
    ("effusion bilat 3", {"effusion": 3}, {"effusion": "bilateral"}, "PA", (), True),
    ("edema 1", {"edema": 1}, {"edema": "bilateral"}, "PA", (), False),
    ("edema 2", {"edema": 2}, {"edema": "bilateral"}, "PA", (), False),
    ("edema 3 + cardiomegaly", {"edema": 3, "cardiomegaly": 2}, {"edema": "bilateral"}, "AP", ("ecg_leads",), False),
    ("atelectasis bibasilar 1", {"atelectasis": 1}, {"atelectasis": "bilateral"}, "PA", (), True),
    ("atelectasis R 2", {"atelectasis": 2}, {"atelectasis": "right"}, "PA", (), True),
    ("atelectasis L 3", {"atelectasis": 3}, {"atelectasis": "left"}, "PA", (), True),
    ("pneumothorax R 1", {"pneumothorax": 1}, {"pneumothorax": "right"}, "PA", (), False),
    ("pneumothorax L 2", {"pneumothorax": 2}, {"pneumothorax": "left"}, "PA", (), False),
    ("pneumothorax L 3", {"pneumothorax": 3}, {"pneumothorax": "left"}, "PA", (), False),
    ("rotated 7 deg, expiration", {}, {}, "PA", (), True),
]


def gallery(size: int = 256, seed: int = 0, path: str | Path | None = None):
    """A grid of phantom radiographs: normal anatomy, every finding at each grade, views, devices."""
    rng = np.random.default_rng(seed)
    women = [sample_patient(rng, 10000000 + i) for i in range(40)]
    f = next(p for p in women if p.sex == "F" and 50 < p.age < 75)
    m = next(p for p in women if p.sex == "M" and 50 < p.age < 75)
    cols = 5
    rows = int(np.ceil(len(GALLERY) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.6))
    for ax, (title, sev, side, view, dev, fem) in zip(axes.ravel(), GALLERY):
        pose = Pose(rot_deg=7.0, inspiration=-1.0, tx=size * 0.03) if "rotated" in title else Pose()
        st = State(sev=sev, side=side)
        p = f if fem else m
        img = render(p, st, pose, Exposure(), view=view, size=size, noise_seed=seed, devices=dev)
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        sub = f"CTR {image_ctr(p, st, view):.2f}" if view != "LATERAL" else ""
        ax.set_title(f"{title}\n{sub}", fontsize=8)
        ax.axis("off")
    for ax in axes.ravel()[len(GALLERY):]:
        ax.axis("off")
    fig.suptitle(f"Phantom chest radiographs ({size} px): grades 1/2/3 as defined in bmjlib.phantom.anatomy",
                 fontsize=10)
    fig.tight_layout()
    if path:
        path = Path(path)
        save_figure(fig, path.parent, path.stem, dpi=110, bbox_inches=None, formats=(path.suffix[1:],))
    return fig


def finding_table(out: str | Path):
    """Counts of images by finding and grade (frontal images, ground truth)."""
    df = pd.read_csv(Path(out) / "truth" / "images.csv", keep_default_na=False)
    df = df[df.view_true != "LATERAL"]
    long = pd.concat([pd.DataFrame({"finding": k, "grade": df[f"{k}_sev"]}) for k in KEYS])
    return long.groupby(["finding", "grade"]).size().unstack(fill_value=0)


def plot_distribution(out: str | Path, path: str | Path | None = None):
    """Seaborn bars: images per finding and grade, and the CheXpert label values of the reports."""
    table = finding_table(out).reset_index().melt(id_vars="finding", var_name="grade", value_name="images")
    chex = pd.read_csv(Path(out) / "mimic" / "mimic-cxr-2.0.0-chexpert.csv")
    lab = chex[FINDINGS].melt(var_name="finding", value_name="label")
    lab["label"] = lab["label"].map({1.0: "1 positive", 0.0: "0 negative", -1.0: "-1 uncertain"}).fillna("blank")
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8))
    sns.barplot(table, x="finding", y="images", hue="grade", ax=a, palette="rocket_r")
    a.set_title("Ground truth: frontal images per finding and grade (0 = absent)")
    sns.countplot(lab, x="finding", hue="label", ax=b, hue_order=["1 positive", "-1 uncertain", "0 negative", "blank"],
                  palette="mako")
    b.set_title("Reports: CheXpert labels per study")
    for ax in (a, b):
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    if path:
        path = Path(path)
        save_figure(fig, path.parent, path.stem, dpi=110, bbox_inches=None, formats=(path.suffix[1:],))
    return fig


def plot_journey(out: str | Path, subject_id: int | None = None, path: str | Path | None = None):
    """One patient's frontal images over time, with each study's true state and impression."""
    out = Path(out)
    df = pd.read_csv(out / "truth" / "images.csv", keep_default_na=False)
    front = df[(df.view_true == "PA") & (df.view_recorded == "PA")]
    if subject_id is None:  # the longest journey with the most change
        score = front.groupby("subject_id").apply(
            lambda g: len(g) + sum(g[f"{k}_sev"].nunique() for k in KEYS), include_groups=False)
        subject_id = int(score.idxmax())
    g = front[front.subject_id == subject_id].sort_values("study_index")
    fig, axes = plt.subplots(1, len(g), figsize=(2.8 * len(g), 3.9), squeeze=False)
    for ax, r in zip(axes[0], g.itertuples()):
        ax.imshow(read_image(out / "mimic" / r.image_path), cmap="gray")
        sid = str(r.subject_id)
        txt = (out / "mimic" / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{r.study_id}.txt").read_text()
        imp = txt.split("IMPRESSION:")[-1].strip() if "IMPRESSION:" in txt else "(no impression)"
        state = ", ".join(f"{k[:4]} {getattr(r, k + '_sev')}{getattr(r, k + '_side')[:1].upper()}"
                          for k in KEYS if getattr(r, k + "_sev")) or "normal"
        ax.set_title(f"study {r.study_index}: {state}", fontsize=8)
        ax.set_xlabel("\n".join(_wrap(" ".join(imp.split()), 38)[:4]), fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Journey of phantom patient {subject_id}", fontsize=10)
    fig.tight_layout()
    if path:
        path = Path(path)
        save_figure(fig, path.parent, path.stem, dpi=110, bbox_inches=None, formats=(path.suffix[1:],))
    return fig


def _wrap(s, n):
    return textwrap.wrap(s, n)


def _bench_patient(args):
    seed, index, size = args
    t0 = time.process_time()
    plan = plan_patient(seed, index, size)
    n = 0
    for st in plan["studies"]:
        state = S(sev={k: v[0] for k, v in st["state"].items()}, side={k: v[1] for k, v in st["state"].items()})
        for im in st["images"]:
            render(plan["patient"], state, im["pose"], im["exposure"], view=im["view_true"], size=size,
                   noise_seed=im["noise_seed"], devices=st["devices"], masks=True)
            n += 1
    return n, time.process_time() - t0


def benchmark(size: int = 256, n: int = 200, workers: int = 2, seed: int = 0) -> dict:
    """Measure rendering speed (images + organ masks, cohort-like journeys) in `workers` processes and
    print images/s: wall-clock, and from the CPU time the workers used (what idle cores would give, since
    a shared machine's load slows the wall clock). File writing is not included; write_cohort's summary
    reports end-to-end speed."""
    jobs, total, i = [], 0, 0

    while total < n:  # whole patients until at least n images
        k = sum(len(st["images"]) for st in plan_patient(seed, i, size)["studies"])
        jobs.append((seed, i, size))
        total += k
        i += 1
    t0 = time.perf_counter()
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_bench_patient, jobs, chunksize=1)
    else:
        parts = list(map(_bench_patient, jobs))
    dt = time.perf_counter() - t0
    done = sum(k for k, _ in parts)
    cpu = sum(c for _, c in parts)
    res = {"size": size, "images": done, "workers": workers, "seconds": round(dt, 3),
           "images_per_s": round(done / dt, 1), "cpu_ms_per_image": round(1000 * cpu / done, 2),
           "images_per_s_idle_cores": round(workers * done / cpu, 1)}
    print(f"phantom render: {done} images of {size} px (with masks) in {dt:.2f} s on {workers} worker(s): "
          f"{done / dt:.1f} images/s wall-clock; {1000 * cpu / done:.1f} ms CPU per image -> "
          f"{workers * done / cpu:.1f} images/s on {workers} idle cores")
    return res


HANNOVER_CREDIT = "Real images: " + HANNOVER_ATTRIBUTION


def compare_with_real(real_dir: str | Path, size: int = 256, n: int = 3, seed: int = 0,
                      path: str | Path | None = None):
    """Real PA radiographs (a folder of PNGs, with data.csv's `projection` when present) beside
    phantom PAs at the same size, with the grey-level histograms of both: how close the simulator is."""
    real_dir = Path(real_dir)
    files = sorted((real_dir / "png").glob("*.png")) or sorted(real_dir.glob("*.png"))
    meta = real_dir / "data.csv"
    if meta.exists():
        d = pd.read_csv(meta, dtype=str)
        pa = set(d.loc[d["projection"].str.lower() == "pa", "image_id"])
        files = [f for f in files if f.stem in pa] or files
    if not files:
        raise FileNotFoundError(f"{real_dir}: no PNG radiographs to compare with")

    real = [resize_image(read_image(f), size) for f in files[:n]]
    rng = np.random.default_rng(seed)
    ph = []
    for i in range(n):
        p = sample_patient(rng, 10000000 + i)
        ph.append(render(p, State(), Pose(), Exposure(), size=size, noise_seed=i) / 255.0)
    fig, axes = plt.subplots(2, n + 1, figsize=(2.6 * (n + 1), 5.6))
    for j in range(n):
        for row, (imgs, name) in enumerate(((real, "real"), (ph, "phantom"))):
            axes[row, j].imshow(imgs[j], cmap="gray", vmin=0, vmax=1)
            axes[row, j].set_title(f"{name} PA {j + 1}", fontsize=8)
            axes[row, j].axis("off")
    for row, (imgs, name) in enumerate(((real, "real"), (ph, "phantom"))):
        ax = axes[row, n]
        ax.hist(np.concatenate([i.ravel() for i in imgs]), bins=64, range=(0, 1), color="0.3")
        ax.set_title(f"{name}: grey levels", fontsize=8)
        ax.set_yticks([])
    fig.text(0.5, 0.005, HANNOVER_CREDIT, ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    if path:
        path = Path(path)
        save_figure(fig, path.parent, path.stem, dpi=110, bbox_inches=None, formats=(path.suffix[1:],))
    return fig
