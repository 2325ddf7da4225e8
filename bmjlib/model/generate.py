"""`bmj generate`: one counterfactual follow-up from a prior image and a progression sentence (paper §4.2).

    bmj generate --model runs/demo/05_stage2/model --prior prior.dcm \
        --prompt "new large left pleural effusion" --out follow_up.png [--text-scale 7.5 --image-scale 1.5
        --steps 20 --scheduler dpm --seed 0]

The prior may be PNG (8/16-bit), JPEG or DICOM (read by io.read_image). The output PNG has the prior's
size. Errors name the thing and the problem: a missing model folder, an unreadable image, an empty prompt.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bmjlib.io import ImageError, atomic_write_png, read_image, resize_image, to_uint8
from bmjlib.model.demo_model import resolve_model as shipped
from bmjlib.model.pipeline import BiomedJourneyPipeline
from bmjlib.runtime import resolve

DEFAULTS = {"text_scale": 7.5, "image_scale": 1.5, "steps": 20, "scheduler": "dpm"}


class GenerateError(ValueError):
    """Bad input to `bmj generate`; the message says which input and what is wrong."""


def resolve_model(model: str) -> Path:
    """'demo' -> the shipped demo model (bmjlib/model/demo, verified against its sha256 and expanded);
    anything else -> the saved pipeline folder given."""
    if model == "demo":
        return shipped("demo")
    path = resolve(model)
    if not (path / "bmj_pipeline.json").is_file():
        why = "does not exist" if not path.exists() else "is not a saved BiomedJourney model (no bmj_pipeline.json)"
        raise GenerateError(f"model {path} {why}")
    return path


def default_guidance(model_dir: str | Path) -> tuple[float, float]:
    """(text, image) guidance scales for a model folder: those chosen for it on validation pairs when the folder
    carries them (guidance.json, written by `validity.select_guidance` and shipped with the demo model),
    else InstructPix2Pix's defaults."""
    f = Path(model_dir) / "guidance.json"
    if f.is_file():
        g = json.loads(f.read_text())
        return float(g["text_scale"]), float(g["image_scale"])
    return DEFAULTS["text_scale"], DEFAULTS["image_scale"]


def generate(model: str, prior: str, prompt: str, out: str, text_scale: float | None = None,
             image_scale: float | None = None, steps: int | None = None, scheduler: str | None = None,
             seed: int = 0) -> Path:
    """Validate inputs, run the pipeline, write the counterfactual as an 8-bit PNG at the prior's size."""
    if not prompt or not prompt.strip():
        raise GenerateError("prompt is empty: give a progression description, e.g. 'new small left effusion'")
    if not str(out).lower().endswith(".png"):
        raise GenerateError(f"output {out} must be a .png file")
    model_dir = resolve_model(model)
    try:
        image = read_image(prior)
    except ImageError as e:
        raise GenerateError(f"prior image {e.path}: {e.problem}") from e
    pipe = BiomedJourneyPipeline.from_pretrained(model_dir)
    ts, isc = default_guidance(model_dir)
    result = pipe(image, prompt.strip(),
                  text_scale=ts if text_scale is None else text_scale,
                  image_scale=isc if image_scale is None else image_scale,
                  steps=steps or DEFAULTS["steps"], scheduler=scheduler or DEFAULTS["scheduler"], seed=seed)[0]
    result = resize_image(result, image.shape)
    return atomic_write_png(out, to_uint8(np.clip(result, 0, 1)))


def generate_cli(args) -> int:
    """Entry point of `bmj generate` (argparse namespace from bmjlib.cli). Returns the exit status."""
    try:
        path = generate(args.model, args.prior, args.prompt, args.out, args.text_scale, args.image_scale,
                        args.steps, args.scheduler, args.seed)
    except (GenerateError, FileNotFoundError) as e:
        print(f"bmj generate: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
