"""Two-stage training of BiomedJourney through `accelerate` (paper §4.2 "two-stage curriculum", §5.1).

Stage 1 (`prior="dummy"`): every single image-report pair, the prior being a constant-128 image;
stage 2 (`prior="registered"`, `init_from=<stage-1 model>`): (prior, progression description,
registered follow-up) triples. `init_from=None` with pair data is the one-stage ablation;
`prior="unregistered"` uses the raw follow-up (Table 2's "no registration" arm).

Following InstructPix2Pix (`train_instruct_pix2pix.py` in diffusers), with the paper's settings:
AdamW at a fixed lr 1e-4, horizontal flip and random crop applied identically to prior and follow-up,
conditioning dropout (text only / image only / both, 5 % each) so both guidance scales work, optional
EMA, bf16 on GPU, gradient clipping. Departures, each for a stated reason:
- The VAE and text tower are frozen, so their outputs are computed once and cached on disk
  (`latents.py`); training reads the cache. Crop and flip therefore act on latents: images are
  encoded at image_size + 2 x margin x (VAE factor) px in both orientations, and a crop is taken at a
  random latent offset (the same for prior and follow-up).
- A flip mirrors the patient, so "left" and "right" are swapped in the sentence of a flipped sample
  (the paper does not say; an unswapped flip would teach the model that "left" means either side).
- A NaN/inf loss or gradient skips the step; `max_bad_steps` in a row abort; weights are checked
  finite before every save. Checkpoints every N steps are accelerate's `save_state` (models, optimizer,
  RNG states; the newest K kept) sealed with the sha256 of each file, and a killed run resumes from the
  newest complete one; per-step randomness is seeded by (seed, step), so a resumed run takes exactly
  the steps an uninterrupted one would.
- Many processes (`accelerate launch`, DDP): `batch_size` is the global batch of one optimizer step,
  split over processes and `grad_accum_steps` micro-batches; each example's randomness depends on
  (seed, step, its place in the global batch), never on the process, and the loss is the mean over the
  global batch, so N processes train the model one process trains (`Trainer`).

API (used by notebooks 04, 05, 08):
    model_dir = train_stage(config, table, out_dir, init_from=None, text_column="impression",
                            prior="dummy", vae=..., text_encoder=...)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import (SAFE_MODEL_NAME, DistributedType, GradientAccumulationPlugin, ProjectConfiguration,
                               broadcast_object_list)
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file as load_safetensors
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from bmjlib.io import (atomic_dir, atomic_torch_save, atomic_write_csv, atomic_write_json, code_fingerprint_of,
                       contents_fingerprint, fingerprint, sha256_file)
from bmjlib.model.configs import SD15_UNET_CONFIG, SD15_VAE_CONFIG
from bmjlib.model.encoders import TextEncoder, load_vae
from bmjlib.model.latents import build_cache, encoder_fingerprint, module_fingerprint
from bmjlib.model.pipeline import BiomedJourneyPipeline, build_unet, build_vae, expand_unet_in_channels, train_scheduler
from bmjlib.runtime import record_timing, use_run_threads

PRIOR_MODES = ("dummy", "registered", "unregistered")
TARGET_COLUMN = {"dummy": "image_path", "registered": "registered_path", "unregistered": "followup_path"}


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


TARGETS = ("image", "residual")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training stage (paper §5.1 defaults where the paper gives them)."""
    image_size: int = 64
    batch_size: int = 32             # per optimizer step, summed over processes
    lr: float = 1e-4                 # fixed (paper)
    weight_decay: float = 1e-2
    epochs: float = 10
    max_steps: int | None = None     # overrides epochs when set
    cond_dropout: float = 0.05       # InstructPix2Pix: P(text only dropped) = P(both) = P(image only) = this
    hflip: bool = True
    crop_margin: int = 1             # latent px each side; random crop offsets 0 .. 2*margin
    ema: bool = False
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    mixed_precision: str = "auto"    # auto = bf16 on GPU, fp32 on CPU; or "no" | "bf16" | "fp16"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    max_bad_steps: int = 5
    seed: int = 0
    unet_config: dict | None = None  # None: pipeline.DEMO_UNET_CONFIG (ignored with init_from)
    log_every: int = 1
    # Demo departure (a profile setting): each registered follow-up with its exposure fitted to its prior's
    # (registration.read_matched); the paper trains on the follow-up as it is.
    match_targets: bool = False
    # Demo departure (a profile setting): "residual" diffuses the follow-up's latent minus the prior's, scaled to unit
    # standard deviation over the training examples, and `BiomedJourneyPipeline` adds the prior's latent back after
    # sampling, so keeping the patient costs the model nothing; "image" (the paper, InstructPix2Pix) diffuses the
    # follow-up's latent. Stage 1 (no prior) always diffuses the image.
    target: str = "image"
    # The paper trains at a fixed lr with no EMA and plain epsilon MSE; where it is silent these are profile settings:
    lr_schedule: str = "constant"    # "constant" | "cosine" (to 0 over the run, after lr_warmup_steps): diffusers' get_scheduler
    lr_warmup_steps: int = 0
    snr_gamma: float = 0.0           # min-SNR-gamma loss weighting (Hang et al. 2023; 5 is theirs); 0 = plain MSE
    change_weight: float = 0.0       # extra loss weight where the follow-up's latent differs from the prior's:
                                     # w = 1 + change_weight x |z_target - z_prior| / its per-sample mean; 0 = none
    timestep_max: float = 1.0        # share of the noise schedule trained: t ~ U{0 .. round(timestep_max x T) - 1};
                                     # a sampler started from the prior at strength s visits only t < s x T
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon" (the paper, Stable Diffusion v1.5) or
                                     # "v_prediction" (the velocity, Salimans & Ho 2022); saved in the model's
                                     # scheduler config, which every sampler reads
    null_text_keeps: bool = False    # a sample whose text alone is dropped learns the prior itself as its target, so
                                     # the empty prompt means "keep the patient" and text guidance pushes away from the
                                     # prior, not from the average follow-up (InstructPix2Pix: the follow-up as it is)
    # How the step is executed, not what it computes (left out of the stage's key: a model trained with other
    # values of these is the same model, to float tolerance; tests/test_distributed.py checks each against the default)
    grad_accum_steps: int = 0        # micro-batches per process per optimizer step; 0 = accelerate's setting
                                     # (`accelerate launch --gradient_accumulation_steps N`, else 1)
    attention: str = "sdpa"          # "sdpa" = torch's scaled_dot_product_attention (diffusers' default) | "classic"
    channels_last: bool = False      # UNet weights, hence its convolutions, in channels_last memory format
    fused_adamw: bool = True         # torch's fused AdamW kernel (CPU and GPU) instead of its per-tensor loop: 200 demo
                                     # stage-2 steps of 32 on 2 CPU threads 19.3-19.7 s vs 20.7-20.8 s; `bmj bench`
                                     # row "training with fused AdamW"
    compile: str = ""                # "" = eager; else a torch.compile backend for the UNet ("inductor" on a GPU)

    @classmethod
    def from_dict(cls, d: dict | "TrainConfig" | None) -> "TrainConfig":
        if isinstance(d, cls):
            return d
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        if d.get("target", "image") not in TARGETS:
            raise ValueError(f"target: {d['target']!r} is not one of {', '.join(TARGETS)}")
        if not 0 < float(d.get("timestep_max", 1.0)) <= 1:
            raise ValueError(f"timestep_max: {d['timestep_max']!r} is not in (0, 1] (the share of the schedule trained)")
        return _checked(cls(**d))


def _checked(cfg: TrainConfig) -> TrainConfig:
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: {cfg.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    return cfg


# ----------------------------------------------------------------------------- data

def stage_rows(table: pd.DataFrame, prior: str, text_column: str, split: str | Sequence[str] | None = "train",
               root: str | os.PathLike | None = None) -> pd.DataFrame:
    """The rows a stage trains on: (prior_path or "", target_path, text), absolute paths, empty texts dropped."""
    if prior not in PRIOR_MODES:
        raise ValueError(f"prior must be one of {PRIOR_MODES}, got {prior!r}")
    tab = table
    if split and "split" in tab.columns:
        tab = tab[tab["split"].isin([split] if isinstance(split, str) else list(split))]
    tcol = TARGET_COLUMN[prior]
    need = [tcol, text_column] + ([] if prior == "dummy" else ["prior_path"])
    missing = [c for c in need if c not in tab.columns]
    if missing:
        raise KeyError(f"table has no column(s) {missing} needed for prior={prior!r} (columns: {list(tab.columns)})")
    text = tab[text_column].fillna("").astype(str).str.strip()

    def absolute(col):
        p = tab[col].astype(str)
        return p if root is None else p.map(lambda s: s if os.path.isabs(s) else str(Path(root) / s))

    rows = pd.DataFrame({
        "prior_path": "" if prior == "dummy" else absolute("prior_path"),
        "target_path": absolute(tcol), "text": text})
    return rows[rows["text"] != ""].reset_index(drop=True)


def diffusion_loss(unet, projection, noise_scheduler, batch: dict, generator: torch.Generator,
                   cond_dropout: float, snr_gamma: float = 0.0, change_weight: float = 0.0,
                   timestep_max: float = 1.0) -> torch.Tensor:
    """Epsilon-prediction MSE (velocity, when the schedule's prediction_type is v_prediction) with InstructPix2Pix
    conditioning dropout (one training step's loss), optionally min-SNR-weighted per sample (`snr_gamma`), weighted
    per latent pixel where target and prior differ (`change_weight`), and with timesteps drawn from the first
    `timestep_max` of the schedule only. With batch["keep"] (TrainConfig.null_text_keeps) a sample whose text alone
    is dropped is trained to return it."""
    target, prior, text, null = batch["target"], batch["prior"], batch["text"], batch["null"]
    weight = None
    if change_weight and batch.get("change") is not None:  # N,1,h,w: |follow-up - prior| in latent space
        d = batch["change"]
        weight = 1 + change_weight * d / d.mean((2, 3), keepdim=True).clamp_min(1e-6)
    n, dev = len(target), target.device
    noise = torch.randn(target.shape, generator=generator).to(dev)
    t_hi = max(1, round(timestep_max * noise_scheduler.config.num_train_timesteps))
    t = torch.randint(0, t_hi, (n,), generator=generator).to(dev)
    noisy = noise_scheduler.add_noise(target, noise, t)
    p = torch.rand(n, generator=generator).to(dev)
    drop_text = (p < 2 * cond_dropout)[:, None, None]
    drop_image = ((p >= cond_dropout) & (p < 3 * cond_dropout))[:, None, None, None]
    text = torch.where(drop_text, null.expand_as(text), text)
    prior = torch.where(drop_image, torch.zeros_like(prior), prior)
    if batch.get("keep") is not None:  # text dropped, image kept: the target is the prior itself
        text_only = drop_text[..., None] & ~drop_image
        target = torch.where(text_only, batch["keep"], target)
        noisy = noise_scheduler.add_noise(target, noise, t)
    ctx = projection(text.to(projection.weight.dtype))
    pred = unet(torch.cat([noisy, prior], 1), t, encoder_hidden_states=ctx).sample
    v_pred = noise_scheduler.config.prediction_type == "v_prediction"
    goal = noise_scheduler.get_velocity(target, noise, t) if v_pred else noise
    err = (pred.float() - goal.float()) ** 2
    if weight is not None:
        err = err * weight / weight.mean((2, 3), keepdim=True)  # where, not how much: each sample's mean weight 1
    per_sample = err.mean((1, 2, 3))
    if snr_gamma:
        snr = compute_snr(noise_scheduler, t)
        # min-SNR's weight in the epsilon form, min(snr, gamma) / snr; in the v form, min(snr, gamma) / (snr + 1)
        per_sample = per_sample * torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_pred else snr)
    return per_sample.mean()


# ----------------------------------------------------------------------------- one optimizer step

# Setting this to a folder makes every process append the random numbers it draws at each step, with the global
# samples they belong to, to <folder>/draws-rank<r>.jsonl (what tests/test_distributed.py reads). Off by default.
DEBUG_ENV = "BMJ_TRAIN_DEBUG"
ATTENTION = ("sdpa", "classic")
# TrainConfig fields that change how a step runs, not what it computes: not part of the stage's key
EXECUTION_OPTIONS = ("grad_accum_steps", "attention", "channels_last", "fused_adamw", "compile")
# Fields added after models were trained: left out of the key at their default, so those models stay current
KEY_OMITTED_AT_DEFAULT = {"timestep_max": 1.0, "null_text_keeps": False, "prediction_type": "epsilon"}


class _BatchDraws(TorchFunctionMode):
    """Per-sample randomness of a step split over processes or micro-batches.

    Every draw from the step's generator `g` (flip, crop offset, noise, timestep, conditioning dropout) is
    made for the whole global batch of `total` examples and cut to this part's rows [lo, hi): example i of
    the global batch gets the same numbers whichever process and micro-batch it lands in, and the numbers an
    unsplit process draws. A draw without one row per example cannot be split that way and is refused."""

    DRAWS = (torch.rand, torch.randn, torch.randint)

    def __init__(self, g: torch.Generator, lo: int, hi: int, total: int, record: list | None = None):
        super().__init__()
        self.g, self.lo, self.hi, self.total, self.record = g, lo, hi, total, record

    def _whole(self, size) -> tuple:
        size = tuple(int(s) for s in size)
        if not size or size[0] != self.hi - self.lo:
            raise RuntimeError(f"a random draw of shape {list(size)} in a training step has not one row per example "
                               f"({self.hi - self.lo} here), so the step cannot be split over processes or micro-batches")
        return (self.total,) + size[1:]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("generator") is not self.g:
            return func(*args, **kwargs)
        if func not in self.DRAWS:
            raise RuntimeError(f"{getattr(func, '__name__', func)} with the step's generator: only torch.rand, "
                               "torch.randn and torch.randint draws can be split per example")
        args = list(args)
        if "size" in kwargs:
            kwargs["size"] = self._whole(kwargs["size"])
        elif func is torch.randint:
            args[-1] = self._whole(args[-1])
        else:
            args = [self._whole(args[0] if len(args) == 1 and not isinstance(args[0], int) else args)]
        part = func(*args, **kwargs)[self.lo:self.hi]
        if self.record is not None:
            self.record.append({"draw": func.__name__, "shape": list(part.shape), "values": part.flatten().tolist()})
        return part


class _Prepared:
    """A module prepared by accelerate (wrapped by DDP or FSDP): called through the wrapper, its attributes
    read from the module itself (diffusion_loss reads `projection.weight`)."""

    def __init__(self, wrapped, module):
        self._wrapped, self._module = wrapped, module

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


class TensorData:
    """Training examples held in memory (the benchmark's and the paper-scale dry run's random latents): the
    interface of `latents.CachedData` (`len`, `batch`, `null_states`) without augmentation."""

    def __init__(self, target: torch.Tensor, prior: torch.Tensor, text: torch.Tensor, null_states: torch.Tensor):
        self.target, self.prior, self.text, self.null_states = target, prior, text, null_states

    def __len__(self) -> int:
        return len(self.target)

    def batch(self, idx: torch.Tensor, g: torch.Generator, hflip: bool, device) -> dict:
        if hflip:
            raise ValueError("TensorData has no flip or crop: train it with hflip=False")
        return {"target": self.target[idx].to(device), "prior": self.prior[idx].to(device),
                "text": self.text[idx].to(device)}


def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() else "no"


def make_accelerator(cfg: TrainConfig, project_dir: str | os.PathLike | None = None,
                     cpu: bool | None = None) -> Accelerator:
    """The Accelerator of a stage: its mixed precision, gradient accumulation and (with `project_dir`)
    checkpoints as project_dir/checkpoints/checkpoint_<i>, the newest `keep_checkpoints` kept."""
    cfg = TrainConfig.from_dict(cfg)
    cpu = not torch.cuda.is_available() if cpu is None else cpu
    mp = _mixed_precision(cfg)
    if mp not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision: {cfg.mixed_precision!r} is not one of auto, no, bf16, fp16")
    if mp == "fp16" and cpu:
        raise ValueError("mixed_precision 'fp16' needs a CUDA GPU (float16 autocast with a loss scaler); "
                         "use 'bf16' or 'no' on a CPU")
    if not isinstance(cfg.grad_accum_steps, int) or cfg.grad_accum_steps < 0:
        raise ValueError(f"grad_accum_steps: {cfg.grad_accum_steps!r} is not a whole number >= 0 "
                         "(0 = accelerate's setting)")
    state = AcceleratorState._shared_state
    if state and not PartialState().use_distributed and (state.get("_mixed_precision") != mp
                                                         or (state.get("device") is not None
                                                             and (state["device"].type == "cpu") != cpu)):
        AcceleratorState._reset_state()  # one process training again at another precision (tests, bench arms)
    project = None
    if project_dir is not None:
        project = ProjectConfiguration(project_dir=str(project_dir), automatic_checkpoint_naming=True,
                                       total_limit=cfg.keep_checkpoints if cfg.keep_checkpoints > 0 else None)
    # grad_accum_steps > 0 wins over `accelerate launch --gradient_accumulation_steps`, which 0 leaves in charge
    accum = GradientAccumulationPlugin(num_steps=cfg.grad_accum_steps) if cfg.grad_accum_steps else None
    return Accelerator(mixed_precision=mp, cpu=cpu, project_config=project, gradient_accumulation_plugin=accum)


class Trainer:
    """The optimisation of one stage (paper §5.1): what `train_stage` runs step by step and `bmj bench --gpu` times.

    Optimizer step k trains on the global batch of `batch_size` examples at position k of its epoch's seeded
    permutation (an epoch's last batch holds the rest). The batch is cut into processes x micro-batches
    (`grad_accum_steps`) contiguous parts; each part's mean loss is weighted by its share of the batch, so the
    gradient is that of the mean loss over the global batch whatever the split. A part left without an
    example (a last batch smaller than the number of parts) runs one example at weight 0, so every process
    takes part in every all-reduce. The randomness of an example is a function of (seed, step, its place in
    the global batch) (`_BatchDraws`), so N processes x batch B/N, or B/k x k micro-batches, take the steps
    one process takes with batch B, to float tolerance. A NaN/inf loss or gradient skips the step on every
    process; `step` returns (ok, mean loss over the global batch)."""

    def __init__(self, cfg: TrainConfig | dict, unet, projection, noise_scheduler, data, acc: Accelerator,
                 debug_dir: str | os.PathLike | None = None, residual: tuple[float, float] | None = None,
                 total_steps: int = 1, has_prior: bool = True, prior_factor: float = 1.0):
        cfg = self.cfg = TrainConfig.from_dict(cfg)
        self.prior_factor = prior_factor  # puts a prior's conditioning latent on the target's scale
        # (prior factor, scale): the diffused target is (target - prior_factor x prior) x scale (TrainConfig.target)
        self.residual = residual
        if cfg.attention not in ATTENTION:
            raise ValueError(f"attention: {cfg.attention!r} is not one of {', '.join(ATTENTION)}")
        if cfg.compile and cfg.compile not in torch.compiler.list_backends(exclude_tags=()):
            raise ValueError(f"compile: {cfg.compile!r} is not a torch.compile backend "
                             f"({', '.join(torch.compiler.list_backends())}; '' = no compilation)")
        if acc.distributed_type == DistributedType.FSDP:
            # the finite-weight checks, EMA, the final save and the clipping over two models read whole weights
            raise ValueError("FSDP: this trainer runs under DDP (`accelerate launch --multi_gpu`); SD v1.5's UNet "
                             "with AdamW fits one 40 GB GPU, as in the paper")
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            acc.print("accelerate shards with FSDP on GPUs only: these processes train with DDP")
        self.acc, self.data, self.noise_scheduler = acc, data, noise_scheduler
        unet.set_attn_processor(AttnProcessor2_0() if cfg.attention == "sdpa" else AttnProcessor())
        unet.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        self.unet, self.proj = acc.prepare(unet.train(), projection.train())
        # the optimizer and the clipping see the prepared models' parameters (FSDP replaces them)
        self.params = list(self.unet.parameters()) + list(self.proj.parameters())
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                **({"fused": True} if cfg.fused_adamw else {}))
        self.opt = acc.prepare(opt)
        self.lr_sched = None
        if cfg.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: {cfg.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if cfg.lr_schedule != "constant" or cfg.lr_warmup_steps:
            # stepped once per optimizer step on every process; saved and restored with the checkpoints
            self.lr_sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=total_steps)
            acc.register_for_checkpointing(self.lr_sched)
        self.has_prior = has_prior
        self.ema = EMAModel(self.params, decay=cfg.ema_decay) if cfg.ema else None
        self.forward_unet = torch.compile(self.unet, backend=cfg.compile) if cfg.compile else self.unet
        plain = self.proj is acc.unwrap_model(self.proj)
        self.forward_proj = self.proj if plain else _Prepared(self.proj, acc.unwrap_model(self.proj))
        self.null = data.null_states.to(acc.device)
        self.world, self.rank = acc.num_processes, acc.process_index
        self.accum = acc.gradient_accumulation_steps
        self.n = len(data)
        self.steps_per_epoch = max(1, math.ceil(self.n / cfg.batch_size))
        self.debug = Path(debug_dir) / f"draws-rank{self.rank}.jsonl" if debug_dir else None
        if self.debug is not None:
            self.debug.parent.mkdir(parents=True, exist_ok=True)

    def batch_indices(self, step: int) -> torch.Tensor:
        """The examples of optimizer step `step` (0-based), in global-batch order."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch))
        return perm[pos * self.cfg.batch_size:(pos + 1) * self.cfg.batch_size]

    def _no_sync(self, last: bool):
        stack = contextlib.ExitStack()
        if not last:  # gradients are all-reduced once, after the last micro-batch
            for m in (self.unet, self.proj):
                stack.enter_context(self.acc.no_sync(m))
        return stack

    def step(self, step: int) -> tuple[bool, float]:
        """Optimizer step `step` (0-based): forward and backward over this process's parts of the global
        batch, clipping, AdamW (and EMA). Returns (ok, mean loss over the global batch)."""
        cfg, acc = self.cfg, self.acc
        idx = self.batch_indices(step)
        total, parts = len(idx), self.world * self.accum
        split = parts > 1 or self.debug is not None
        chunks = torch.arange(total).tensor_split(parts)
        loss_val, ok = 0.0, True
        for micro in range(self.accum):
            rows = chunks[micro * self.world + self.rank]
            lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 1)
            share = len(rows) / total  # 0 for a part without an example: it runs example 0 at weight 0
            g = torch.Generator().manual_seed(cfg.seed * 1000003 + step)  # (seed, step): resume takes the same step
            record = [] if self.debug is not None else None
            with self._no_sync(micro == self.accum - 1):
                with _BatchDraws(g, lo, hi, total, record) if split else contextlib.nullcontext():
                    batch = self.data.batch(idx[lo:hi], g, hflip=cfg.hflip, device=acc.device)
                    if cfg.change_weight and self.has_prior:
                        batch["change"] = (batch["target"] - batch["prior"]).abs().mean(1, keepdim=True)
                    if self.residual is not None:
                        k, scale = self.residual
                        batch["target"] = (batch["target"] - k * batch["prior"]) * scale
                    if cfg.null_text_keeps and self.has_prior:  # the prior as a target (a residual of 0)
                        batch["keep"] = (torch.zeros_like(batch["prior"]) if self.residual is not None
                                         else self.prior_factor * batch["prior"])
                    batch["null"] = self.null
                    with acc.autocast():
                        loss = diffusion_loss(self.forward_unet, self.forward_proj, self.noise_scheduler, batch, g,
                                              cfg.cond_dropout, cfg.snr_gamma, cfg.change_weight,
                                              cfg.timestep_max)
                if split:
                    part = float(acc.gather((loss.detach().float() * share)[None]).sum())
                else:
                    part = float(acc.gather(loss.detach()[None]).mean())
                loss_val += part
                if self.debug is not None:
                    with open(self.debug, "a") as f:
                        f.write(json.dumps({"step": step, "micro": micro, "rank": self.rank, "world": self.world,
                                            "samples": idx[lo:hi].tolist() if len(rows) else [], "share": share,
                                            "draws": record}) + "\n")
                if not math.isfinite(part):  # the same on every process (gathered): all skip the step
                    ok = False
                    break
                # accelerate divides by the accumulation steps and DDP averages over processes: this weight
                # makes the gradient that of the mean loss over the global batch
                acc.backward(loss * (self.world * self.accum * share) if split else loss)
        if ok:
            gnorm = acc.clip_grad_norm_(self.params, cfg.grad_clip) if cfg.grad_clip else None
            ok = gnorm is None or bool(torch.isfinite(torch.as_tensor(gnorm)))
            if ok:
                self.opt.step()
                if self.lr_sched is not None:
                    self.lr_sched.step()
                if self.ema is not None:
                    self.ema.step(self.params)
        self.opt.zero_grad(set_to_none=True)
        return ok, loss_val


# ----------------------------------------------------------------------------- checkpoints

# A checkpoint is accelerate's `save_state` folder (models, optimizer, every process's RNG state) plus
# train_state.json (step, loss log, the stage's key), ema.pt with EMA, and, written last, checkpoint.json:
# the sha256 of every other file. A folder whose files do not match it is torn (a run killed while saving).
SEAL_FILE, STATE_FILE, EMA_FILE = "checkpoint.json", "train_state.json", "ema.pt"
_CHECKPOINT = re.compile(r"checkpoint_(\d+)$")


def _all_finite(modules) -> bool:
    return all(torch.isfinite(p).all() for m in modules for p in m.state_dict().values()
               if torch.is_tensor(p) and p.is_floating_point())


def _checkpoint_folders(ckpt_root: Path) -> list[Path]:
    """accelerate's checkpoint_<i> folders, in the order they were written."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in ckpt_root.iterdir() if d.is_dir() and (m := _CHECKPOINT.match(d.name))]
    return [d for _, d in sorted(found)]


def seal_checkpoint(folder: Path, step: int) -> Path:
    """Write folder/checkpoint.json (atomically, last): the step and the sha256 of every other file."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SEAL_FILE)
    return atomic_write_json(folder / SEAL_FILE, {"step": step, "sha256": {
        str(p.relative_to(folder)): sha256_file(p) for p in files}})


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint folders whose files all match the sha256 recorded in their checkpoint.json, oldest first;
    the others are named as torn."""
    ok = []
    for d in _checkpoint_folders(ckpt_root):
        try:
            seal = json.loads((d / SEAL_FILE).read_text())["sha256"]
            bad = [f for f, h in sorted(seal.items()) if sha256_file(d / f) != h]
            if not bad and STATE_FILE in seal:
                ok.append(d)
                continue
            reason = f"{bad[0]} does not match its recorded sha256" if bad else f"no {STATE_FILE}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            reason = f"{type(e).__name__}: {e}"
        print(f"skipping torn checkpoint {d.name}: {reason}")
    return ok


def checkpoint_state(folder: Path) -> dict:
    """A complete checkpoint's train_state.json: key, step, skipped, log, processes."""
    return json.loads((Path(folder) / STATE_FILE).read_text())


def _portable_weights(acc: Accelerator) -> None:
    """Checkpoint weights as the unwrapped modules name them (no DDP 'module.' prefix), so a run resumes with
    another number of processes (the optimizer's state is indexed by parameter, the same either way)."""
    def save(models, weights, output_dir):
        if weights:  # empty under FSDP, which saves its own way
            weights[:] = [acc.unwrap_model(m).state_dict() for m in models]

    def load(models, input_dir):
        for i, m in enumerate(models):
            f = Path(input_dir) / (f"{SAFE_MODEL_NAME}_{i}.safetensors" if i else f"{SAFE_MODEL_NAME}.safetensors")
            acc.unwrap_model(m).load_state_dict(load_safetensors(f))  # copied onto the module's device
        models.clear()

    acc.register_save_state_pre_hook(save)
    acc.register_load_state_pre_hook(load)


# ----------------------------------------------------------------------------- the stage

def init_pipeline(init_from=None, vae=None, text_encoder=None, unet_config=None, image_size=64, unet_init=None):
    """Stage 2 continues a saved pipeline (init_from); otherwise a new one around a VAE and text encoder
    (objects or folders / open_clip specs) with a fresh UNet (stage 1, or one-stage training), or with
    `unet_init` = a (4-channel) UNet folder such as Stable Diffusion v1.5's unet/, widened to 8 input
    channels with zero weights on the prior's channels (paper scale)."""
    if init_from is not None:
        pipe = BiomedJourneyPipeline.from_pretrained(init_from)
        pipe.unet.requires_grad_(True)
        pipe.projection.requires_grad_(True)
        return pipe
    if vae is None or text_encoder is None:
        raise ValueError("a new model needs vae= and text_encoder= (or init_from= a saved model)")
    vae = load_vae(vae) if isinstance(vae, (str, os.PathLike)) else vae
    te = TextEncoder.load(str(text_encoder)) if isinstance(text_encoder, (str, os.PathLike)) else text_encoder
    unet = None
    if unet_init:
        unet = expand_unet_in_channels(UNet2DConditionModel.from_pretrained(unet_init), 8)
    return BiomedJourneyPipeline.build(vae.eval().requires_grad_(False), te, unet_config, image_size, unet=unet)


def _refresh_decoder(model_dir: Path, vae) -> None:
    """An up-to-date model whose saved VAE differs from the stage's (its decoder was fine-tuned again: the encoder
    is part of the key) gets the stage's VAE, so the model decodes as the run's VAE does. Every process checks
    before any writes; the main one writes."""
    if module_fingerprint(load_vae(model_dir / "vae")) == module_fingerprint(vae):
        return
    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        with atomic_dir(model_dir / "vae") as tmp:
            vae.save_pretrained(tmp)
        print(f"{model_dir}: the run's VAE has a new decoder (same encoder): vae/ replaced, the UNet kept")
    state.wait_for_everyone()


def train_stage(config: TrainConfig | dict, table: pd.DataFrame, out_dir: str | os.PathLike, init_from=None,
                text_column: str = "impression", prior: str = "dummy", vae=None, text_encoder=None,
                cache_dir: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                split: str | Sequence[str] | None = "train", progress: bool = True, unet_init=None,
                cache_only: bool = False) -> Path:
    """Train one stage and return the saved model folder (out_dir/model).

    `table`: stage1.csv rows (prior="dummy", image column `image_path`) or pair rows (prior_path +
    registered_path / followup_path). `text_column`: impression, description, instruction_impression...
    `split`: the table's split(s) trained on (stage 1: ("train", "val"), the paper's p10-p18 images).
    `unet_init`: a 4-channel UNet folder to start a new model from (SD v1.5's unet/ at paper scale).
    Writes out_dir/{model/, loss.csv, train.json, checkpoints/}. A rerun with the same inputs returns at
    once (a VAE whose decoder alone changed is the same input to the UNet: the model's vae/ is replaced, nothing
    is trained); an interrupted one resumes from its newest complete checkpoint. Under `accelerate launch` every
    process runs this: the main one writes the latent cache and the outputs, the others wait and read.
    `cache_only`: encode what the stage reads into the latent cache (nothing when the model is up to date: it
    reads nothing), train nothing, return the cache folder; stages trained side by side then only read it.
    """
    cfg = _checked(TrainConfig.from_dict(config))
    if prior == "dummy" and cfg.match_targets:  # no prior to match a target to: the same stage, the same key
        cfg = replace(cfg, match_targets=False)
    if prior == "dummy" and cfg.target != "image":  # no prior to add back: stage 1 diffuses the image
        cfg = replace(cfg, target="image")
    if not torch.cuda.is_available():
        use_run_threads()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = stage_rows(table, prior, text_column, split, root)
    if rows.empty:
        raise ValueError(f"no training rows (prior={prior!r}, text={text_column!r}, split={split!r})")
    torch.manual_seed(cfg.seed)  # the new UNet's and projection's initial weights
    pipe = init_pipeline(init_from, vae, text_encoder, cfg.unet_config, cfg.image_size, unet_init)
    pipe.image_size = cfg.image_size
    # the model predicts what this stage trains it to (a stage started from a model of the other kind learns anew)
    pipe.scheduler_config = dict(pipe.scheduler_config, prediction_type=cfg.prediction_type)
    init_fp = (sha256_file(Path(init_from) / "unet" / "diffusion_pytorch_model.safetensors") if init_from
               else module_fingerprint(pipe.unet) if unet_init else None)
    data_fp = fingerprint(rows.to_dict("list"), prior,
                          contents_fingerprint([p for p in (*rows["prior_path"], *rows["target_path"]) if p]))
    what = {k: v for k, v in asdict(cfg).items()
            if k not in EXECUTION_OPTIONS and KEY_OMITTED_AT_DEFAULT.get(k, object()) != v}
    # the UNet reads the encoder's latents only: a decoder fine-tuned alone leaves the key, and the model, as they are
    key = fingerprint(what, data_fp, init_fp, encoder_fingerprint(pipe.vae), module_fingerprint(pipe.text_encoder.model),
                      code_fingerprint_of(__name__))
    cache = Path(cache_dir or out / "latents")
    done_file = out / "train.json"
    if (out / "model" / "bmj_pipeline.json").is_file() and done_file.is_file():
        if json.loads(done_file.read_text()).get("key") == key:
            if not cache_only:
                _refresh_decoder(out / "model", pipe.vae)
                print(f"{out / 'model'} is up to date (same data, config, initialisation and code): nothing to do")
            return cache if cache_only else out / "model"
    if cache_only:
        build_cache(pipe, rows, cache, cfg.image_size, cfg.crop_margin, dummy_prior=(prior == "dummy"),
                    progress=progress, match_targets=cfg.match_targets)
        return cache

    acc = make_accelerator(cfg, project_dir=out)
    main = acc.is_main_process
    pipe.to(acc.device)
    with acc.main_process_first():  # the main process encodes; the others then open what it wrote
        data = build_cache(pipe, rows, cache, cfg.image_size, cfg.crop_margin,
                           dummy_prior=(prior == "dummy"), progress=progress and main, write=main,
                           match_targets=cfg.match_targets)
    pipe.max_strength = cfg.timestep_max
    residual = None
    if cfg.target == "residual":
        pipe.target, pipe.residual_scale = "residual", residual_scale(data, pipe.prior_factor, cfg.seed)
        residual = (pipe.prior_factor, pipe.residual_scale)
    n = len(data)
    total = int(cfg.max_steps) if cfg.max_steps else max(1, int(round(cfg.epochs * math.ceil(n / cfg.batch_size))))
    trainer = Trainer(cfg, pipe.unet, pipe.projection, train_scheduler(pipe.scheduler_config), data, acc,
                      debug_dir=os.environ.get(DEBUG_ENV) or None, residual=residual, total_steps=total,
                      prior_factor=pipe.prior_factor,
                      has_prior=prior != "dummy")
    _portable_weights(acc)

    ckpt_root = out / "checkpoints"
    step, bad_streak, skipped, log = 0, 0, 0, []
    found, next_index = None, 0
    if main:
        complete = complete_checkpoints(ckpt_root)
        for d in reversed(complete):
            if checkpoint_state(d).get("key") == key:
                found = str(d)
                break
            print(f"ignoring checkpoint {d.name}: made from other data, settings or initialisation")
        for d in _checkpoint_folders(ckpt_root):
            if d not in complete:  # torn: never resumed from, and not counted by accelerate's total_limit
                shutil.rmtree(d, ignore_errors=True)
        kept = _checkpoint_folders(ckpt_root)
        next_index = int(_CHECKPOINT.match(kept[-1].name).group(1)) + 1 if kept else 0
    if acc.num_processes > 1:
        found, next_index = broadcast_object_list([found, next_index])
    acc.project_configuration.iteration = next_index
    if found:
        acc.load_state(found)
        st = checkpoint_state(found)
        if trainer.ema is not None:
            trainer.ema.load_state_dict(torch.load(Path(found) / EMA_FILE, map_location="cpu", weights_only=True))
        step, skipped, log = st["step"], st["skipped"], [tuple(x) for x in st["log"]]
        acc.print(f"resumed from {Path(found).name} (step {step} of {total})")

    def checkpoint():
        if not _all_finite([acc.unwrap_model(trainer.unet), acc.unwrap_model(trainer.proj)]):
            raise TrainingDiverged(f"non-finite weights at step {step}: checkpoint not written")
        folder = Path(acc.save_state())
        if main:
            if trainer.ema is not None:
                atomic_torch_save(folder / EMA_FILE, trainer.ema.state_dict())
            atomic_write_json(folder / STATE_FILE, {"key": key, "step": step, "skipped": skipped, "log": log,
                                                    "processes": acc.num_processes})
        acc.wait_for_everyone()  # every process's RNG state is on disk before the seal
        if main:
            seal_checkpoint(folder, step)
        acc.wait_for_everyone()

    bar = tqdm(total=total, initial=step, desc=f"train {prior}", unit="step", disable=not (progress and main))
    t0, start_step = time.time(), step
    while step < total:
        ok, loss_val = trainer.step(step)
        step += 1
        if ok:
            bad_streak = 0
            log.append((step, loss_val))
        else:
            skipped += 1
            bad_streak += 1
            acc.print(f"step {step}: non-finite loss/gradient ({loss_val}); step skipped")
            if bad_streak >= cfg.max_bad_steps:
                raise TrainingDiverged(f"{bad_streak} consecutive non-finite steps (last at step {step}); "
                                       "aborted without saving")
        bar.update(1)
        if ok and step % max(1, cfg.log_every) == 0:
            bar.set_postfix(loss=f"{loss_val:.4f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            checkpoint()
    bar.close()
    seconds = time.time() - t0

    if trainer.ema is not None:
        trainer.ema.copy_to(trainer.params)
    unet, proj = acc.unwrap_model(trainer.unet), acc.unwrap_model(trainer.proj)
    if not _all_finite([unet, proj]):
        raise TrainingDiverged("non-finite weights after training: model not saved")
    model_dir = out / "model"
    if main:
        pipe.unet, pipe.projection = unet.eval(), proj.eval()
        pipe.save_pretrained(model_dir)
        atomic_write_csv(out / "loss.csv", pd.DataFrame(log, columns=["step", "loss"]))
        trained = step - start_step
        atomic_write_json(done_file, {
            "key": key, "steps": step, "skipped_steps": skipped, "examples": n, "prior": prior,
            "text_column": text_column, "init_from": str(init_from) if init_from else None,
            # the UNet actually trained: with init_from, its saved config wins over cfg.unet_config
            "config": {**asdict(cfg), "unet_config": dict(pipe.unet.config)},
            "model_sha256": sha256_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")})
        rate = round(trained * cfg.batch_size / seconds, 1) if trained and seconds > 0 else None
        record_timing(f"train {out.name}", seconds, steps=trained, samples_per_s=rate)
        print(f"{out.name}: {trained} steps this run in {seconds:.1f} s ({rate} samples/s, "
              f"{acc.num_processes} process(es) x {trainer.accum} micro-batch(es))")
        shutil.rmtree(ckpt_root, ignore_errors=True)
    acc.wait_for_everyone()
    return model_dir


def residual_scale(data, prior_factor: float, seed: int = 0, n: int = 4096) -> float:
    """1 / the standard deviation of (target - prior_factor x prior) latents over up to `n` training examples
    (unflipped), so the residual target has unit variance as the VAE's scaling_factor gives an image latent."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:n]
    parts = []
    for i in range(0, len(idx), 512):
        b = data.batch(idx[i:i + 512], g, hflip=False, device="cpu")
        parts.append((b["target"] - prior_factor * b["prior"]).flatten())
    std = float(torch.cat(parts).float().std())
    if not math.isfinite(std) or std <= 0:
        raise ValueError("residual target: every training follow-up equals its prior, nothing to learn")
    return 1.0 / std


def read_loss(out_dir: str | os.PathLike) -> pd.DataFrame:
    """The loss curve of a finished stage (step, loss) plus a smoothed column."""
    df = pd.read_csv(Path(out_dir) / "loss.csv")
    df["smoothed"] = df["loss"].ewm(alpha=0.05).mean()
    return df


PAPER_TEXT_TOKENS, PAPER_TEXT_WIDTH = 256, 768  # BiomedCLIP's context and token-state width


def paper_dry_run(batch_size: int = 1, steps: int = 2, device: str | None = None, bf16: bool | None = None) -> dict:
    """Build the paper-scale model (SD v1.5 UNet with 8 input channels, SD v1.5 VAE, a 768-wide projection of
    256 BiomedCLIP-sized token states) from the config literals with random weights, and run `steps` of the
    trainer's steps (`Trainer.step`: dropout, projection, clipping, AdamW) on latents of random 256 px images.
    No weights are needed; this exercises the paper-scale code path of the real trainer.
    Returns parameter count, per-step seconds, losses and (on CUDA) peak GPU memory."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = (device == "cuda") if bf16 is None else bf16
    torch.manual_seed(0)
    vae = build_vae(SD15_VAE_CONFIG).to(device).eval().requires_grad_(False)
    unet = build_unet(SD15_UNET_CONFIG).to(device)
    proj = nn.Linear(PAPER_TEXT_WIDTH, SD15_UNET_CONFIG["cross_attention_dim"]).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        imgs = torch.rand(2 * batch_size, 3, 256, 256, generator=g).to(device) * 2 - 1
        mode = vae.encode(imgs).latent_dist.mode()
    # InstructPix2Pix's latents: the target scaled by the VAE's factor, the prior as the posterior mode
    data = TensorData(mode[:batch_size] * SD15_VAE_CONFIG["scaling_factor"], mode[batch_size:],
                      torch.randn(batch_size, PAPER_TEXT_TOKENS, PAPER_TEXT_WIDTH, generator=g).to(device),
                      torch.zeros(1, PAPER_TEXT_TOKENS, PAPER_TEXT_WIDTH, device=device))
    cfg = TrainConfig(batch_size=batch_size, hflip=False, crop_margin=0, mixed_precision="bf16" if bf16 else "no")
    trainer = Trainer(cfg, unet, proj, train_scheduler(), data, make_accelerator(cfg, cpu=device == "cpu"))
    times, losses = [], []
    for k in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        _, loss = trainer.step(k)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
        losses.append(loss)
    return {"unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
            "vae_params_M": round(sum(p.numel() for p in vae.parameters()) / 1e6, 1),
            "latent_shape": list(mode.shape[1:]), "batch_size": batch_size, "device": device, "bf16": bf16,
            "step_seconds": [round(t, 3) for t in times], "losses": losses,
            "peak_gpu_mem_GB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None}


def paper_dry_run_memory_gb(batch_size: int = 1, runtime_gb: float = 1.0) -> dict:
    """What `paper_dry_run` holds at its peak on a CPU (fp32, GiB), counted without running it: during the second
    backward pass, the UNet's and projection's weights, gradients and AdamW's two moments (16 bytes per
    trainable parameter; on a CPU AdamW updates one tensor at a time, so its temporaries are one tensor's
    size), the activations autograd keeps for the backward pass (counted on the meta device through
    saved-tensor hooks, parameters excluded), the frozen VAE's weights (4 bytes per parameter), and
    `runtime_gb` for the Python process itself (torch, diffusers, accelerate)."""
    with torch.device("meta"):
        unet, vae = build_unet(SD15_UNET_CONFIG), build_vae(SD15_VAE_CONFIG)
        proj = nn.Linear(PAPER_TEXT_WIDTH, SD15_UNET_CONFIG["cross_attention_dim"])
        x = torch.zeros(batch_size, SD15_UNET_CONFIG["in_channels"], 32, 32)
        t = torch.zeros(batch_size, dtype=torch.long)
        ctx = torch.zeros(batch_size, PAPER_TEXT_TOKENS, PAPER_TEXT_WIDTH)
    params = {id(q) for m in (unet, proj) for q in m.parameters()}
    saved = {}

    def pack(a):
        base = a if a._base is None else a._base
        if id(base) not in params:
            saved[id(a)] = a.numel() * a.element_size()
        return a
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda a: a):
        unet(torch.zeros_like(x), t, encoder_hidden_states=proj(ctx)).sample
    trainable = sum(q.numel() for m in (unet, proj) for q in m.parameters())
    frozen = sum(q.numel() for q in vae.parameters())
    gb = {"weights_grads_adamw_gb": 16 * trainable / 2**30, "vae_gb": 4 * frozen / 2**30,
          "activations_gb": sum(saved.values()) / 2**30, "runtime_gb": runtime_gb}
    gb["total_gb"] = sum(gb.values())
    return {k: round(v, 2) for k, v in gb.items()}
