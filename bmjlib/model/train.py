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
  finite before every save. Checkpoints every N steps are written atomically (the last K kept) and a
  killed run resumes from the newest complete one; per-step randomness is seeded by (seed, step), so
  a resumed run takes exactly the steps an uninterrupted one would.

API (used by notebooks 04, 05, 08):
    model_dir = train_stage(config, table, out_dir, init_from=None, text_column="impression",
                            prior="dummy", vae=..., text_encoder=...)
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from bmjlib.io import atomic_dir, atomic_write_csv, atomic_write_json, fingerprint, sha256_file
from bmjlib.model.configs import SD15_UNET_CONFIG, SD15_VAE_CONFIG
from bmjlib.model.encoders import TextEncoder, load_vae
from bmjlib.model.latents import CachedData, build_cache, module_fingerprint
from bmjlib.model.pipeline import BiomedJourneyPipeline, build_unet, build_vae, expand_unet_in_channels, train_scheduler
from bmjlib.runtime import record_timing, use_run_threads

PRIOR_MODES = ("dummy", "registered", "unregistered")
TARGET_COLUMN = {"dummy": "image_path", "registered": "registered_path", "unregistered": "followup_path"}


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


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

    @classmethod
    def from_dict(cls, d: dict | "TrainConfig" | None) -> "TrainConfig":
        if isinstance(d, cls):
            return d
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


# ----------------------------------------------------------------------------- data

def stage_rows(table: pd.DataFrame, prior: str, text_column: str, split: str | None = "train",
               root: str | os.PathLike | None = None) -> pd.DataFrame:
    """The rows a stage trains on: (prior_path or "", target_path, text), absolute paths, empty texts dropped."""
    if prior not in PRIOR_MODES:
        raise ValueError(f"prior must be one of {PRIOR_MODES}, got {prior!r}")
    tab = table
    if split and "split" in tab.columns:
        tab = tab[tab["split"] == split]
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
                   cond_dropout: float) -> torch.Tensor:
    """Epsilon-prediction MSE with InstructPix2Pix conditioning dropout (one training step's loss)."""
    target, prior, text, null = batch["target"], batch["prior"], batch["text"], batch["null"]
    n, dev = len(target), target.device
    noise = torch.randn(target.shape, generator=generator).to(dev)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator).to(dev)
    noisy = noise_scheduler.add_noise(target, noise, t)
    p = torch.rand(n, generator=generator).to(dev)
    drop_text = (p < 2 * cond_dropout)[:, None, None]
    drop_image = ((p >= cond_dropout) & (p < 3 * cond_dropout))[:, None, None, None]
    text = torch.where(drop_text, null.expand_as(text), text)
    prior = torch.where(drop_image, torch.zeros_like(prior), prior)
    ctx = projection(text.to(projection.weight.dtype))
    pred = unet(torch.cat([noisy, prior], 1), t, encoder_hidden_states=ctx).sample
    return F.mse_loss(pred.float(), noise.float())


# ----------------------------------------------------------------------------- checkpoints

def _all_finite(modules) -> bool:
    return all(torch.isfinite(p).all() for m in modules for p in m.state_dict().values()
               if torch.is_tensor(p) and p.is_floating_point())


def save_checkpoint(ckpt_root: Path, step: int, state: dict, keep: int) -> Path:
    """Write checkpoints/step-XXXXXXXX/{state.pt, checkpoint.json (sha256 of state.pt)} atomically and
    delete all but the newest `keep` complete ones."""
    final = ckpt_root / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        torch.save(state, tmp / "state.pt")
        atomic_write_json(tmp / "checkpoint.json", {"step": step, "sha256": sha256_file(tmp / "state.pt")})
    for old in complete_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint folders whose state.pt matches the sha256 recorded beside it, oldest first."""
    if not ckpt_root.is_dir():
        return []
    ok = []
    for d in sorted(ckpt_root.glob("step-*")):
        try:
            meta = json.loads((d / "checkpoint.json").read_text())
            if sha256_file(d / "state.pt") == meta["sha256"]:
                ok.append(d)
                continue
            reason = "state.pt does not match its recorded sha256"
        except (OSError, ValueError, KeyError) as e:
            reason = f"{type(e).__name__}: {e}"
        print(f"skipping torn checkpoint {d.name}: {reason}")
    return ok


# ----------------------------------------------------------------------------- the stage

def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() else "no"


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


def train_stage(config: TrainConfig | dict, table: pd.DataFrame, out_dir: str | os.PathLike, init_from=None,
                text_column: str = "impression", prior: str = "dummy", vae=None, text_encoder=None,
                cache_dir: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                split: str | None = "train", progress: bool = True, unet_init=None) -> Path:
    """Train one stage and return the saved model folder (out_dir/model).

    `table`: stage1.csv rows (prior="dummy", image column `image_path`) or pair rows (prior_path +
    registered_path / followup_path). `text_column`: impression, description, instruction_impression...
    `unet_init`: a 4-channel UNet folder to start a new model from (SD v1.5's unet/ at paper scale).
    Writes out_dir/{model/, loss.csv, train.json, checkpoints/}. A rerun with the same inputs returns at
    once; an interrupted one resumes from its newest complete checkpoint.
    """
    cfg = TrainConfig.from_dict(config)
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
    init_fp = (sha256_file(Path(init_from) / "unet" / "diffusion_pytorch_model.safetensors") if init_from
               else module_fingerprint(pipe.unet) if unet_init else None)
    data_fp = fingerprint(rows.to_dict("list"), prior)
    key = fingerprint(asdict(cfg), data_fp, init_fp, module_fingerprint(pipe.vae),
                      module_fingerprint(pipe.text_encoder.model))
    done_file = out / "train.json"
    if (out / "model" / "bmj_pipeline.json").is_file() and done_file.is_file():
        if json.loads(done_file.read_text()).get("key") == key:
            print(f"{out / 'model'} is up to date (same data, config and initialisation): nothing to do")
            return out / "model"

    data: CachedData = build_cache(pipe, rows, Path(cache_dir or out / "latents"), cfg.image_size,
                                   cfg.crop_margin, dummy_prior=(prior == "dummy"), progress=progress)

    acc = Accelerator(mixed_precision=_mixed_precision(cfg), cpu=not torch.cuda.is_available())
    unet, proj = pipe.unet.train(), pipe.projection.train()
    params = list(unet.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = None
    if cfg.ema:
        ema = EMAModel(params, decay=cfg.ema_decay)
    unet, proj, opt = acc.prepare(unet, proj, opt)
    pipe.vae.to(acc.device)
    noise_sched = train_scheduler(pipe.scheduler_config)

    n, world, rank = len(data), acc.num_processes, acc.process_index
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = int(cfg.max_steps) if cfg.max_steps else max(1, int(round(cfg.epochs * steps_per_epoch)))

    ckpt_root = out / "checkpoints"
    step, bad_streak, skipped, log = 0, 0, 0, []
    for d in reversed(complete_checkpoints(ckpt_root)):
        try:
            st = torch.load(d / "state.pt", map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, never trusted
            print(f"skipping unreadable checkpoint {d.name}: {e}")
            continue
        if st.get("key") != key:
            print(f"ignoring checkpoint {d.name}: made from other data, settings or initialisation")
            continue
        acc.unwrap_model(unet).load_state_dict(st["unet"])
        acc.unwrap_model(proj).load_state_dict(st["projection"])
        opt.load_state_dict(st["optimizer"])
        if ema is not None and st.get("ema") is not None:
            ema.load_state_dict(st["ema"])
        step, skipped, log = st["step"], st["skipped"], st["log"]
        print(f"resumed from {d.name} (step {step} of {total})")
        break

    def state():
        return {"key": key, "step": step, "skipped": skipped, "log": log,
                "unet": acc.unwrap_model(unet).state_dict(), "projection": acc.unwrap_model(proj).state_dict(),
                "optimizer": opt.state_dict(), "ema": ema.state_dict() if ema is not None else None}

    def checkpoint():
        if not _all_finite([acc.unwrap_model(unet), acc.unwrap_model(proj)]):
            raise TrainingDiverged(f"non-finite weights at step {step}: checkpoint not written")
        if acc.is_main_process:
            save_checkpoint(ckpt_root, step, state(), cfg.keep_checkpoints)

    bar = tqdm(total=total, initial=step, desc=f"train {prior}", unit="step", disable=not progress)
    t0, start_step = time.time(), step
    null = data.null_states.to(acc.device)
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        g = torch.Generator().manual_seed(cfg.seed * 1000003 + step)  # (seed, step) -> same step after resume
        idx = perm[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
        idx = idx[rank::world] if world > 1 else idx
        batch = data.batch(idx, g, hflip=cfg.hflip, device=acc.device)
        batch["null"] = null
        with acc.autocast():
            loss = diffusion_loss(unet, proj, noise_sched, batch, g, cfg.cond_dropout)
        loss_val = float(acc.gather(loss.detach()[None]).mean())
        ok = math.isfinite(loss_val)
        if ok:
            acc.backward(loss)
            gnorm = acc.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else None
            ok = gnorm is None or bool(torch.isfinite(torch.as_tensor(gnorm)))
            if ok:
                opt.step()
                if ema is not None:
                    ema.step(params)
        opt.zero_grad(set_to_none=True)
        step += 1
        if ok:
            bad_streak = 0
            log.append((step, loss_val))
        else:
            skipped += 1
            bad_streak += 1
            print(f"step {step}: non-finite loss/gradient ({loss_val}); step skipped")
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

    if ema is not None:
        ema.copy_to(params)
    if not _all_finite([acc.unwrap_model(unet), acc.unwrap_model(proj)]):
        raise TrainingDiverged("non-finite weights after training: model not saved")
    model_dir = out / "model"
    if acc.is_main_process:
        pipe.unet, pipe.projection = acc.unwrap_model(unet).eval(), acc.unwrap_model(proj).eval()
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
        print(f"{out.name}: {trained} steps this run in {seconds:.1f} s ({rate} samples/s)")
        shutil.rmtree(ckpt_root, ignore_errors=True)
    acc.wait_for_everyone()
    return model_dir


def read_loss(out_dir: str | os.PathLike) -> pd.DataFrame:
    """The loss curve of a finished stage (step, loss) plus a smoothed column."""
    df = pd.read_csv(Path(out_dir) / "loss.csv")
    df["smoothed"] = df["loss"].ewm(alpha=0.05).mean()
    return df


def paper_dry_run(batch_size: int = 1, steps: int = 2, device: str | None = None, bf16: bool | None = None) -> dict:
    """Build the paper-scale model (SD v1.5 UNet with 8 input channels, SD v1.5 VAE, a 768-wide projection of
    256 BiomedCLIP-sized token states) from the config literals with random weights, and run `steps` training
    steps on random 256 px tensors. No weights are needed; this exercises the paper-scale code path.
    Returns parameter count, per-step seconds, losses and (on CUDA) peak GPU memory."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = (device == "cuda") if bf16 is None else bf16
    torch.manual_seed(0)
    vae = build_vae(SD15_VAE_CONFIG).to(device).eval().requires_grad_(False)
    unet = build_unet(SD15_UNET_CONFIG).to(device).train()
    proj = nn.Linear(768, SD15_UNET_CONFIG["cross_attention_dim"]).to(device)
    params = list(unet.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    sched = train_scheduler()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        imgs = torch.rand(2 * batch_size, 3, 256, 256, generator=g).to(device) * 2 - 1
        lat = vae.encode(imgs).latent_dist.mode() * SD15_VAE_CONFIG["scaling_factor"]
    batch = {"target": lat[:batch_size], "prior": lat[batch_size:],
             "text": torch.randn(batch_size, 256, 768, generator=g).to(device),
             "null": torch.zeros(1, 256, 768, device=device)}
    times, losses = [], []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(unet, proj, sched, batch, g, 0.05)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
        losses.append(float(loss))
    return {"unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
            "vae_params_M": round(sum(p.numel() for p in vae.parameters()) / 1e6, 1),
            "latent_shape": list(lat.shape[1:]), "batch_size": batch_size, "device": device, "bf16": bf16,
            "step_seconds": [round(t, 3) for t in times], "losses": losses,
            "peak_gpu_mem_GB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None}
