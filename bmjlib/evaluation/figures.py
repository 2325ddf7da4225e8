"""Figures 3, 4, 5 and 9 of the paper on the chain's test pairs (paper §5.2, §5.4.2, App. A.4).

- Fig. 3: one prior, BiomedJourney counterfactuals for several descriptions, and the finding judge's
  Grad-CAM attention map for the finding each description names;
- Fig. 4: one prior and description, every model's output beside the real (registered) follow-up;
- Fig. 5: the anatomy judge's organ masks on the prior, the reference and every output;
- Fig. 9: a severity sweep (slight / moderate / large; our grade-1 word is "small") of one finding from one prior.

Pairs are picked by a rule fixed before looking at outputs (the test pair whose labels change most,
ties by pair_id), never by how good a model's output looks. Figures are written as PNG and PDF.
"""
from __future__ import annotations

import textwrap
from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from bmjlib.evaluation.counterfactuals import load_outputs
from bmjlib.evaluation.tables import LABEL
from bmjlib.evaluation.judges import predict
from bmjlib.io import figure_credit, read_image, resize_image, save_figure
from bmjlib.schema import FINDINGS, ORGANS

CAPTION = "Phantom cohort (synthetic; no patient data)."
ORGAN_COLOURS = np.array([[0.12, 0.47, 0.71], [1.0, 0.5, 0.05], [0.84, 0.15, 0.16], [0.17, 0.63, 0.17],
                          [0.58, 0.4, 0.74], [0.55, 0.34, 0.29]])
# The paper sweeps slight / moderate / large; grade 1 is worded "small" in our descriptions (schema.SEVERITY_WORDS).
SWEEP_WORDS = ("small", "moderate", "large")
FIG3_PROMPTS = ("new large left pleural effusion", "new moderate cardiomegaly",
                "new moderate pulmonary edema", "new large right pneumothorax")
FIG3_FINDING = ("Pleural Effusion", "Cardiomegaly", "Edema", "Pneumothorax")


def _caption(fig, y: float) -> None:
    """The phantom's caption under a figure; a run with its own figure credit (real images, `io.figure_credit`)
    gets that credit from `save_figure` instead."""
    if not figure_credit():
        fig.text(0.5, y, CAPTION, ha="center", fontsize=7)


def _plt():
    return matplotlib, plt


def pick_pair(pairs: pd.DataFrame) -> pd.Series:
    """The test pair whose five finding labels change most between prior and follow-up (ties: pair_id)."""
    ch = sum((pairs[f"prior_{f}"].fillna(0) != pairs[f"followup_{f}"].fillna(0)).astype(int) for f in FINDINGS)
    order = pd.DataFrame({"n": ch, "pid": pairs["pair_id"]}).sort_values(["n", "pid"], ascending=[False, True])
    return pairs.loc[order.index[0]]


def _show(ax, img, title="", cmap="gray"):
    ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def _wrap(s: str, width: int = 60) -> str:
    return "\n".join(textwrap.wrap(str(s), width)) or "(empty)"


def model_row(run_dir, gen_dir, pair: pd.Series, models: Sequence[str], fig_dir=None, name: str = "",
              size: int | None = None):
    """Fig. 4: prior | each model's output | reference, with the description underneath."""
    _, plt = _plt()
    prior = read_image(pair["prior_path"])
    ref = read_image(pair.get("registered_path", pair["followup_path"]))
    outs = [load_outputs(gen_dir, m, [pair["pair_id"]])[0] for m in models]
    size = size or outs[0].shape[-1] if outs else prior.shape[-1]
    ims = [("Prior", prior)] + [(LABEL.get(m, m), o) for m, o in zip(models, outs)] + [("Reference (real)", ref)]
    fig, axes = plt.subplots(1, len(ims), figsize=(2.0 * len(ims), 2.6))
    for ax, (t, im) in zip(np.atleast_1d(axes), ims):
        _show(ax, resize_image(im, size), _wrap(t, 22))
    fig.suptitle(_wrap(f"Description: {pair['description']}", 110), fontsize=8, y=0.02, va="top")
    _caption(fig, -0.12)
    save_figure(fig, fig_dir if name else None, name)
    return fig


def fig3(pipe, finding_judge, prior: np.ndarray, fig_dir=None, prompts=FIG3_PROMPTS, findings=FIG3_FINDING,
         settings: dict | None = None, seed: int = 0, name: str = "fig3_counterfactuals_attention"):
    """Fig. 3: prior + counterfactuals for several descriptions (top), judge Grad-CAM for the named finding
    overlaid (bottom), with the judge's probability of that finding."""
    _, plt = _plt()
    settings = dict(settings or {})
    outs = pipe(prior, list(prompts), seed=seed, **settings)
    fig, axes = plt.subplots(2, len(prompts) + 1, figsize=(2.1 * (len(prompts) + 1), 4.6))
    size = outs.shape[-1]
    p0 = resize_image(prior, size)
    _show(axes[0, 0], p0, "Prior")
    axes[1, 0].axis("off")
    for j, (pr, f, im) in enumerate(zip(prompts, findings, outs), start=1):
        if finding_judge is None:  # a run without labels trains no finding judge: the outputs only
            _show(axes[0, j], im, _wrap(pr, 24))
            axes[1, j].axis("off")
            axes[1, j].set_title("no finding judge in this run", fontsize=7)
            continue
        cam = finding_judge.attention(im[None], f)[0]
        prob = float(finding_judge.predict(im[None])[0, FINDINGS.index(f)])
        prob0 = float(finding_judge.predict(p0[None])[0, FINDINGS.index(f)])
        _show(axes[0, j], im, _wrap(pr, 24))
        axes[1, j].imshow(im, cmap="gray", vmin=0, vmax=1)
        axes[1, j].imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        axes[1, j].set_title(f"Grad-CAM {f}\nP={prob:.2f} (prior {prob0:.2f})", fontsize=7)
        axes[1, j].axis("off")
    _caption(fig, 0.0)
    save_figure(fig, fig_dir, name)
    return fig


def overlay_masks(img: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """RGB image: grey radiograph with each organ mask tinted in its colour."""
    rgb = np.repeat(img[..., None], 3, axis=-1) * 0.55
    for k in range(masks.shape[0]):
        rgb[masks[k]] = rgb[masks[k]] * 0.4 + ORGAN_COLOURS[k] * 0.6
    return np.clip(rgb, 0, 1)


def fig5(run_dir, gen_dir, pair: pd.Series, models: Sequence[str], anatomy_judge, fig_dir=None, size: int = 64,
         name: str = "fig5_segmentations"):
    """Fig. 5: images (top) and anatomy-judge masks (bottom) for prior, reference and every output."""
    _, plt = _plt()
    prior = resize_image(read_image(pair["prior_path"]), size)
    ref = resize_image(read_image(pair.get("registered_path", pair["followup_path"])), size)
    outs = [resize_image(load_outputs(gen_dir, m, [pair["pair_id"]])[0], size) for m in models]
    ims = [("Prior", prior), ("Reference", ref)] + [(LABEL.get(m, m), o) for m, o in zip(models, outs)]
    masks = predict(anatomy_judge, np.stack([i for _, i in ims]), "anatomy")  # empty without an anatomy judge
    fig, axes = plt.subplots(2, len(ims), figsize=(2.0 * len(ims), 4.4))
    for j, ((t, im), m) in enumerate(zip(ims, masks)):
        _show(axes[0, j], im, _wrap(t, 22))
        axes[1, j].imshow(overlay_masks(im, m))
        axes[1, j].axis("off")
    fig.legend([Patch(color=c) for c in ORGAN_COLOURS], [o.replace("_", " ") for o in ORGANS], loc="lower center",
               ncol=len(ORGANS), fontsize=7, frameon=False, bbox_to_anchor=(0.5, -0.04))
    _caption(fig, -0.08)
    save_figure(fig, fig_dir, name)
    return fig


def fig9(pipe, prior: np.ndarray, finding_phrase: str = "left pleural effusion", fig_dir=None,
         settings: dict | None = None, seed: int = 0, finding_judge=None, finding: str = "Pleural Effusion",
         name: str = "fig9_severity_sweep", severity_judge=None):
    """Fig. 9: one prior, then '<word> <finding>' for slight / moderate / large (same seed), with the
    finding judge's probability and the severity judge's grade (0-3) under each when those judges are given."""
    _, plt = _plt()
    prompts = [f"new {w} {finding_phrase}" for w in SWEEP_WORDS]
    outs = pipe(prior, prompts, seed=seed, **dict(settings or {}))
    size = outs.shape[-1]
    p0 = resize_image(prior, size)
    fig, axes = plt.subplots(1, 4, figsize=(8.4, 2.6))
    _show(axes[0], p0, "Prior")
    for ax, pr, im in zip(axes[1:], prompts, outs):
        t = _wrap(pr, 22)
        if finding_judge is not None:
            t += f"\nP({finding})={finding_judge.predict(im[None])[0, FINDINGS.index(finding)]:.2f}"
        if severity_judge is not None:
            t += f"\ngrade {severity_judge.predict(im[None])[0, FINDINGS.index(finding)]:.1f}"
        _show(ax, im, t)
    _caption(fig, -0.05)
    save_figure(fig, fig_dir, name)
    return fig, outs
