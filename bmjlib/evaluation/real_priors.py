"""The trained model on real chest X-rays (beyond the paper; the validity probes of `validity` on real priors).

A model trained on the phantom is used by people on their own radiographs, so notebook 06 edits real priors
(../shared/real_cxr/hannover, CC BY 3.0) with two sentences whose right answer needs no follow-up:

- "No change." must keep the image: `null_ssim` is the SSIM of the output to the prior through the model's
  VAE (the best a latent model can return), as `validity.null_edit_ssim`;
- "New large right pleural effusion." must whiten the patient's right base (image left, radiological
  convention) and little else: `right_base_gain` is the mean grey-level gain of the output over the prior
  through the VAE inside RIGHT_BASE, `left_base_gain` the same in its mirror image, and `elsewhere_change` the
  mean absolute change outside both bases.

The boxes are fixed fractions of the image (registered frontal radiographs roughly fill it), not organ
masks: the real images have none.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bmjlib.evaluation import metrics as M
from bmjlib.io import read_image, resize_image, save_figure, write_table
from bmjlib.schema import HANNOVER_ATTRIBUTION

PROMPTS = {"no_change": "No change.", "effusion": "New large right pleural effusion."}
# (row from, row to, column from, column to) as fractions of the image: the patient's right lung base.
RIGHT_BASE = (0.50, 0.90, 0.08, 0.48)


def base_boxes(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (size x size) of the patient's right base (image left) and its mirror, the left base."""
    r0, r1, c0, c1 = (int(round(f * size)) for f in RIGHT_BASE)
    right = np.zeros((size, size), bool)
    right[r0:r1, c0:c1] = True
    return right, right[:, ::-1].copy()


def pick_priors(real_dir: str | Path, n: int) -> pd.DataFrame:
    """One image per patient, PA films first, from a folder laid out as ../shared/real_cxr/hannover
    (data.csv with patient_id, image_id, projection; png/<image_id>.png)."""
    real_dir = Path(real_dir)
    meta = pd.read_csv(real_dir / "data.csv", dtype=str)
    missing = {"patient_id", "image_id", "projection"} - set(meta.columns)
    if missing:
        raise ValueError(f"{real_dir / 'data.csv'}: no column {', '.join(sorted(missing))}")
    meta["path"] = [str(real_dir / "png" / f"{i}.png") for i in meta["image_id"]]
    meta = meta[[Path(p).is_file() for p in meta["path"]]]
    meta = meta.assign(pa=meta["projection"].str.lower().eq("pa"))
    meta = meta.sort_values(["pa", "patient_id", "image_id"], ascending=[False, True, True])
    return meta.drop_duplicates("patient_id").head(n).drop(columns="pa").reset_index(drop=True)


def real_prior_edits(pipe, real_dir: str | Path, n_priors: int = 4, seed: int = 0,
                     **sampling) -> tuple[pd.DataFrame, dict]:
    """Edit `n_priors` real priors with each sentence of PROMPTS. `pipe` is a BiomedJourneyPipeline (or any
    object with its `__call__(priors, prompt, seed=, **sampling)`, `reconstruct(images, size)` and
    `image_size`). Returns (one row per prior with the measures of the module docstring, images: 'prior',
    'reference' (the prior through the VAE) and one N,H,W array per key of PROMPTS)."""
    meta = pick_priors(real_dir, n_priors)
    if meta.empty:
        raise ValueError(f"{real_dir}: no readable real prior")
    size = pipe.image_size
    priors = np.stack([resize_image(read_image(p), size) for p in meta["path"]])
    ref = np.clip(pipe.reconstruct(priors, size), 0, 1)
    images = {"prior": priors, "reference": ref}
    for key, prompt in PROMPTS.items():
        images[key] = np.clip(pipe(priors, prompt, seed=seed, **sampling), 0, 1)
    right, left = base_boxes(size)
    d = images["effusion"] - ref
    rows = meta[["patient_id", "image_id", "projection"]].assign(
        null_ssim=M.ssim(images["no_change"], ref), effusion_ssim=M.ssim(images["effusion"], ref),
        right_base_gain=d[:, right].mean(1), left_base_gain=d[:, left].mean(1),
        elsewhere_change=np.abs(d[:, ~(right | left)]).mean(1))
    return rows, images


def real_prior_figure(rows: pd.DataFrame, images: dict, fig_dir, name: str = "fig_real_priors"):
    """Prior | "No change." | its difference | "New large right pleural effusion." | its difference, per real
    prior; differences to the prior through the VAE (red = denser), the right-base box drawn; attributed."""
    right, _ = base_boxes(images["prior"].shape[-1])
    ys, xs = np.nonzero(right)
    n = len(rows)
    fig, axes = plt.subplots(n, 5, figsize=(11, 2.4 * n + 0.6), squeeze=False, layout="constrained")
    lim = 0.25
    for i, r in enumerate(rows.itertuples()):
        panels = [(images["prior"][i], "gray", f"real prior ({r.projection.upper()})"),
                  (images["no_change"][i], "gray", f'"{PROMPTS["no_change"]}"  SSIM {r.null_ssim:.2f}'),
                  (images["no_change"][i] - images["reference"][i], "RdBu_r", "difference"),
                  (images["effusion"][i], "gray", f'"{PROMPTS["effusion"]}"'),
                  (images["effusion"][i] - images["reference"][i], "RdBu_r",
                   f"difference: R base {r.right_base_gain:+.3f}, L base {r.left_base_gain:+.3f}")]
        for ax, (im, cmap, title) in zip(axes[i], panels):
            kw = dict(vmin=0, vmax=1) if cmap == "gray" else dict(vmin=-lim, vmax=lim)
            ax.imshow(im, cmap=cmap, **kw)
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 4].add_patch(plt.Rectangle((xs.min() - 0.5, ys.min() - 0.5), np.ptp(xs) + 1, np.ptp(ys) + 1,
                                           fill=False, ec="k", lw=0.8, ls="--"))
    fig.suptitle("The shipped model on real priors (patient's right = image left; box: the right base)",
                 fontsize=9)
    fig.supxlabel("Real images: " + HANNOVER_ATTRIBUTION, fontsize=6)
    paths = save_figure(fig, fig_dir, name, dpi=130, bbox_inches=None)
    summary = rows.drop(columns=["patient_id", "image_id", "projection"]).mean().to_frame("mean").T
    write_table(pd.concat([rows, summary.assign(patient_id="mean")], ignore_index=True), fig_dir,
                "table_real_priors", note="\nReal images: " + HANNOVER_ATTRIBUTION + "\n")
    return fig, paths
