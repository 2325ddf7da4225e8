"""`bmj generate`: one counterfactual follow-up from a prior image and a progression sentence (paper §4.2).

    bmj generate --model runs/demo/05_stage2/model --prior prior.dcm \
        --prompt "new large left pleural effusion" --out follow_up.png [--text-scale 7.5 --image-scale 1.5
        --steps 20 --scheduler dpm --seed 0]

The prior may be PNG (8/16-bit), JPEG or DICOM (read by io.read_image). The output PNG has the prior's
size. Every input is checked before the model runs, and a refusal is one line naming the thing and the
problem, with nothing written: a missing or damaged model folder, an unreadable or oversized image, an empty
prompt, guidance scales that are not finite numbers >= 0, steps outside 1..1000, an output that would
overwrite the prior or cannot be written. A prompt longer than the text encoder reads is used cut to its
first tokens, and said so (a warning naming how many tokens were kept of how many).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors import SafetensorError

from bmjlib.io import ImageError, atomic_write_png, read_image, resize_image, to_uint8
from bmjlib.model.demo_model import DemoModelError
from bmjlib.model.demo_model import resolve_model as shipped
from bmjlib.model.pipeline import (IP2P_GUIDANCE, SCHEDULERS, BiomedJourneyPipeline, ModelFolderError, check_edit_mask,
                                   check_sampling, check_text_guidance_min_t, read_guidance)
from bmjlib.runtime import resolve

# Without a model folder's own guidance.json, InstructPix2Pix's scales (`pipeline.read_guidance`).
DEFAULTS = {"text_scale": IP2P_GUIDANCE[0], "image_scale": IP2P_GUIDANCE[1], "steps": 20, "scheduler": "dpm"}


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
    """(text, image) guidance scales a model samples with when none are given: `pipeline.read_guidance` (its
    folder's guidance.json, else InstructPix2Pix's), the same defaults the pipeline call uses. A damaged
    guidance.json raises GenerateError naming it."""
    try:
        return read_guidance(model_dir)
    except ModelFolderError as e:
        raise GenerateError(str(e)) from None


def load_pipeline(model_dir: str | Path) -> BiomedJourneyPipeline:
    """BiomedJourneyPipeline.from_pretrained, with a damaged model folder reported as one GenerateError line."""
    try:
        return BiomedJourneyPipeline.from_pretrained(model_dir)
    except ModelFolderError as e:
        raise GenerateError(str(e)) from None
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise GenerateError(f"model {model_dir} cannot be loaded ({type(e).__name__}: {first})") from None


def check_output(out: str | os.PathLike, prior: str | os.PathLike) -> Path:
    """Refuse an output that is not a .png, is a folder, is the prior itself (same resolved path, or the
    same file through a link) or lies under a file or an unwritable folder."""
    path = Path(out)
    if not str(out).lower().endswith(".png"):
        raise GenerateError(f"output {out} must be a .png file")
    if path.is_dir():
        raise GenerateError(f"output {out} is a folder, not a .png file")
    same = os.path.realpath(path) == os.path.realpath(prior)
    if not same and path.exists() and Path(prior).exists():
        same = os.path.samefile(path, prior)
    if same:
        raise GenerateError(f"output {out} is the prior image {prior}: refusing to overwrite the input "
                            "(choose another --out)")
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise GenerateError(f"output {out} cannot be written: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GenerateError(f"output {out} cannot be written: folder {folder} is not writable")
    return path


def generate(model: str, prior: str, prompt: str, out: str, text_scale: float | None = None,
             image_scale: float | None = None, steps: int | None = None, scheduler: str | None = None,
             seed: int = 0, warn: Callable[[str], None] | None = None, strength: float | None = None,
             text_guidance_min_t: float | None = None, edit_mask: float | None = None) -> Path:
    """Validate inputs, run the pipeline, write the counterfactual as an 8-bit PNG at the prior's size.

    Raises GenerateError (one line) for any bad input, before the model runs; nothing is written then.
    `warn(message)` receives notices, e.g. a prompt cut to the text encoder's length (default:
    warnings.warn). `strength` None = the model's own (its guidance.json's settings.strength, else 1);
    `text_guidance_min_t` None = the model's own (settings.text_guidance_min_t, else 0: text guidance at every step);
    `edit_mask` None = the model's own (settings.edit_mask, else 0: no mask)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerateError("prompt is empty: give a progression description, e.g. 'new small left effusion'")
    steps = DEFAULTS["steps"] if steps is None else steps
    scheduler = scheduler or DEFAULTS["scheduler"]
    if scheduler not in SCHEDULERS:
        raise GenerateError(f"scheduler {scheduler!r} is unknown: choose one of {', '.join(SCHEDULERS)}")
    try:
        check_sampling(DEFAULTS["text_scale"] if text_scale is None else text_scale,
                       DEFAULTS["image_scale"] if image_scale is None else image_scale, steps, seed,
                       1.0 if strength is None else strength)
        if text_guidance_min_t is not None:
            check_text_guidance_min_t(text_guidance_min_t)
        if edit_mask is not None:
            check_edit_mask(edit_mask)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    check_output(out, prior)
    model_dir = resolve_model(model)
    default_guidance(model_dir)  # a damaged guidance.json is refused before the image is read
    try:
        image = read_image(prior)
    except ImageError as e:
        raise GenerateError(f"prior image {e.path}: {e.problem}") from None
    pipe = load_pipeline(model_dir)
    try:
        pipe.check_strength(pipe.strength if strength is None else strength)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    prompt = prompt.strip()
    notice = pipe.text_encoder.truncation_notice(prompt) if pipe.text_encoder is not None else None
    if notice:
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(notice)
    # None = the model's own default scales (the pipeline reads them from its folder)
    result = pipe(image, prompt, text_scale=text_scale, image_scale=image_scale,
                  steps=int(steps), scheduler=scheduler, seed=int(seed), strength=strength,
                  text_guidance_min_t=text_guidance_min_t, edit_mask=edit_mask)[0]
    if not np.isfinite(result).all():
        raise GenerateError("the model produced non-finite pixel values (NaN or inf), nothing written: "
                            "try smaller guidance scales")
    result = resize_image(result, image.shape)
    try:
        return atomic_write_png(out, to_uint8(np.clip(result, 0, 1)))
    except OSError as e:
        raise GenerateError(f"output {out} cannot be written ({e.strerror or e})") from None


def generate_cli(args) -> int:
    """Entry point of `bmj generate` (argparse namespace from bmjlib.cli). Returns the exit status."""
    def say(message) -> None:
        print("bmj generate: " + " ".join(str(message).split()), file=sys.stderr)  # always one line

    try:
        path = generate(args.model, args.prior, args.prompt, args.out, args.text_scale, args.image_scale,
                        args.steps, args.scheduler, args.seed, warn=lambda m: say(f"warning: {m}"),
                        strength=args.strength, text_guidance_min_t=args.text_guidance_min_t,
                        edit_mask=args.edit_mask)
    except (GenerateError, FileNotFoundError, DemoModelError) as e:
        say(e)
        return 2
    except KeyboardInterrupt:
        say("interrupted, nothing written")
        return 130
    print(f"wrote {path}")
    return 0
