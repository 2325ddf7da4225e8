"""The BiomedJourney model: InstructPix2Pix-style latent diffusion from diffusers parts (paper §4.2, §5.1).

`BiomedJourneyPipeline` = `AutoencoderKL` + an 8-input-channel `UNet2DConditionModel` (noisy latent
concatenated with the prior image's latent) + a frozen open_clip text tower (`encoders.TextEncoder`)
whose token states pass through a learnable linear projection to the UNet's cross-attention width +
a noise scheduler (DDIM, DPM-Solver++ or Euler at sampling time).

Sampling uses classifier-free guidance on both conditions (InstructPix2Pix, Brooks et al. 2023):

    eps = eps_uncond + s_text * (eps_text_and_image - eps_image) + s_image * (eps_image - eps_uncond)

where "image" conditioning is the prior's latent (dropped = zeros) and "text" is the projected token
states (dropped = the empty prompt's states); the three predictions come from ONE batched UNet call.

Latent conventions are InstructPix2Pix's (diffusers' `StableDiffusionInstructPix2PixPipeline` and
`train_instruct_pix2pix.py`): the prior's latent is the VAE posterior mode as is (NOT multiplied by
the VAE's `scaling_factor`), the noised target latent is scaled; a decoded image goes to [0, 1] per
channel (clamped) before an RGB VAE's channels are averaged to one grey image. Model folders saved
before this convention record none (`prior_latents` in bmj_pipeline.json) and keep sampling with the
scaled prior latent they were trained with.

What a sample returns (`output`, one of OUTPUTS): the sampled latent through the VAE's decoder, as the paper and
InstructPix2Pix return it, or (beyond the paper) the prior plus the change the model decodes,
decode(sampled) - decode(prior's latent), which keeps the detail a small VAE loses where nothing changes.

Where a sample may change (`edit_mask`, beyond the paper; 0 = everywhere, the paper): DiffEdit's mask (Couairon et al.
2023). Before sampling, the text-conditioned and the text-dropped predictions (both given the prior) are compared on
the prior's latent noised to half the schedule (or to the share the UNet was trained on, if less), over EDIT_MASK_MAPS
noise draws; a latent pixel is edited where their mean absolute difference, averaged over channels, exceeds
edit_mask / 2 times its image's mean (diffusers' `mask_thresholding_ratio` rule, per image so that a sample does not
depend on its batch). After every denoising step the latent outside the mask is replaced by the prior's latent noised
to the next timestep with the sample's own noise, and by the prior's latent itself after the last one, so outside the
mask the sample decodes the prior.

One class serves both scales: `SD15_UNET_CONFIG` / `SD15_VAE_CONFIG` are Stable Diffusion v1.5's
configs written as literals (paper scale, 256 px -> 32x32 latents); `DEMO_UNET_CONFIG` is a small UNet
trained from scratch on the phantom cohort. A trained model is one folder (`save_pretrained`).

Usage:
    pipe = BiomedJourneyPipeline.from_pretrained("runs/demo/05_stage2/model")
    out = pipe(prior, "new large left pleural effusion", text_scale=7.5, image_scale=1.5,
               steps=20, scheduler="dpm", seed=0)            # -> float32 N,H,W in [0, 1]
"""
from __future__ import annotations

import copy
import json
import math
import numbers
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UNet2DConditionModel)
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from bmjlib.io import atomic_dir, atomic_write_json, resize_image
from bmjlib.model.configs import DEMO_UNET_CONFIG, SD15_SCHEDULER_CONFIG, SD15_VAE_CONFIG, vae_downsampling
from bmjlib.model.demo_model import resolve_model
from bmjlib.model.encoders import TextEncoder
from bmjlib.runtime import use_run_threads

PIPELINE_FILE = "bmj_pipeline.json"
DUMMY_PRIOR_VALUE = 128 / 255  # stage 1's prior: a constant-128 image (paper §4.2)


SCHEDULERS = ("ddim", "dpm", "euler")
PRIOR_LATENTS = ("unscaled", "scaled")  # bmj_pipeline.json "prior_latents" (see the module docstring)
# A sampler cannot take more steps than the training schedule has timesteps.
MAX_STEPS = int(SD15_SCHEDULER_CONFIG["num_train_timesteps"])
MAX_SEED = 2 ** 63 - 1
# The JSON files of a saved model folder: (path inside the folder, needed only with a stored text encoder).
MODEL_JSON = ((PIPELINE_FILE, False), ("vae/config.json", False), ("unet/config.json", False),
              ("scheduler/scheduler_config.json", False), ("text_encoder/open_clip_config.json", True))


class ModelFolderError(ValueError):
    """A saved model folder that cannot be loaded; the message names the folder, the file and the problem."""


# A model's default guidance scales: those chosen for it on validation pairs when its folder carries them
# (GUIDANCE_FILE, written by `validity.select_guidance` and shipped with the demo model), else InstructPix2Pix's
# 7.5 / 1.5. The pipeline call, `bmj generate` and the explorer all take their defaults from `read_guidance`.
GUIDANCE_FILE = "guidance.json"
EDIT_MASK_MAPS = 4     # noise draws the edit mask averages (DiffEdit: 10); 8 UNet passes beside a 14-step sample's 42
EDIT_MASK_T = 0.5      # the noise level, as a share of the training schedule, the mask is read at (DiffEdit's 0.5)
IP2P_GUIDANCE = (7.5, 1.5)


def read_guidance(path: str | os.PathLike) -> tuple[float, float]:
    """(text, image) default guidance scales of a model folder: its guidance.json when present, else
    IP2P_GUIDANCE. A damaged guidance.json raises ModelFolderError naming the folder and the problem."""
    f = Path(path) / GUIDANCE_FILE
    if not f.is_file():
        return IP2P_GUIDANCE
    try:
        g = json.loads(f.read_text())
        ts, isc = float(g["text_scale"]), float(g["image_scale"])
        check_sampling(ts, isc)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"model folder {path}: {GUIDANCE_FILE} is not valid JSON ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        why = f"has no {e}" if isinstance(e, KeyError) else f"is unusable ({e})"
        raise ModelFolderError(f"model folder {path}: {GUIDANCE_FILE} {why}") from None
    return ts, isc


def _guidance_setting(path: str | os.PathLike, key: str, default):
    """`settings.<key>` of a model folder's guidance.json (the sampler its scales were chosen with), else `default`
    (no file, or no such setting). A file that cannot be read as JSON raises ModelFolderError naming the setting."""
    f = Path(path) / GUIDANCE_FILE
    if not f.is_file():
        return default
    try:
        return json.loads(f.read_text()).get("settings", {}).get(key, default)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ModelFolderError(f"model folder {path}: {GUIDANCE_FILE} settings.{key} is unusable ({e})") from None


def read_strength(path: str | os.PathLike, default: float = 1.0) -> float:
    """The default sampling strength of a model folder: its guidance.json's settings.strength when present, else
    `default` (1: from pure noise). A damaged value raises ModelFolderError."""
    s = _guidance_setting(path, "strength", default)
    try:
        s = float(s)
    except (TypeError, ValueError) as e:
        raise ModelFolderError(f"model folder {path}: {GUIDANCE_FILE} settings.strength is unusable ({e})") from None
    if not 0 < s <= 1:
        raise ModelFolderError(f"model folder {path}: {GUIDANCE_FILE} settings.strength {s} is not in (0, 1]")
    return s


# What a sample returns: "decoded", the sampled latent through the VAE's decoder (InstructPix2Pix, the paper), or
# "prior_plus_change", the prior plus the change the model decodes, decode(z) - decode(z_prior) (beyond the paper: it
# keeps detail a small VAE blurs where nothing changes, such as the ribs the age judge reads, but where the model moves
# an edge the prior's edge stays beside the new one; the demo profile's comment has its measured effect).
OUTPUTS = ("decoded", "prior_plus_change")


def read_output(path: str | os.PathLike) -> str:
    """The default output of a model folder: its guidance.json's settings.output when present, else "decoded". A
    value not in OUTPUTS raises ModelFolderError."""
    out = _guidance_setting(path, "output", "decoded")
    if out not in OUTPUTS:
        raise ModelFolderError(f"model folder {path}: {GUIDANCE_FILE} settings.output {out!r} is not one of "
                               f"{', '.join(OUTPUTS)}")
    return out


def _checked_setting(path: str | os.PathLike, key: str, check: Callable[[object], None]) -> float:
    """`settings.<key>` of a model folder's guidance.json as a number, else 0; a value `check` refuses raises
    ModelFolderError naming the folder, the setting and the problem."""
    v = _guidance_setting(path, key, 0.0)
    try:
        check(v)
    except ValueError as e:
        raise ModelFolderError(f"model folder {path}: {GUIDANCE_FILE} settings.{e}") from None
    return float(v)


def read_text_guidance_min_t(path: str | os.PathLike) -> float:
    """The default `text_guidance_min_t` of a model folder: its guidance.json's settings.text_guidance_min_t when
    present, else 0 (text guidance at every step, as the paper). A damaged value raises ModelFolderError."""
    return _checked_setting(path, "text_guidance_min_t", check_text_guidance_min_t)


def read_edit_mask(path: str | os.PathLike) -> float:
    """The default `edit_mask` of a model folder: its guidance.json's settings.edit_mask when present, else 0 (no mask,
    as the paper). A damaged value raises ModelFolderError."""
    return _checked_setting(path, "edit_mask", check_edit_mask)


def _finite_number(v) -> bool:
    """A real number, not a bool, neither NaN nor infinite: what every numeric sampler setting must be first."""
    return not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)


def check_edit_mask(v) -> None:
    """Refuse an `edit_mask` that is not a finite number >= 0 with a ValueError naming it."""
    if not _finite_number(v) or v < 0:
        raise ValueError(f"edit_mask {v!r} is not allowed: give a finite number >= 0 (0 = no mask: the whole image "
                         "may change)")


def check_text_guidance_min_t(v) -> None:
    """Refuse a `text_guidance_min_t` that is not a number in [0, 1) with a ValueError naming it."""
    if not _finite_number(v) or not 0 <= v < 1:
        raise ValueError(f"text_guidance_min_t {v!r} is not allowed: give a number in [0, 1) (0 = text guidance at "
                         "every step)")


def read_max_strength(path: str | os.PathLike, meta: dict) -> tuple[float, float]:
    """(max_strength, default strength) of a model folder: the share of the noise schedule its UNet was trained on
    (bmj_pipeline.json max_strength, else 1) and guidance.json's settings.strength, else max_strength (the
    strongest start the model was trained for). A max_strength that is not a number in (0, 1], or a recorded
    strength above it, raises ModelFolderError."""
    v = meta.get("max_strength", 1.0)
    try:
        m = float(v)
    except (TypeError, ValueError):
        m = math.nan
    if isinstance(v, bool) or not 0 < m <= 1:
        raise ModelFolderError(f"model folder {path}: {PIPELINE_FILE} max_strength {v!r} is not a number in (0, 1]")
    strength = read_strength(path, default=m)
    if strength > m + 1e-9:
        raise ModelFolderError(f"model folder {path}: {GUIDANCE_FILE} settings.strength {strength:g} is above the "
                               f"max_strength {m:g} the model was trained for")
    return m, strength


def check_sampling(text_scale: float = 7.5, image_scale: float = 1.5, steps: int = 20, seed: int = 0,
                   strength: float = 1.0) -> None:
    """Refuse settings that cannot give a meaningful image, with a ValueError naming the setting: guidance
    scales must be finite numbers >= 0 (NaN guidance decodes to a black image), steps a whole number from
    1 to MAX_STEPS, the seed a whole number from 0 to MAX_SEED, the strength a number in (0, 1]."""
    for name, v in (("text scale", text_scale), ("image scale", image_scale)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"{name} {v!r} is not a number")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} {float(v)} is not allowed: guidance scales must be finite numbers >= 0")
    for name, v, lo, hi in (("steps", steps, 1, MAX_STEPS), ("seed", seed, 0, MAX_SEED)):
        whole = _finite_number(v) and float(v).is_integer()
        if not whole or not lo <= int(v) <= hi:
            raise ValueError(f"{name} {v} is not allowed: give a whole number from {lo} to {hi}")
    if not _finite_number(strength) or not 0 < strength <= 1:
        raise ValueError(f"strength {strength!r} is not allowed: give a number in (0, 1] (1 = from pure noise)")


def read_model_meta(path: str | os.PathLike, text_encoder: bool = True) -> dict:
    """The saved model folder's bmj_pipeline.json, after checking that it and the parts' JSON configs parse
    (the stored text encoder's only when `text_encoder` and the folder has one): a damaged or missing file
    raises ModelFolderError (one line naming the folder and the file)."""
    path = Path(path)
    meta = None
    for rel, text_only in MODEL_JSON:
        f = path / rel
        if text_only and not (text_encoder and (meta or {}).get("has_text_encoder", True)):
            continue
        if not f.is_file():
            raise ModelFolderError(f"model folder {path}: {rel} is missing")
        try:
            value = json.loads(f.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
            raise ModelFolderError(f"model folder {path}: {rel} is not valid JSON{where}") from None
        if not isinstance(value, dict):
            raise ModelFolderError(f"model folder {path}: {rel} is not a JSON object")
        if rel == PIPELINE_FILE:
            meta = value
            size = meta.get("image_size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 8:
                raise ModelFolderError(f"model folder {path}: {rel} has no valid image_size (got {size!r})")
            conv = meta.get("prior_latents", "scaled")
            if conv not in PRIOR_LATENTS:
                raise ModelFolderError(f"model folder {path}: {rel} has prior_latents {conv!r}; expected one of "
                                       f"{', '.join(PRIOR_LATENTS)}")
    return meta


def build_unet(config: dict | None = None, **overrides):
    """A randomly initialised UNet2DConditionModel from a config literal (default: the demo UNet)."""
    cfg = dict(copy.deepcopy(config or DEMO_UNET_CONFIG), **overrides)
    return UNet2DConditionModel(**cfg)


def build_vae(config: dict | None = None, **overrides):
    """A randomly initialised AutoencoderKL (default: SD v1.5's config)."""
    cfg = dict(copy.deepcopy(config or SD15_VAE_CONFIG), **overrides)
    return AutoencoderKL(**cfg)


def train_scheduler(config: dict | None = None):
    """The DDPM noise schedule used in training (SD v1.5's betas)."""
    return DDPMScheduler.from_config(config or SD15_SCHEDULER_CONFIG)


def make_scheduler(name: str, config: dict):
    """A sampling scheduler from the training schedule's config: 'ddim', 'dpm' (DPM-Solver++ 2M) or 'euler'."""
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def expand_unet_in_channels(unet, in_channels: int = 8):
    """Widen `conv_in` of a (4-channel) UNet to `in_channels`, the extra input weights zero-initialised.

    This is how InstructPix2Pix (and BiomedJourney) start from Stable Diffusion's text-to-image UNet:
    with the extra (prior-latent) channels at zero weight, the expanded model computes exactly what the
    4-channel model did. Returns a new UNet; the argument is not modified.
    """
    old = unet.conv_in
    if old.in_channels == in_channels:
        return copy.deepcopy(unet)
    if old.in_channels > in_channels:
        raise ValueError(f"UNet already has {old.in_channels} input channels (> {in_channels})")
    cfg = dict(unet.config)
    cfg["in_channels"] = in_channels
    new = UNet2DConditionModel.from_config(cfg)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("conv_in.")}
    new.load_state_dict(state, strict=False)
    with torch.no_grad():
        new.conv_in.weight.zero_()
        new.conv_in.weight[:, : old.in_channels] = old.weight
        new.conv_in.bias.copy_(old.bias)
    return new.to(dtype=old.weight.dtype)


def to_batch(images, size: int) -> torch.Tensor:
    """float H,W or N,H,W (numpy or torch) in [0,1] -> float32 tensor N,1,size,size (`resize_image`)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected an image H,W or a batch N,H,W, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("image contains NaN or inf values")
    x = x[:, None]
    if x.shape[-2:] != (size, size):
        x = torch.from_numpy(resize_image(x[:, 0].numpy(), size))[:, None]
    return x.clamp(0, 1)


class BiomedJourneyPipeline:
    """Prior image + progression text -> counterfactual follow-up image (paper §4.2).

    Parts: `vae` (AutoencoderKL, 1 or 3 image channels; grey images are repeated), `unet`
    (8 input channels), `text_encoder` (frozen `encoders.TextEncoder`, may be None when only cached
    text states are used, e.g. the paper-scale dry run), `projection` (nn.Linear text width ->
    cross-attention width), `scheduler_config` (the training noise schedule), `image_size`, `guidance` (the
    default (text, image) scales of `__call__`; `from_pretrained` reads them with `read_guidance`).
    """
    guidance: tuple[float, float] = IP2P_GUIDANCE
    strength: float = 1.0  # default of `__call__`'s strength (1 = from pure noise, InstructPix2Pix)
    output: str = "decoded"  # default of `__call__`'s output (OUTPUTS)
    # default of `__call__`'s text_guidance_min_t: below this share of the noise schedule the text scale is 1
    text_guidance_min_t: float = 0.0
    edit_mask: float = 0.0  # default of `__call__`'s edit_mask (0: no mask, the whole image may change)
    # the share of the noise schedule the UNet was trained on (TrainConfig.timestep_max): no start from noisier latents
    max_strength: float = 1.0
    # "unscaled": the prior's latent is the posterior mode as is (InstructPix2Pix); "scaled": x scaling_factor
    # (models saved before bmj_pipeline.json recorded it)
    prior_latents: str = "unscaled"
    # "image": the sampled latent is the follow-up's (InstructPix2Pix); "residual": it is the follow-up's minus the
    # prior's, x residual_scale (a demo-profile departure, TrainConfig.target), and the prior's is added back
    target: str = "image"
    residual_scale: float = 1.0

    def __init__(self, vae, unet, text_encoder, projection: nn.Module, scheduler_config: dict | None = None,
                 image_size: int = 64, null_prompt: str = ""):
        self.vae, self.unet, self.text_encoder, self.projection = vae, unet, text_encoder, projection
        # normalised through DDPMScheduler so an in-memory and a reloaded pipeline sample identically
        self.scheduler_config = {k: v for k, v in train_scheduler(scheduler_config).config.items()
                                 if not k.startswith("_")}
        self.image_size = int(image_size)
        self.null_prompt = null_prompt
        self._text_cache: dict[str, torch.Tensor] = {}

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, vae, text_encoder, unet_config: dict | None = None, image_size: int = 64,
              text_dim: int | None = None, unet=None):
        """A new pipeline around a trained VAE and text encoder, with a random UNet and projection."""
        unet = unet if unet is not None else build_unet(unet_config)
        if text_dim is None:
            if text_encoder is None:
                raise ValueError("give text_dim when there is no text encoder")
            text_dim = text_encoder.width
        proj = nn.Linear(int(text_dim), unet.config.cross_attention_dim)
        return cls(vae, unet, text_encoder, proj, SD15_SCHEDULER_CONFIG, image_size)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device) -> "BiomedJourneyPipeline":
        for m in (self.vae, self.unet, self.projection, self.text_encoder):
            if m is not None:
                m.to(device)
        self._text_cache.clear()
        return self

    @property
    def prior_factor(self) -> float:
        """What puts the prior's conditioning latent (`encode_prior`) on the diffusion latent's scale."""
        return float(self.vae.config.scaling_factor) if self.prior_latents == "unscaled" else 1.0

    @property
    def latent_factor(self) -> int:
        return vae_downsampling(self.vae.config)

    # ---- encoders ---------------------------------------------------------------------------
    def _vae_in(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2 - 1
        c = self.vae.config.in_channels
        return x.repeat(1, c, 1, 1) if c != 1 else x

    @torch.no_grad()
    def encode_images(self, images, size: int | None = None, batch_size: int = 32,
                      scaled: bool = True) -> torch.Tensor:
        """Images in [0,1] (H,W / N,H,W array or N,1,H,W tensor) -> latents (posterior mode), float32 on CPU:
        x the VAE's scaling_factor (the diffusion latent, the default) or, `scaled=False`, as is."""
        x = images if torch.is_tensor(images) and images.ndim == 4 else to_batch(images, size or self.image_size)
        dtype = next(self.vae.parameters()).dtype
        out = []
        for i in range(0, len(x), batch_size):
            xb = self._vae_in(x[i:i + batch_size].to(self.device, dtype))
            out.append(self.vae.encode(xb).latent_dist.mode().float().cpu())
        z = torch.cat(out)
        return z * self.vae.config.scaling_factor if scaled else z

    def encode_prior(self, images, size: int | None = None) -> torch.Tensor:
        """The prior image's conditioning latent, on CPU: the posterior mode as is (InstructPix2Pix), or scaled
        for a model saved with `prior_latents` "scaled"."""
        return self.encode_images(images, size, scaled=self.prior_latents == "scaled")

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Scaled latents -> images N,1,H,W in [0,1], on CPU. As diffusers' VaeImageProcessor: each channel
        is mapped to [0,1] and clamped; an RGB VAE's clamped channels are then averaged to one grey image."""
        dtype = next(self.vae.parameters()).dtype
        out = []
        for i in range(0, len(latents), batch_size):
            z = latents[i:i + batch_size].to(self.device, dtype) / self.vae.config.scaling_factor
            x = self.vae.decode(z).sample.float()
            out.append((x * 0.5 + 0.5).clamp(0, 1).mean(1, keepdim=True).cpu())
        return torch.cat(out)

    def reconstruct(self, images, size: int | None = None) -> np.ndarray:
        """Images in [0,1] through the VAE and back (N,H,W at the model's size): the best a latent model can
        return, the reference of the evaluation's null-edit and reversibility probes."""
        return self.decode_latents(self.encode_images(images, size))[:, 0].numpy()

    @torch.no_grad()
    def text_states(self, prompts: Sequence[str]) -> torch.Tensor:
        """Frozen text-tower token states N,L,D (before the learnable projection), memoised per prompt."""
        if self.text_encoder is None:
            raise RuntimeError("this pipeline has no text encoder; pass cached text states instead")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            for p, s in zip(missing, self.text_encoder.encode(missing)):
                self._text_cache[p] = s.cpu()
        return torch.stack([self._text_cache[p] for p in prompts])

    def dummy_prior(self, n: int = 1) -> np.ndarray:
        """Stage 1's prior: constant-128 images at the model's size."""
        return np.full((n, self.image_size, self.image_size), DUMMY_PRIOR_VALUE, np.float32)

    # ---- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prior, prompt: str | Sequence[str], text_scale: float | None = None,
                 image_scale: float | None = None, steps: int = 20, scheduler: str = "dpm", seed: int = 0, batch_size: int = 16,
                 out_size: int | None = None, progress: bool = False,
                 callback: Callable[[int, int], None] | None = None, strength: float | None = None,
                 output: str | None = None, text_guidance_min_t: float | None = None,
                 edit_mask: float | None = None) -> np.ndarray:
        """Generate counterfactual follow-ups. Returns float32 N,H,W in [0,1] at `out_size` (default the
        model's image_size).

        `prior`: H,W or N,H,W float array in [0,1] (resized to the model's size); `prompt`: one string
        (broadcast) or N strings; a single prior with N prompts is broadcast too. Sample i's starting
        noise comes from seed + i, so a sample does not depend on the batch it is generated in.
        `text_scale` = s_text, `image_scale` = s_image; None = the model's default (`self.guidance`: its folder's
        guidance.json when loaded from one that has it, else InstructPix2Pix's 7.5 / 1.5). `callback(done, total)` is called after every
        denoising step (total = steps x batches), e.g. for a progress bar in a widget.
        `strength` < 1 starts from the prior's latent noised to that fraction of the schedule and runs that
        fraction of the steps (diffusers' img2img); None = the model's default (`self.strength`), 1 = from pure
        noise (InstructPix2Pix, the paper).
        `output`: "decoded" (the sampled latent decoded, the paper) or "prior_plus_change" (the prior at the model's
        size plus decode(sampled) - decode(prior's latent)); None = the model's default (`self.output`).
        `text_guidance_min_t`: guidance in a limited interval (Kynkaanniemi et al. 2024), for the text only: at the
        denoising steps whose timestep lies below this share of the training schedule the text scale is 1 (the
        text-conditioned prediction, unamplified), so the fine detail drawn last is not pushed by text guidance;
        0 = text guidance at every step (InstructPix2Pix, the paper); None = the model's default
        (`self.text_guidance_min_t`, its guidance.json's settings.text_guidance_min_t).
        `edit_mask`: change only where the sentence makes the model's prediction differ from the text-dropped one
        (DiffEdit's mask, the module docstring; larger = a smaller region); 0 = the whole image may change (the
        paper); None = the model's default (`self.edit_mask`, its guidance.json's settings.edit_mask).
        """
        if self.device.type == "cpu":
            use_run_threads()
        for m in (self.vae, self.unet, self.projection, self.text_encoder):
            if m is not None:
                m.eval()
        priors, prompts = self._pairs(prior, prompt)
        n = len(priors)
        text_scale = self.guidance[0] if text_scale is None else text_scale
        image_scale = self.guidance[1] if image_scale is None else image_scale
        strength = self.strength if strength is None else strength
        output = self.output if output is None else output
        min_t = self.text_guidance_min_t if text_guidance_min_t is None else text_guidance_min_t
        edit_mask = self.edit_mask if edit_mask is None else edit_mask
        check_sampling(text_scale, image_scale, steps, seed, strength)
        check_text_guidance_min_t(min_t)
        check_edit_mask(edit_mask)
        self.check_strength(strength)
        if output not in OUTPUTS:
            raise ValueError(f"output {output!r} is not allowed: give one of {', '.join(OUTPUTS)}")
        it = range(0, n, batch_size)
        if progress:
            it = tqdm(it, desc="generate", unit="batch")
        n_batches = len(range(0, n, batch_size))
        outs = []
        for b, i in enumerate(it):
            step_done = (lambda k, total, b=b: callback(b * total + k, n_batches * total)) if callback else None
            outs.append(self._sample(priors[i:i + batch_size], prompts[i:i + batch_size], text_scale, image_scale,
                                     steps, scheduler, [seed + j for j in range(i, min(i + batch_size, n))],
                                     step_done, strength, output, min_t, edit_mask))
        x = torch.cat(outs)
        if out_size and out_size != x.shape[-1]:
            x = torch.from_numpy(resize_image(x[:, 0].numpy(), out_size))[:, None].clamp(0, 1)
        return x[:, 0].numpy().astype(np.float32)

    def _pairs(self, prior, prompt) -> tuple[torch.Tensor, list[str]]:
        """(priors N,1,H,W at the model's size, N prompts): one prior or one prompt is broadcast to the other's count."""
        priors = to_batch(prior, self.image_size)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if any(not isinstance(p, str) for p in prompts):
            raise TypeError("prompt must be a string or a list of strings")
        n = max(len(priors), len(prompts))
        if len(priors) == 1:
            priors = priors.expand(n, -1, -1, -1)
        if len(prompts) == 1:
            prompts = prompts * n
        if len(priors) != len(prompts):
            raise ValueError(f"{len(priors)} priors but {len(prompts)} prompts")
        return priors, prompts

    def guided_eps(self, latents, t, prior_latents, text_emb, null_emb, text_scale, image_scale):
        """Dual classifier-free guidance; the three predictions in one batched UNet call."""
        sched_in = torch.cat([latents] * 3)
        img = torch.cat([prior_latents, prior_latents, torch.zeros_like(prior_latents)])
        txt = torch.cat([text_emb, null_emb, null_emb])
        unet_dtype = self.unet.dtype
        eps = self.unet(torch.cat([sched_in, img], 1).to(unet_dtype), t,
                        encoder_hidden_states=txt.to(unet_dtype)).sample.float()
        e_ti, e_i, e_u = eps.chunk(3)
        return e_u + text_scale * (e_ti - e_i) + image_scale * (e_i - e_u)

    def _start_latent(self, prior_lat: torch.Tensor) -> torch.Tensor:
        """The clean latent a sample of this prior would be if nothing changed (zero for a residual model)."""
        return self.prior_factor * prior_lat if self.target == "image" else torch.zeros_like(prior_lat)

    def _embeddings(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected prompt states, projected null-prompt states), one row per prompt."""
        dev, proj_dtype = self.device, self.projection.weight.dtype
        text_emb = self.projection(self.text_states(prompts).to(dev, proj_dtype)).float()
        null_emb = self.projection(self.text_states([self.null_prompt]).to(dev, proj_dtype)).float()
        return text_emb, null_emb.expand(len(prompts), -1, -1)

    def _mask(self, prior_lat, text_emb, null_emb, seeds, ratio: float) -> torch.Tensor:
        """DiffEdit's edit mask on the latent grid (N,1,h,w; 1 = may change), the module docstring's rule."""
        sched = make_scheduler("ddim", self.scheduler_config)  # only its add_noise (the training schedule's)
        t = torch.tensor(int(min(EDIT_MASK_T, self.max_strength) * self.scheduler_config["num_train_timesteps"]))
        start, shape = self._start_latent(prior_lat), prior_lat.shape[1:]
        diff = torch.zeros(len(prior_lat), *shape[1:], device=prior_lat.device)
        for k in range(EDIT_MASK_MAPS):  # the mask's noise comes from the sample's seed: independent of the batch
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s) * 7919 + k + 1))
                                 for s in seeds]).to(prior_lat)
            x = sched.add_noise(start, noise, t)
            pred = self.unet(torch.cat([torch.cat([x, x]), torch.cat([prior_lat, prior_lat])], 1).to(self.unet.dtype),
                             t, encoder_hidden_states=torch.cat([text_emb, null_emb]).to(self.unet.dtype)).sample.float()
            with_text, without = pred.chunk(2)
            diff += (with_text - without).abs().mean(1)
        cut = diff.mean((1, 2), keepdim=True) * ratio / 2
        return (diff > cut).float()[:, None]

    @torch.no_grad()
    def edit_region(self, prior, prompt: str | Sequence[str], edit_mask: float | None = None,
                    seed: int = 0) -> np.ndarray:
        """Where `__call__` with the same prior, prompt, seed and `edit_mask` may change the image: N,H,W of 0 / 1 at
        the model's image size (each latent pixel's square). All ones when edit_mask is 0."""
        edit_mask = self.edit_mask if edit_mask is None else edit_mask
        check_edit_mask(edit_mask)
        priors, prompts = self._pairs(prior, prompt)
        prior_lat = self.encode_prior(priors).to(self.device)
        if not edit_mask:
            m = torch.ones(len(priors), 1, *prior_lat.shape[2:])
        else:
            m = self._mask(prior_lat, *self._embeddings(prompts), [seed + i for i in range(len(priors))], edit_mask)
        f = self.latent_factor
        return m[:, 0].repeat_interleave(f, 1).repeat_interleave(f, 2).cpu().numpy()

    def _sample(self, priors, prompts, text_scale, image_scale, steps, scheduler, seeds, step_done=None,
                strength: float = 1.0, output: str = "decoded", text_guidance_min_t: float = 0.0,
                edit_mask: float = 0.0):
        dev = self.device
        sched = make_scheduler(scheduler, self.scheduler_config)
        sched.set_timesteps(steps, device=dev)
        prior_lat = self.encode_prior(priors).to(dev)
        text_emb, null_emb = self._embeddings(prompts)
        shape = prior_lat.shape[1:]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(dev)
        start = self._start_latent(prior_lat)
        mask = self._mask(prior_lat, text_emb, null_emb, seeds, edit_mask) if edit_mask else None
        timesteps = sched.timesteps
        if strength < 1:
            first = min(len(timesteps) - 1, int(round(len(timesteps) * (1 - strength))))
            timesteps = timesteps[first:]
            if hasattr(sched, "set_begin_index"):  # DDIM has no step index: it steps from any timestep
                sched.set_begin_index(first)
            latents = sched.add_noise(start, noise, timesteps[:1])
        else:
            latents = noise * sched.init_noise_sigma
        t_min = text_guidance_min_t * self.scheduler_config["num_train_timesteps"]
        for k, t in enumerate(timesteps):
            inp = sched.scale_model_input(latents, t)  # only the noisy latent is scaled, not the prior's
            eps = self.guided_eps(inp, t, prior_lat, text_emb, null_emb,
                                  text_scale if float(t) >= t_min else 1.0, image_scale)
            latents = sched.step(eps, t, latents).prev_sample
            if mask is not None:  # outside the mask: the prior's latent at the next noise level (clean after the last)
                kept = sched.add_noise(start, noise, timesteps[k + 1:k + 2]) if k + 1 < len(timesteps) else start
                latents = mask * latents + (1 - mask) * kept
            if step_done:
                step_done(k + 1, len(timesteps))
        if self.target == "residual":
            latents = self.prior_factor * prior_lat + latents / self.residual_scale
        x = self.decode_latents(latents)
        if output == "prior_plus_change":
            x = (priors.to(x) + x - self.decode_latents(self.prior_factor * prior_lat)).clamp(0, 1)
        return x

    def check_strength(self, strength: float) -> None:
        """Refuse a strength above `max_strength`: sampling would start from noise levels the model never saw."""
        if strength > self.max_strength + 1e-9:
            raise ValueError(f"strength {strength:g} is not allowed for this model: it was trained on the first "
                             f"{self.max_strength:g} of the noise schedule only; give a strength up to {self.max_strength:g}")

    # ---- persistence --------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the pipeline as one folder (vae/, unet/, text_encoder/, projection.safetensors,
        scheduler/, bmj_pipeline.json), atomically: a crash leaves the old folder or none."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.vae.save_pretrained(tmp / "vae")
            self.unet.save_pretrained(tmp / "unet")
            DDPMScheduler.from_config(self.scheduler_config).save_pretrained(tmp / "scheduler")
            save_file({k: v.detach().float().cpu().contiguous() for k, v in self.projection.state_dict().items()},
                      str(tmp / "projection.safetensors"))
            if self.text_encoder is not None:
                self.text_encoder.save(tmp / "text_encoder")
            atomic_write_json(tmp / PIPELINE_FILE, {
                "class": "BiomedJourneyPipeline", "image_size": self.image_size,
                "null_prompt": self.null_prompt, "text_dim": self.projection.in_features,
                "has_text_encoder": self.text_encoder is not None, "prior_latents": self.prior_latents,
                "target": self.target, "residual_scale": self.residual_scale, "max_strength": self.max_strength})
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        text_encoder=None) -> "BiomedJourneyPipeline":
        """Load a folder written by `save_pretrained` ('demo' = the shipped demo model, bmjlib/model/demo).
        `text_encoder` overrides the stored one."""
        if str(path) == "demo":
            path = resolve_model("demo")

        path = Path(path)
        meta_file = path / PIPELINE_FILE
        if not meta_file.is_file():
            what = "does not exist" if not path.exists() else f"has no {PIPELINE_FILE}"
            raise FileNotFoundError(f"model folder {path} {what}: not a saved BiomedJourneyPipeline "
                                    "(train one with notebooks 04-05 or bmjlib.model.train.train_stage)")
        meta = read_model_meta(path, text_encoder=text_encoder is None)
        vae = AutoencoderKL.from_pretrained(path / "vae")
        unet = UNet2DConditionModel.from_pretrained(path / "unet")
        sched = dict(DDPMScheduler.load_config(path / "scheduler"))
        state = load_file(str(path / "projection.safetensors"))
        proj = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        proj.load_state_dict(state)
        if text_encoder is None and meta.get("has_text_encoder", True):
            text_encoder = TextEncoder.load(f"local-dir:{path / 'text_encoder'}")
        pipe = cls(vae, unet, text_encoder, proj, sched, meta["image_size"], meta.get("null_prompt", ""))
        pipe.guidance = read_guidance(path)
        pipe.prior_latents = meta.get("prior_latents", "scaled")  # absent: saved before the IP2P convention
        pipe.target, pipe.residual_scale = meta.get("target", "image"), float(meta.get("residual_scale", 1.0))
        pipe.max_strength, pipe.strength = read_max_strength(path, meta)
        pipe.output = read_output(path)
        pipe.text_guidance_min_t = read_text_guidance_min_t(path)
        pipe.edit_mask = read_edit_mask(path)
        for m in (vae, unet, proj):
            m.eval().requires_grad_(False)
        return pipe.to(device)
