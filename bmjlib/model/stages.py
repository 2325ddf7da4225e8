"""Notebooks 04-05 in functions: frozen components, the two training stages, loss curves and samples
(paper §4.2 two-stage curriculum, §5.1 implementation details).

- `prepare_components`: demo scale trains the small VAE (then fine-tunes its decoder) and the small CLIP (the
  BiomedCLIP stand-in) on stage 1's image-report pairs, each part redone only when its inputs changed, and reports
  held-out PSNR/SSIM and image->report retrieval; paper scale points to Stable Diffusion v1.5's VAE folder and
  BiomedCLIP and trains nothing.
- `train_config`: the `TrainConfig` a profile's flat values imply (notebooks 04, 05, 08 and `launch`).
- `stage1_components`, `train_stage1`, `train_stage2`, `train_one_stage`: the one training entry point;
  each finds its inputs in the run folder and calls `train.train_stage` as notebooks 04-05 and `launch` do.
- `stage2_triples`: what stage 2 and the one-stage arm train on: the described pairs, with the demo profile's
  identity triples (`with_stable_triples`) and repeats of rarely changing triples (`change_repeats`).
- `plot_loss`, `sample_figure`: what the notebooks show after each stage.
- `given_model`, `skip_stage1`, `use_given_model`, `model_run`: the profile's `model:` setting, a trained model
  used instead of training one (e.g. the shipped demo model on a user's cohort): 04 trains nothing, 05 puts the
  model where 06-10 read the stage-2 model, with its own guidance scales.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
import json
import os
import shutil
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from bmjlib.io import (atomic_dir, atomic_write_json, code_fingerprint_of, contents_fingerprint, fingerprint,
                       folder_fingerprint, save_figure)
from bmjlib.model.configs import BIOMEDCLIP, DEMO_UNET_CONFIG, SD15_UNET_CONFIG, vae_downsampling
from bmjlib.model.demo_model import resolve_model
from bmjlib.model.encoders import finetune_demo_decoder, load_images, load_vae, train_demo_clip, train_demo_vae
from bmjlib.model.pipeline import GUIDANCE_FILE, PIPELINE_FILE, BiomedJourneyPipeline, read_guidance
from bmjlib.model.train import TrainConfig, read_loss, train_stage
from bmjlib.runtime import resolve, side_by_side, step_dir
from bmjlib.text.progression import changes, compose_report, null_description

FIG_CAPTION_DATA = ("Phantom cohort (synthetic); no real patient data.")


COMPONENTS_FILE = "components.json"
COMPONENT_METRICS = {"vae_base": "vae_base_metrics", "vae": "vae_metrics", "text_encoder": "clip_metrics"}
COMPONENT_PARTS = tuple(COMPONENT_METRICS)


def _components_state(out: Path) -> dict:
    f = out / COMPONENTS_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def prepare_components(stage1: pd.DataFrame, out: str | os.PathLike, model_scale: str = "demo",
                       image_size: int = 64, vae_steps: int = 600, vae_batch: int = 32, clip_epochs: int = 20,
                       clip_batch: int = 64, seed: int = 0, sd_vae_dir: str = "",
                       text_encoder: str = "", max_val: int = 256, vae_ssim_weight: float = 0.0,
                       vae_decoder_steps: int = 0, vae_decoder_lr: float = 1e-4) -> dict:
    """Write out/vae and out/text_encoder (or, at paper scale, record where they are) and return the
    held-out metrics. Demo scale makes three parts, each keyed on what it is made from and redone only when
    that changed: vae_base/ (the VAE trained on crops), vae/ (vae_base with its decoder fine-tuned
    `vae_decoder_steps` at `vae_decoder_lr` on whole images; a copy at 0) and text_encoder/. A rerun with the
    same inputs is a no-op."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if model_scale == "paper":
        if not sd_vae_dir:
            raise ValueError("paper scale needs sd_vae_dir: Stable Diffusion v1.5's vae/ folder "
                             "(e.g. <snapshot of runwayml/stable-diffusion-v1-5>/vae)")
        return {"vae": str(sd_vae_dir), "text_encoder": text_encoder or BIOMEDCLIP}
    rows = stage1[stage1["impression"].fillna("").str.strip() != ""]
    train = rows[rows["split"] == "train"] if "split" in rows else rows
    val = rows[rows["split"] != "train"] if "split" in rows else rows.iloc[:0]
    if val.empty:  # tiny cohorts: hold out the last 10 % of patients
        subjects = sorted(rows["subject_id"].astype(str).unique())
        held = set(subjects[-max(1, len(subjects) // 10):])
        val, train = rows[rows["subject_id"].astype(str).isin(held)], rows[~rows["subject_id"].astype(str).isin(held)]
    val = val.iloc[:max_val]
    data = (list(train["image_path"]), list(train["impression"]), list(val["image_path"]), image_size, seed,
            contents_fingerprint([*train["image_path"], *val["image_path"]]), code_fingerprint_of(__name__))
    keys = {"vae_base": fingerprint(*data, vae_steps, vae_batch, "vae-crop-half",
                                    *([vae_ssim_weight] if vae_ssim_weight else [])),
            "text_encoder": fingerprint(*data, clip_epochs, clip_batch, "clip")}
    keys["vae"] = fingerprint(keys["vae_base"], "decoder", vae_decoder_steps, vae_ssim_weight,
                              *([vae_decoder_lr] if vae_decoder_steps else []))
    state = _components_state(out)
    fresh = {k: state.get("keys", {}).get(k) == keys[k] and (out / k).is_dir() for k in COMPONENT_PARTS}
    if all(fresh.values()):
        print("components up to date: nothing to do")
        return state
    x_train, kept = load_images(list(train["image_path"]), image_size, skip_bad=True, progress=True)
    t_train = list(train["impression"].iloc[kept])
    x_val, kept_v = load_images(list(val["image_path"]), image_size, skip_bad=True)
    t_val = list(val["impression"].iloc[kept_v])
    state = {"keys": {k: v for k, v in state.get("keys", {}).items() if fresh.get(k)},
             "vae": str(out / "vae"), "text_encoder": f"local-dir:{out / 'text_encoder'}",
             "n_train": len(x_train), "n_val": len(x_val),
             "unreadable_skipped": (len(train) - len(kept)) + (len(val) - len(kept_v)),
             **{m: state[m] for k, m in COMPONENT_METRICS.items() if fresh[k] and m in state}}

    def made(part: str, metrics: dict) -> None:  # recorded as soon as a part is whole
        state["keys"][part], state[COMPONENT_METRICS[part]] = keys[part], metrics
        atomic_write_json(out / COMPONENTS_FILE, state)

    atomic_write_json(out / COMPONENTS_FILE, state)  # parts about to be redone are no longer recorded
    if not fresh["vae_base"]:
        with atomic_dir(out / "vae_base") as tmp:
            m = train_demo_vae(x_train, x_val, tmp, steps=vae_steps, batch_size=vae_batch, seed=seed,
                               crop=max(16, image_size // 2), ssim_weight=vae_ssim_weight)
        made("vae_base", m)
    if not fresh["vae"] or not fresh["vae_base"]:
        with atomic_dir(out / "vae") as tmp:
            m = finetune_demo_decoder(out / "vae_base", x_train, x_val, tmp, vae_decoder_steps,
                                      batch_size=vae_batch, lr=vae_decoder_lr, ssim_weight=vae_ssim_weight,
                                      seed=seed)
        made("vae", {**state["vae_base_metrics"], **m})
    if not fresh["text_encoder"]:
        with atomic_dir(out / "text_encoder") as tmp:
            m = train_demo_clip(x_train, t_train, x_val, t_val, tmp, epochs=clip_epochs, batch_size=clip_batch,
                                seed=seed)
        made("text_encoder", m)
    return state


def components_table(res: dict) -> pd.DataFrame:
    """The held-out numbers of the frozen components, one row each."""
    v, c = res.get("vae_metrics", {}), res.get("clip_metrics", {})
    return pd.DataFrame([
        {"component": "VAE (AutoencoderKL)", "metric": "PSNR (dB)", "value": v.get("psnr"), "n": v.get("n_val")},
        {"component": "VAE (AutoencoderKL)", "metric": "SSIM", "value": v.get("ssim"), "n": v.get("n_val")},
        {"component": "CLIP image->report", "metric": "top-1", "value": c.get("top1"), "n": c.get("n_images"),
         "chance": c.get("chance_top1")},
        {"component": "CLIP image->report", "metric": "top-5", "value": c.get("top5"), "n": c.get("n_images"),
         "chance": c.get("chance_top5")},
    ])


def plot_loss(runs: dict[str, str | os.PathLike], fig_dir: str | os.PathLike | None = None, name: str = ""):
    """Loss curves (raw and smoothed) of finished stages {label: stage out folder}."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, d in runs.items():
        df = read_loss(d)
        ax.plot(df["step"], df["loss"], alpha=0.25, lw=0.8)
        ax.plot(df["step"], df["smoothed"], label=label, color=ax.lines[-1].get_color())
    ax.set(xlabel="step", ylabel="noise-prediction MSE", yscale="log", title="Training loss")
    ax.legend()
    fig.tight_layout()
    if fig_dir and name:
        save_figure(fig, fig_dir, name)
    return fig


def sample_figure(columns: Sequence[tuple[str, np.ndarray]], row_labels: Sequence[str] = (),
                  fig_dir: str | os.PathLike | None = None, name: str = "", title: str = ""):
    """A grid of images: columns [(header, N,H,W array)], one row per sample, labels at the left."""
    n = len(columns[0][1])
    fig, axes = plt.subplots(n, len(columns), figsize=(2.0 * len(columns) + (2.5 if row_labels else 0), 2.0 * n),
                             squeeze=False)
    for j, (head, imgs) in enumerate(columns):
        for i in range(n):
            ax = axes[i, j]
            ax.imshow(imgs[i], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(head, fontsize=9)
            if j == 0 and row_labels:
                ax.set_ylabel(_wrap(row_labels[i]), fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if fig_dir and name:
        save_figure(fig, fig_dir, name)
    return fig


def _wrap(s: str, width: int = 28) -> str:
    return "\n".join(textwrap.wrap(str(s), width)[:5])


def unet_config(model_scale: str, image_size: int, vae_factor: int) -> dict:
    """The UNet config literal of a scale, its sample_size set from the image size and the VAE factor."""
    base = SD15_UNET_CONFIG if model_scale == "paper" else DEMO_UNET_CONFIG
    return dict(base, sample_size=image_size // vae_factor)


def vae_factor(vae_dir: str | os.PathLike) -> int:
    cfg = json.loads((Path(vae_dir) / "config.json").read_text())
    return vae_downsampling(cfg)


def latent_cache_dir(run_dir: str | os.PathLike) -> Path:
    """The run's latent cache (`train_stage`'s `cache_dir`), shared by stage 1, stage 2, the one-stage arm and the
    ablation arms: content-addressed and refilled on demand, so no step's output (the chain's up-to-date check,
    which reads the NN_* folders, does not see what a later step adds to it)."""
    return resolve(run_dir) / "cache" / "latents"


def train_config(params: Mapping[str, Any], vae_dir: str | os.PathLike, epochs: float | None = None,
                 max_steps: int | None = None, ema: bool | None = None) -> TrainConfig:
    """The TrainConfig of the profile values `params` (image_size, batch_size, lr, cond_dropout, use_ema,
    checkpoint_every, seed, model_scale; and match_targets, diffusion_target, snr_gamma, change_weight, timestep_max,
    prediction_type and hflip when `params` has them; `train_stage` and `train_stage1` turn the first four off for stage 1),
    the UNet sized for the VAE in `vae_dir`. `epochs` or `max_steps` set the budget (TrainConfig's default when
    None); `ema=None` takes the profile's `use_ema`."""
    budget = {k: v for k, v in (("epochs", epochs), ("max_steps", max_steps)) if v is not None}
    return TrainConfig(image_size=params["image_size"], batch_size=params["batch_size"], lr=params["lr"],
                       cond_dropout=params["cond_dropout"], ema=params["use_ema"] if ema is None else ema,
                       checkpoint_every=params["checkpoint_every"], seed=params["seed"],
                       match_targets=bool(params.get("match_targets", False)),
                       target=params.get("diffusion_target", "image"),
                       snr_gamma=float(params.get("snr_gamma", 0) or 0),
                       change_weight=float(params.get("change_weight", 0) or 0),
                       timestep_max=float(params.get("timestep_max", 1.0) or 1.0),
                       prediction_type=params.get("prediction_type", "epsilon"),
                       hflip=bool(params.get("hflip", True)),
                       unet_config=unet_config(params["model_scale"], params["image_size"], vae_factor(vae_dir)),
                       **budget)


def stage1_components(run_dir: str | os.PathLike, params: Mapping[str, Any]) -> dict:
    """Notebook 04's frozen components (`prepare_components` on the cohort's stage-1 pairs, into 04_stage1)."""
    table = pd.read_csv(step_dir(run_dir, "01_cohort") / "stage1.csv")
    return prepare_components(table, step_dir(run_dir, "04_stage1"), model_scale=params["model_scale"],
                              image_size=params["image_size"], vae_steps=params["vae_steps"],
                              clip_epochs=params["clip_epochs"], seed=params["seed"],
                              sd_vae_dir=params["sd_vae_dir"], text_encoder=params["text_encoder"],
                              vae_ssim_weight=float(params.get("vae_ssim_weight", 0) or 0),
                              vae_decoder_steps=int(params.get("vae_decoder_steps", 0) or 0),
                              vae_decoder_lr=float(params.get("vae_decoder_lr", 1e-4) or 1e-4))


def train_stage1(run_dir: str | os.PathLike, params: Mapping[str, Any], components: dict | None = None) -> Path:
    """Stage 1 (notebook 04): every image-report pair of 01_cohort/stage1.csv with the dummy prior, for
    `stage1_epochs`, into 04_stage1/model. `components`: `stage1_components`' result (prepared here when None)."""
    out = step_dir(run_dir, "04_stage1")
    table = pd.read_csv(step_dir(run_dir, "01_cohort") / "stage1.csv")
    comp = stage1_components(run_dir, params) if components is None else components
    # stage 1 trains with the plain loss over the whole schedule whatever snr_gamma, change_weight and timestep_max
    # say: the text-only arm samples it from pure noise, the min-SNR measurements were of stage 2 only, and its
    # dummy prior has no change to weight
    cfg = replace(train_config(params, comp["vae"], epochs=params["stage1_epochs"]), snr_gamma=0.0, timestep_max=1.0,
                  change_weight=0.0)
    return train_stage(cfg, table, out,
                       prior="dummy", text_column="impression", vae=comp["vae"], text_encoder=comp["text_encoder"],
                       cache_dir=latent_cache_dir(run_dir), unet_init=params["sd_unet_dir"] or None, split=("train", "val"))


def with_stable_triples(pairs: pd.DataFrame, share: float, seed: int = 0) -> pd.DataFrame:
    """The triples plus round(share x training triples) identity triples: a training prior as its own follow-up
    with the sentence the progression synthesiser writes for a stable pair of that report ("Unchanged ...",
    "No acute ..."). A departure from the paper (demo profile): a stable pair's registered follow-up still differs
    from its prior by exposure, inspiration and registration residue, so without these the model learns that
    "no change" means "some change" and never learns to keep the patient exactly."""
    if share <= 0:
        return pairs
    train = pairs[pairs["split"] == "train"]
    pick = train.sample(int(round(share * len(train))), random_state=seed)
    def col(c):
        return pick[c] if c in pick else pd.Series("", index=pick.index)
    stable = pick.assign(registered_path=pick["prior_path"], followup_path=pick["prior_path"],
                         description=[null_description(compose_report(f, i)) for f, i in
                                      zip(col("prior_findings"), col("prior_impression"))])
    if "pair_id" in stable:
        stable["pair_id"] = stable["pair_id"].astype(str) + "-stable"
    return pd.concat([pairs, stable], ignore_index=True)


REPORT_COLUMNS = ("prior_findings", "prior_impression", "followup_findings", "followup_impression")


def changed_findings(pairs: pd.DataFrame) -> list[set[str]]:
    """Per triple, the findings its two reports say changed (new, worse, better or resolved; `progression.changes`,
    what the offline synthesiser describes), read from the reports, not from the description."""
    return [{f for f, ch in changes(compose_report(pf, pi), compose_report(ff, fi)).items() if ch != "unchanged"}
            for pf, pi, ff, fi in zip(*(pairs[c] for c in REPORT_COLUMNS))]


def change_repeats(pairs: pd.DataFrame, power: float) -> pd.DataFrame:
    """Extra copies of the training triples whose findings change rarely: a triple that changes findings is
    repeated round(max over them of (n_most / n_f) ** power) times in all, n_f the training triples that change
    finding f and n_most the most changed finding's count; a triple with no change is not repeated. `power` 0 =
    none, 1 = every finding's changes as many as the most common's. A departure from the paper (demo profile):
    on the phantom a cardiomegaly changes in about a quarter as many triples as an effusion, and the model learnt
    to widen the heart but not by the grade asked. Returns only the copies (pair_id suffixed "-repeat<k>")."""
    train = pairs[pairs["split"] == "train"]
    if power <= 0 or train.empty:
        return pairs.iloc[:0]
    missing = [c for c in REPORT_COLUMNS if c not in train]
    if missing:
        print(f"change balancing skipped: the triples have no {', '.join(missing)} column (the reports it reads)")
        return pairs.iloc[:0]
    changed = changed_findings(train)
    count = Counter(f for fs in changed for f in fs)
    if not count:
        return pairs.iloc[:0]
    most = max(count.values())
    times = np.array([int(round(max((most / count[f]) ** power for f in fs))) if fs else 1 for fs in changed])
    extra = train.iloc[np.repeat(np.arange(len(train)), times - 1)]
    if "pair_id" in extra:  # the k-th copy of a triple: <pair_id>-repeat<k>
        k = extra.groupby(level=0).cumcount() + 1
        extra = extra.assign(pair_id=extra["pair_id"].astype(str) + "-repeat" + k.astype(str))
    return extra.reset_index(drop=True)


def stage2_triples(run_dir: str | os.PathLike, params: Mapping[str, Any]) -> pd.DataFrame:
    """What stage 2 and the one-stage arm train on: 03_descriptions/pairs.csv, its identity triples
    (`stable_triples`) and the repeats of rarely changing triples (`change_balance`)."""
    pairs = pd.read_csv(step_dir(run_dir, "03_descriptions") / "pairs.csv")
    triples = with_stable_triples(pairs, params.get("stable_triples", 0.0), params["seed"])
    return pd.concat([triples, change_repeats(pairs, float(params.get("change_balance", 0.0) or 0.0))],
                     ignore_index=True)


def train_stage2(run_dir: str | os.PathLike, params: Mapping[str, Any], cache_only: bool = False) -> Path:
    """Stage 2 (notebook 05, BiomedJourney): stage 1's model tuned on `stage2_triples` (prior, description,
    registered follow-up) for `stage2_epochs`, into 05_stage2/model; the run's latent cache reused (`cache_only`:
    only encode what stage 2 reads into it)."""
    (step_dir(run_dir, "05_stage2") / GIVEN_MODEL_FILE).unlink(missing_ok=True)  # trained here, not given
    s1 = step_dir(run_dir, "04_stage1")
    pairs = stage2_triples(run_dir, params)
    cfg = train_config(params, s1 / "model" / "vae", epochs=params["stage2_epochs"])
    return train_stage(cfg, pairs, step_dir(run_dir, "05_stage2"), init_from=s1 / "model", prior="registered",
                       text_column="description", cache_dir=latent_cache_dir(run_dir), cache_only=cache_only)


def train_one_stage(run_dir: str | os.PathLike, params: Mapping[str, Any]) -> Path:
    """Table 2's one-stage arm (notebook 05): stage 2's data and settings from a fresh UNet (paper scale: SD
    v1.5's) with stage 1's frozen VAE and text encoder, into 05_stage2/one_stage/model."""
    s1 = step_dir(run_dir, "04_stage1")
    pairs = stage2_triples(run_dir, params)
    cfg = train_config(params, s1 / "model" / "vae", epochs=params["stage2_epochs"])
    return train_stage(cfg, pairs, step_dir(run_dir, "05_stage2") / "one_stage", prior="registered",
                       text_column="description", vae=s1 / "model" / "vae",
                       text_encoder=f"local-dir:{s1 / 'model' / 'text_encoder'}", cache_dir=latent_cache_dir(run_dir),
                       unet_init=params["sd_unet_dir"] or None)


def train_stage2_and_one_stage(run_dir: str | os.PathLike, params: Mapping[str, Any],
                               one_stage: bool = True) -> dict[str, Path]:
    """Notebook 05's trainings: {"two-stage": stage 2's model, "one-stage": the one-stage arm's (with
    `one_stage`)}. The two are independent and read the same triples, so once stage 2's latents are in stage 1's
    cache they train side by side (`runtime.side_by_side`)."""
    jobs = {"two-stage": (train_stage2, str(run_dir), dict(params))}
    if one_stage:
        train_stage2(run_dir, params, cache_only=True)  # one writer: the jobs then only read the cache
        jobs["one-stage"] = (train_one_stage, str(run_dir), dict(params))
    return side_by_side(jobs)


# --------------------------------------------------------------------------- a given model instead of training

# Written by notebooks 04 and 05 when the profile's `model:` names a trained model: what was used instead of training.
GIVEN_MODEL_FILE = "given_model.json"


def given_model(model: str) -> Path | None:
    """The profile's `model:` as a saved model folder: "" -> None (train as usual); "demo" -> the shipped demo
    model (verified against its sha256, expanded); else a folder written by `save_pretrained` (relative paths
    from the repository root). A folder that is not a saved model raises FileNotFoundError naming it."""
    if not str(model or "").strip():
        return None
    path = resolve_model("demo") if str(model) == "demo" else resolve(model)
    if not (path / PIPELINE_FILE).is_file():
        why = "does not exist" if not path.exists() else f"has no {PIPELINE_FILE}"
        raise FileNotFoundError(f"model: {model!r}: {path} {why}, so it is not a saved BiomedJourney model "
                                "(give 'demo', a folder written by save_pretrained, or '' to train one)")
    return path


def _model_note(model: str, path: Path) -> dict:
    return {"model": str(model), "folder": str(path), "guidance": list(read_guidance(path)),
            "model_fingerprint": folder_fingerprint(path)}


def skip_stage1(run_dir: str | os.PathLike, model: str, log=print) -> dict:
    """Notebook 04 with `model:` set: nothing is trained or cached; 04_stage1/given_model.json says which model
    stands in and why. Returns that note."""
    path = given_model(model)
    note = dict(_model_note(model, path), stage="04_stage1",
                what="stage 1 not trained: the chain uses the given model (no stage-1 model, latent cache or "
                     "text-only baseline in this run)")
    out = step_dir(run_dir, "04_stage1")
    atomic_write_json(out / GIVEN_MODEL_FILE, note)
    log(f"model: {model!r} ({path}): stage 1 is not trained, nothing heavy written to {out}")
    return note


def use_given_model(run_dir: str | os.PathLike, model: str, log=print) -> Path:
    """Notebook 05 with `model:` set: the given model is copied to 05_stage2/model, where notebooks 06-10 read the
    stage-2 model, with its guidance.json (the scales chosen for it, else InstructPix2Pix's: `read_guidance`);
    05_stage2/guidance/guidance.json records the same scales, so guidance "auto" means the model's own. No
    one-stage model and no guidance search on validation pairs. A rerun with the same model copies nothing."""
    path = given_model(model)
    out = step_dir(run_dir, "05_stage2")
    note = dict(_model_note(model, path), stage="05_stage2",
                what="stage 2 not trained: the given model is this run's BiomedJourney model (05_stage2/model)")
    target = out / "model"
    old = out / GIVEN_MODEL_FILE
    current = (old.is_file() and json.loads(old.read_text()).get("model_fingerprint") == note["model_fingerprint"]
               and (target / PIPELINE_FILE).is_file() and read_guidance(target) == read_guidance(path))
    if not current:
        with atomic_dir(target) as tmp:
            shutil.copytree(path, tmp, dirs_exist_ok=True)
            if not (tmp / GUIDANCE_FILE).is_file():  # the default it samples with, written down
                ts, isc = read_guidance(path)
                atomic_write_json(tmp / GUIDANCE_FILE, {"text_scale": ts, "image_scale": isc,
                                                        "criterion": "InstructPix2Pix's scales (the model "
                                                                     "folder carries no guidance.json)"})
    ts, isc = read_guidance(target)
    atomic_write_json(out / "guidance" / GUIDANCE_FILE,
                      {"text_scale": ts, "image_scale": isc, "given_model": str(model),
                       "criterion": f"the given model's own default guidance ({target / GUIDANCE_FILE}); "
                                    "not chosen on this run's validation pairs"})
    atomic_write_json(old, note)
    log(f"model: {model!r}: {'copied to' if not current else 'already at'} {target}; guidance text {ts:g}, "
        f"image {isc:g} (the model's own); no one-stage model or guidance search in this run")
    return target


def model_run(run_dir: str | os.PathLike) -> dict | None:
    """The note notebook 05 wrote when the run uses a given model (`use_given_model`), else None: models the
    chain would otherwise train (one-stage, text-only, ablation arms) are then absent by design."""
    f = resolve(run_dir) / "05_stage2" / GIVEN_MODEL_FILE
    return json.loads(f.read_text()) if f.is_file() else None


# Prompts for showing what a model does with a sentence (the paper's Fig. 3-4 style), per stage.
STAGE1_PROMPTS = ["No acute cardiopulmonary process.", "Large left pleural effusion.",
                  "Large right pleural effusion.", "Moderate cardiomegaly.", "Large right pneumothorax."]
STAGE2_PROMPTS = ["No change.", "New large left pleural effusion.", "New large right pleural effusion.",
                  "New large right pneumothorax.", "Worsening pulmonary edema."]


def stage1_samples(model_dir, prompts: Sequence[str] = STAGE1_PROMPTS, n_seeds: int = 2, steps: int = 20,
                   scheduler: str = "dpm", text_scale: float = 7.5, seed: int = 0, fig_dir=None, name: str = ""):
    """Stage 1 is text-to-image (dummy prior): one column per seed, one row per impression."""
    pipe = BiomedJourneyPipeline.from_pretrained(model_dir)
    cols = []
    for k in range(n_seeds):
        imgs = pipe(pipe.dummy_prior(), list(prompts), text_scale=text_scale, image_scale=1.0, steps=steps,
                    scheduler=scheduler, seed=seed + 1000 * k)
        cols.append((f"seed {seed + 1000 * k}", imgs))
    return sample_figure(cols, prompts, fig_dir, name, title="Stage 1 samples (dummy prior + impression)")


def pair_samples(models: dict[str, str | os.PathLike], pairs: pd.DataFrame, n: int = 4, steps: int = 20,
                 scheduler: str = "dpm", text_scale: float = 7.5, image_scale: float = 1.5, seed: int = 0,
                 text_column: str = "description", fig_dir=None, name: str = "", strength: float | None = None,
                 output: str | None = None, text_guidance_min_t: float | None = None,
                 edit_mask: float | None = None):
    """Held-out pairs: prior | each model's counterfactual | the real (registered) follow-up."""
    rows = pairs[pairs[text_column].fillna("").str.strip() != ""].head(n)
    pipes = {k: BiomedJourneyPipeline.from_pretrained(v) for k, v in models.items()}
    size = next(iter(pipes.values())).image_size
    priors, _ = load_images(list(rows["prior_path"]), size)
    follow, _ = load_images(list(rows.get("registered_path", rows["followup_path"])), size)
    cols = [("prior", priors)]
    for k, p in pipes.items():
        cols.append((k, p(priors, list(rows[text_column]), text_scale=text_scale, image_scale=image_scale,
                          steps=steps, scheduler=scheduler, seed=seed, strength=strength, output=output,
                          text_guidance_min_t=text_guidance_min_t, edit_mask=edit_mask)))
    cols.append(("real follow-up", follow))
    return sample_figure(cols, list(rows[text_column]), fig_dir, name, title="Counterfactuals on held-out pairs")


def prompt_sweep(model_dir, prior_path: str, prompts: Sequence[str] = STAGE2_PROMPTS, steps: int = 20,
                 scheduler: str = "dpm", text_scale: float = 7.5, image_scale: float = 1.5, seed: int = 0,
                 fig_dir=None, name: str = "", strength: float | None = None, output: str | None = None,
                 text_guidance_min_t: float | None = None, edit_mask: float | None = None):
    """One prior, several progression sentences (same seed): does the image follow the text and keep the patient?"""
    pipe = BiomedJourneyPipeline.from_pretrained(model_dir)
    prior, _ = load_images([prior_path], pipe.image_size)
    outs = pipe(prior, list(prompts), text_scale=text_scale, image_scale=image_scale, steps=steps,
                scheduler=scheduler, seed=seed, strength=strength, output=output,
                text_guidance_min_t=text_guidance_min_t, edit_mask=edit_mask)
    cols = [("prior", np.repeat(prior, len(prompts), 0)), ("counterfactual", outs),
            ("difference", np.clip(0.5 + (outs - prior), 0, 1))]
    return sample_figure(cols, prompts, fig_dir, name, title="One prior, several progression sentences")


def reconstruction_figure(vae_dir, paths: Sequence[str], image_size: int, fig_dir=None, name: str = ""):
    """Held-out images and their VAE reconstructions."""
    vae = load_vae(vae_dir)
    x, _ = load_images(list(paths), image_size)
    with torch.no_grad():
        t = torch.as_tensor(x)[:, None] * 2 - 1
        t = t.repeat(1, vae.config.in_channels, 1, 1)
        rec = vae.decode(vae.encode(t).latent_dist.mode()).sample
    rec = ((rec.numpy() + 1) / 2).clip(0, 1).mean(1)  # per channel to [0, 1] and clamped, then averaged (as diffusers)
    return sample_figure([("image", x), ("VAE reconstruction", rec)], (), fig_dir, name)
