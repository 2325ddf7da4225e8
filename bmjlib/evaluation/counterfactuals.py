"""Counterfactual generation over the test pairs for every model (paper §5.1 "Baseline systems", Fig. 4).

Models (`model_specs`), each given the test pair's prior and instruction the way the paper does:

- `biomedjourney`: the two-stage model (05_stage2/model), prior image + progression description;
- `one_stage`: the stage-2-only ablation (05_stage2/one_stage/model), same inputs;
- `text_only`: the stage-1 model (04_stage1/model) given the follow-up's IMPRESSION and the constant-128
  dummy prior: text-only generation like RoentGen (which fine-tunes SD on MIMIC-CXR impressions);
- `copy_prior`: the prior itself (perfect retention, no change) - the floor the changed-finding AUROC exposes;
- paper scale also `sd15` (Stable Diffusion v1.5, "a photo of chest x-ray" + impression, as §5.1 says)
  and `ip2p` (InstructPix2Pix, prior + description), both from local diffusers folders.

Generation is batched, seeded per pair (pair i of the sorted test list gets seed + i, independent of the
batch it lands in), resumable (a manifest keyed by model weights, inputs and settings; a rerun makes
nothing that is current), atomic, with a progress bar. Outputs: out/<model>/<pair_id>.png and
out/<model>/index.csv (pair_id, path, prompt, seed, sha256).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from bmjlib.io import (Manifest, atomic_write_csv, atomic_write_png, code_fingerprint_of, fingerprint,
                       folder_fingerprint, read_image, resize_image, sha256_file, to_uint8)
from bmjlib.model.pipeline import GUIDANCE_FILE, BiomedJourneyPipeline
from bmjlib.model.stages import model_run
from bmjlib.runtime import record_timing, resolve

DEMO_MODELS = ["biomedjourney", "one_stage", "text_only", "copy_prior"]
PAPER_MODELS = ["sd15", "ip2p"] + DEMO_MODELS
SD_PREFIX = "a photo of chest x-ray "  # §5.1: needed for SD to produce meaningful results


class ModelMissing(FileNotFoundError):
    """A model folder that generation needs is absent; the message names it and how to get it."""


def test_pairs(run_dir: str | Path, split: str = "test", max_pairs: int | None = None) -> pd.DataFrame:
    """The evaluation pairs: 03_descriptions/pairs.csv rows of `split`, sorted by pair_id (stable seeds)."""
    f = resolve(run_dir) / "03_descriptions" / "pairs.csv"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no pairs with descriptions (run notebook 03 first)")
    pairs = pd.read_csv(f, dtype={"subject_id": str, "prior_study_id": str, "followup_study_id": str})
    pairs = pairs[pairs["split"] == split].sort_values("pair_id").reset_index(drop=True)
    if max_pairs:
        pairs = pairs.head(int(max_pairs))
    if pairs.empty:
        raise ValueError(f"{f}: no '{split}' pairs to generate for")
    return pairs


def model_specs(run_dir: str | Path, scale: str = "demo", sd_dir: str = "", ip2p_dir: str = "",
                text_column: str = "description") -> dict[str, dict]:
    """name -> {kind, path, prior ('prior' | 'dummy'), text (pair column)} for the models of a scale."""
    run = resolve(run_dir)
    imp = "instruction_impression"
    specs = {
        "biomedjourney": {"kind": "pipeline", "path": run / "05_stage2" / "model", "prior": "prior", "text": text_column},
        "one_stage": {"kind": "pipeline", "path": run / "05_stage2" / "one_stage" / "model", "prior": "prior",
                      "text": text_column},
        "text_only": {"kind": "pipeline", "path": run / "04_stage1" / "model", "prior": "dummy", "text": imp},
        "copy_prior": {"kind": "copy", "path": None, "prior": "prior", "text": text_column},
    }
    if scale == "paper":
        specs = {"sd15": {"kind": "sd15", "path": Path(sd_dir) if sd_dir else None, "prior": "none", "text": imp},
                 "ip2p": {"kind": "ip2p", "path": Path(ip2p_dir) if ip2p_dir else None, "prior": "prior",
                          "text": text_column}, **specs}
    return specs


def _weights_key(spec: dict) -> str:
    """Identity of a model's weights. A BiomedJourney pipeline: every file of its folder but the documentation
    (its VAE, UNet, projection, text tower and settings all shape the output; a new VAE decoder under the same
    UNet must regenerate). Stable Diffusion / InstructPix2Pix folders (gigabytes): their index file."""
    p = spec["path"]
    if spec["kind"] == "copy":
        return "copy"
    if spec["kind"] == "pipeline" and p is not None and Path(p).is_dir():
        return folder_fingerprint(p)
    for f in ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin", "model_index.json"):
        if p is not None and (Path(p) / f).is_file():
            return sha256_file(Path(p) / f)
    return str(p)


def check_model(name: str, spec: dict) -> None:
    p = spec["path"]
    if spec["kind"] == "copy":
        return
    if spec["kind"] == "pipeline":
        if p is None or not (Path(p) / "bmj_pipeline.json").is_file():
            raise ModelMissing(f"model '{name}': {p} is not a saved BiomedJourney pipeline "
                               "(train it with notebooks 04-05 first)")
        return
    label = {"sd15": "Stable Diffusion v1.5", "ip2p": "InstructPix2Pix (timbrooks/instruct-pix2pix)"}[spec["kind"]]
    if p is None or not (Path(p) / "model_index.json").is_file():
        raise ModelMissing(f"model '{name}': no local {label} weights at {p or '(no folder given)'}: "
                           f"put a diffusers snapshot there (a folder with model_index.json, unet/, vae/, "
                           f"text_encoder/...) and pass its path; nothing is downloaded")


def load_generator(name: str, spec: dict, device: str = "cpu") -> Callable:
    """A function (priors N,H,W | None, prompts, seed, **settings) -> N,H,W float in [0, 1]."""
    check_model(name, spec)
    kind = spec["kind"]
    if kind == "copy":
        return lambda priors, prompts, seed, **kw: np.asarray(priors, np.float32)
    if kind == "pipeline":
        pipe = BiomedJourneyPipeline.from_pretrained(spec["path"], device=device)

        def run(priors, prompts, seed, text_scale=None, image_scale=None, steps=20, scheduler="dpm", strength=None,
                output=None, text_guidance_min_t=None, edit_mask=None, **kw):
            if spec["prior"] == "dummy":  # no prior to start from, to add a change to or to keep outside a mask:
                priors, strength, output, edit_mask = pipe.dummy_prior(len(prompts)), 1.0, "decoded", 0.0  # from noise
            return pipe(priors, list(prompts), text_scale=text_scale, image_scale=image_scale, steps=steps,
                        scheduler=scheduler, seed=seed, batch_size=len(prompts), strength=strength, output=output,
                        text_guidance_min_t=text_guidance_min_t, edit_mask=edit_mask)
        run.image_size = pipe.image_size
        return run
    return _load_diffusers(kind, spec["path"], device)


def _load_diffusers(kind: str, path: Path, device: str) -> Callable:
    """Stable Diffusion v1.5 / InstructPix2Pix from a local diffusers folder (paper-scale baselines)."""
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    P = StableDiffusionPipeline if kind == "sd15" else StableDiffusionInstructPix2PixPipeline
    pipe = P.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True, safety_checker=None).to(device)
    pipe.set_progress_bar_config(disable=True)

    def run(priors, prompts, seed, text_scale=7.5, image_scale=1.5, steps=20, size=256, **kw):
        gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
        if kind == "sd15":
            ims = pipe([SD_PREFIX + p for p in prompts], height=size, width=size, num_inference_steps=steps,
                       guidance_scale=text_scale, generator=gens, output_type="np").images
        else:
            pil = [Image.fromarray(to_uint8(resize_image(p, size))).convert("RGB") for p in priors]
            ims = pipe(list(prompts), image=pil, num_inference_steps=steps, guidance_scale=text_scale,
                       image_guidance_scale=image_scale, generator=gens, output_type="np").images
        return np.asarray(ims, np.float32).mean(axis=-1)  # RGB -> grey
    run.image_size = 256
    return run


def generate_model(name: str, spec: dict, pairs: pd.DataFrame, out_dir: str | Path, size: int, seed: int = 0,
                   batch_size: int = 16, settings: dict | None = None, device: str = "cpu",
                   generator: Callable | None = None, write_index: bool = True) -> pd.DataFrame:
    """Generate `name`'s counterfactual for every pair (resumable); returns and writes index.csv (not when
    `write_index` is False: a caller that generates one folder in several calls writes its own index)."""
    settings = dict(settings or {})
    out = Path(out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    man = Manifest(out / "manifest.json", root=out)
    wkey = _weights_key(spec)
    code = code_fingerprint_of(__name__)  # the sampler's code: a fix to it regenerates
    prompts = pairs[spec["text"]].fillna("").astype(str).tolist()
    keys = [fingerprint(name, wkey, code, pid, pp, pr, seed + i, size, settings)
            for i, (pid, pp, pr) in enumerate(zip(pairs["pair_id"], pairs["prior_path"], prompts))]
    todo = [i for i, pid in enumerate(pairs["pair_id"]) if not man.is_current(f"{pid}.png", keys[i])]
    skipped = []
    if todo:
        gen = generator or load_generator(name, spec, device)
        runs = _consecutive_chunks(todo, batch_size)
        for chunk in tqdm(runs, desc=f"generate {name}", unit="batch"):
            rows = pairs.iloc[chunk]
            priors, ok = [], []
            for i, path in zip(chunk, rows["prior_path"]):
                try:
                    priors.append(resize_image(read_image(path), size))
                    ok.append(i)
                except (OSError, ValueError) as e:
                    skipped.append({"pair_id": pairs.at[i, "pair_id"], "problem": str(e)})
            if not ok:
                continue
            for sub in _consecutive_chunks(ok, batch_size):
                ims = gen(np.stack([priors[ok.index(i)] for i in sub]), [prompts[i] for i in sub],
                          seed + sub[0], **settings)
                ims = resize_image(ims, size)
                for i, im in zip(sub, ims):
                    rel = f"{pairs.at[i, 'pair_id']}.png"
                    atomic_write_png(out / rel, to_uint8(im))
                    man.record(rel, keys[i])
            man.save()
    rows = []
    for i, pid in enumerate(pairs["pair_id"]):
        e = man.entries.get(f"{pid}.png")
        if e and e.get("inputs") == keys[i]:
            rows.append({"pair_id": pid, "model": name, "path": f"{pid}.png", "prompt": prompts[i],
                         "seed": seed + i, "sha256": e["sha256"]})
    index = pd.DataFrame(rows, columns=["pair_id", "model", "path", "prompt", "seed", "sha256"])
    if write_index:
        atomic_write_csv(out / "index.csv", index)
    if skipped:
        atomic_write_csv(out / "skipped.csv", pd.DataFrame(skipped))
    return index


def _consecutive_chunks(idx: list[int], size: int) -> list[list[int]]:
    """Split sorted indices into runs of consecutive numbers of at most `size` (seed + i stays per pair)."""
    chunks, cur = [], []
    for i in idx:
        if cur and (i != cur[-1] + 1 or len(cur) == size):
            chunks.append(cur)
            cur = []
        cur.append(i)
    if cur:
        chunks.append(cur)
    return chunks


def generate_all(run_dir: str | Path, out_dir: str | Path, models: list[str] | None = None, scale: str = "demo",
                 size: int = 64, seed: int = 0, batch_size: int = 16, max_pairs: int | None = None,
                 settings: dict | None = None, sd_dir: str = "", ip2p_dir: str = "", device: str = "cpu",
                 skip_missing: bool = False) -> pd.DataFrame:
    """Every model over the test pairs. Returns a summary (model, n_pairs, n_generated, status).
    `skip_missing`: a model whose weights are absent is reported as 'missing: ...' instead of raising; always so
    in a run that uses a given model (`stages.model_run`), which trains no one-stage or text-only model."""
    skip_missing = skip_missing or model_run(run_dir) is not None
    pairs = test_pairs(run_dir, max_pairs=max_pairs)
    specs = model_specs(run_dir, scale, sd_dir, ip2p_dir)
    rows = []
    for name in models or list(specs):
        t0 = time.time()
        try:
            idx = generate_model(name, specs[name], pairs, out_dir, size, seed, batch_size, settings, device)
            status = "ok"
        except ModelMissing as e:
            if not skip_missing:
                raise
            idx, status = pd.DataFrame(), f"missing: {e}"
        rows.append({"model": name, "n_pairs": len(pairs), "n_generated": len(idx), "status": status})
        record_timing(f"generate {name}", time.time() - t0, n_pairs=len(pairs))
    summary = pd.DataFrame(rows)
    atomic_write_csv(Path(out_dir) / "summary.csv", summary)
    return summary


def load_outputs(gen_dir: str | Path, model: str, pair_ids: list[str]) -> np.ndarray:
    """A model's generated images for `pair_ids`, N,H,W float in [0, 1]; a missing one raises naming it."""
    d = Path(gen_dir) / model
    return np.stack([read_image(d / f"{pid}.png") for pid in pair_ids])


# --------------------------------------------------------------------------- guidance scales

# (text scale, image scale) candidates; InstructPix2Pix's defaults 7.5 / 1.5 are among them.
GUIDANCE_GRID = [(t, i) for t in (5.0, 7.5, 10.0, 12.5) for i in (1.5, 2.5)]


def resolve_guidance(run_dir: str | Path, text_scale, image_scale) -> tuple[float, float]:
    """The sampler's (text, image) guidance scales: numbers as given; "auto" = the choice notebook 05 made on
    validation pairs (05_stage2/guidance/guidance.json, `validity.select_guidance`)."""
    if not any(isinstance(v, str) for v in (text_scale, image_scale)):
        return float(text_scale), float(image_scale)
    bad = [v for v in (text_scale, image_scale) if isinstance(v, str) and v != "auto"]
    if bad:
        raise ValueError(f"guidance scale {bad[0]!r}: a number or 'auto'")
    f = resolve(run_dir) / "05_stage2" / "guidance" / GUIDANCE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: guidance 'auto' but no scales were chosen on validation pairs yet "
                                "(notebook 05 chooses them); or give text_scale and image_scale as numbers")
    choice = json.loads(f.read_text())
    return (choice["text_scale"] if text_scale == "auto" else float(text_scale),
            choice["image_scale"] if image_scale == "auto" else float(image_scale))
