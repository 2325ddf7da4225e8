"""The GPU path of `bmj bench --gpu`: the paper-scale model's training and sampling speed.

The paper-scale UNet is Stable Diffusion v1.5's with 8 input channels (noisy latent || prior latent,
InstructPix2Pix, paper §4.2), built here from its config literals with random weights, so nothing is
downloaded; speed does not depend on the weights. A training step is the trainer's own step
(`bmjlib.model.train.Trainer.step`, what `train_stage` runs): conditioning dropout, the learnable text
projection, noise and timestep, the UNet on (noisy latent || prior latent), MSE, gradient clipping, AdamW,
on latents and text states computed once by the frozen VAE and text tower (as the trainer reads its cache).
The reference estimate of its cost is 537 GFLOP per image per training step at 256 px; against an H100's
~800 TFLOP/s of dense bf16 matrix work that bounds training near 1,500 images/s. The same step is also
counted with torch's FlopCounterMode on the meta device (no GPU needed), so the table shows the counted
figure beside the estimate.

Arms, measured in one run on the same model, each a set of the trainer's speed options (`TrainConfig`:
mixed_precision, attention, channels_last, fused_adamw, compile; tests/test_distributed.py checks on the
CPU that each computes the default path's loss): the baseline (fp32, the classic attention) and the
optimised path (SDPA attention, bf16 autocast, channels_last, fused AdamW, then torch.compile). What the
cache saves over running the frozen encoders on every batch is measured by the CPU section (`bmj bench`).
Sampling: 20-step DPM-Solver++ with dual classifier-free guidance (three UNet evaluations per step,
batched), VAE encode of the prior and decode of the result, at 256 px.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from open_clip.transformer import TextTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bmjlib.bench.core import BenchConfig, NotAvailable, PeakMemory, Result
from bmjlib.model.configs import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG, vae_downsampling
from bmjlib.model.train import TensorData, Trainer, TrainConfig, make_accelerator

GFLOP_PER_IMAGE = 537.0        # reference estimate for one SD v1.5 UNet training step at 256 px (flops_row counts it)
PEAK_BF16_TFLOPS = 800.0       # H100 dense bf16, a round figure
PAPER_RATE = 13.5              # paper's stage 1: 69,846 images x 200 epochs / 288 A100-hours


def tiny_configs() -> tuple[dict, dict, dict]:
    """A miniature of the same three parts, for testing this code path on a CPU."""
    unet = dict(sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=8, norm_num_groups=8)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 32),
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
               norm_num_groups=8)
    text = dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=2, output_dim=32)
    return unet, vae, text


@dataclass
class Arm:
    """One arm: a name and the trainer's speed options (`TrainConfig` fields) it sets."""
    name: str
    options: dict = field(default_factory=dict)


# the trainer fuses AdamW by default: the arms before the fused one set the per-tensor loop
BASELINE = Arm("fp32, classic attention", dict(mixed_precision="no", attention="classic", fused_adamw=False))
ARMS = [BASELINE,
        Arm("fp32, SDPA", dict(mixed_precision="no", attention="sdpa", fused_adamw=False)),
        Arm("bf16 + SDPA", dict(mixed_precision="bf16", fused_adamw=False)),
        Arm("bf16 + SDPA + channels_last", dict(mixed_precision="bf16", channels_last=True, fused_adamw=False)),
        Arm("bf16 + SDPA + channels_last + fused AdamW", dict(mixed_precision="bf16", channels_last=True,
                                                              fused_adamw=True)),
        Arm("bf16 + SDPA + channels_last + fused AdamW + torch.compile",
            dict(mixed_precision="bf16", channels_last=True, fused_adamw=True, compile="inductor"))]


class Parts:
    """The paper-scale model's parts on one device (random weights)."""

    def __init__(self, device, unet_cfg: dict, vae_cfg: dict, text_cfg: dict, size: int, seed: int = 0):
        torch.manual_seed(seed)
        self.device, self.size, self.text_cfg = device, size, text_cfg
        self.unet = UNet2DConditionModel(**unet_cfg).to(device)
        self.projection = nn.Linear(text_cfg["width"], unet_cfg["cross_attention_dim"]).to(device)
        self.vae = AutoencoderKL(**vae_cfg).to(device).requires_grad_(False).eval()
        self.text = TextTransformer(**text_cfg, output_tokens=True).to(device).requires_grad_(False).eval()
        self.noise = DDPMScheduler(num_train_timesteps=1000)
        self.vae_factor = vae_downsampling(vae_cfg)

    def batch(self, n: int, seed: int):
        """Images (follow-up, prior) in [-1, 1] and token ids, as a data loader would yield them."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        img = torch.rand(n, 3, self.size, self.size, generator=g) * 2 - 1
        prior = torch.rand(n, 3, self.size, self.size, generator=g) * 2 - 1
        tok = torch.randint(1, self.text_cfg["vocab_size"], (n, self.text_cfg["context_length"]), generator=g)
        return img.to(self.device), prior.to(self.device), tok.to(self.device)

    def encode(self, img, prior, tok):
        """The frozen encoders: latents of both images (scaled as SD does) and text token states."""
        with torch.no_grad():
            lat = self.vae.encode(img).latent_dist.sample() * 0.18215
            prior_lat = self.vae.encode(prior).latent_dist.mode()
            states = self.text(tok)[1]
        return lat, prior_lat, states


def train_rate(parts: Parts, arm: Arm, batch: int, steps: int, warmup: int = 2, seed: int = 0) -> tuple[float, float]:
    """Training samples/s of one arm and the loss of its last step (finite, or the arm is broken): the
    trainer's step (`Trainer.step`, as `train_stage` runs it) with the arm's options, on one batch of
    latents and text states encoded once by the frozen parts."""
    cuda = torch.device(parts.device).type == "cuda"
    lat, prior_lat, states = parts.encode(*parts.batch(batch, 1))
    data = TensorData(lat, prior_lat, states, torch.zeros_like(states[:1]))
    cfg = TrainConfig(batch_size=batch, hflip=False, crop_margin=0, ema=False, seed=seed, **arm.options)
    trainer = Trainer(cfg, parts.unet, parts.projection, parts.noise, data,
                      make_accelerator(cfg, cpu=not cuda))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for k in range(warmup):
        trainer.step(k)
    sync()
    t0 = time.perf_counter()
    for k in range(warmup, warmup + steps):
        ok, loss = trainer.step(k)
        if not ok:
            raise RuntimeError(f"step {k}: non-finite loss or gradient ({loss})")
    sync()
    dt = time.perf_counter() - t0
    return batch * steps / dt, loss


def count_train_gflop(unet_cfg: dict, size: int, context: int = 77) -> tuple[float, float]:
    """FLOPs of one training step (UNet forward + backward) per image, counted by torch's FlopCounterMode
    on the meta device (shapes only: no memory, no arithmetic, no GPU). Returns (GFLOP, M parameters)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        x = torch.randn(1, unet_cfg["in_channels"], size // 8, size // 8)
        t = torch.tensor([500])
        ctx = torch.randn(1, context, unet_cfg["cross_attention_dim"])
    with FlopCounterMode(display=False) as fc:
        unet(x, t, encoder_hidden_states=ctx).sample.sum().backward()
    return fc.get_total_flops() / 1e9, sum(p.numel() for p in unet.parameters()) / 1e6


def flops_row(cfg: BenchConfig) -> Result:
    """The paper-scale UNet's training cost, counted (needs no GPU)."""
    size = cfg.gpu_size
    gflop, mparams = count_train_gflop(dict(SD15_UNET_CONFIG, sample_size=size // 8), size)
    return Result("GPU", "SD v1.5-size 8-channel UNet: training FLOPs per image", gflop, "GFLOP",
                  compare=f"reference estimate {GFLOP_PER_IMAGE:.0f} GFLOP",
                  note=f"{mparams:.0f} M parameters, {size} px, 77 text tokens, forward + backward, counted by "
                       f"FlopCounterMode on the meta device; at {PEAK_BF16_TFLOPS:.0f} TFLOP/s bf16 that bounds "
                       f"training at {PEAK_BF16_TFLOPS * 1e3 / gflop:,.0f} images/s",
                  extra={"gflop": gflop, "mparams": mparams})


def sample_rate(parts: Parts, n: int, steps: int, bf16: bool = True, text_scale: float = 7.5,
                image_scale: float = 1.5) -> float:
    """Counterfactuals/s: VAE-encode the prior, `steps` DPM-Solver++ steps with dual guidance, decode."""
    dev = parts.device
    cuda = torch.device(dev).type == "cuda"
    unet = parts.unet.eval()
    unet.set_attn_processor(AttnProcessor2_0())
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++")
    _, prior, tok = parts.batch(n, 3)

    @torch.no_grad()
    def run():
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=bf16):
            prior_lat = parts.vae.encode(prior).latent_dist.mode()
            cond = parts.text(tok)[1]
            uncond = torch.zeros_like(cond)
            sched.set_timesteps(steps, device=dev)
            lat = torch.randn(n, 4, *prior_lat.shape[2:], device=dev)
            # InstructPix2Pix's three branches: (text, image), (none, image), (none, none)
            img_in = torch.cat([prior_lat, prior_lat, torch.zeros_like(prior_lat)])
            txt_in = torch.cat([cond, uncond, uncond])
            for t in sched.timesteps:
                x = torch.cat([torch.cat([lat] * 3), img_in], 1)
                e_full, e_img, e_none = unet(x, t, encoder_hidden_states=txt_in).sample.chunk(3)
                eps = e_none + image_scale * (e_img - e_none) + text_scale * (e_full - e_img)
                lat = sched.step(eps.float(), t, lat).prev_sample
            return parts.vae.decode(lat / 0.18215).sample

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run()  # warm-up
    sync()
    t0 = time.perf_counter()
    out = run()
    sync()
    if not torch.isfinite(out.float()).all():
        raise RuntimeError("sampling produced non-finite pixels")
    return n / (time.perf_counter() - t0)


def gpu_rows(cfg: BenchConfig, requested: bool, device: str | None = None,
             configs: tuple[dict, dict, dict] | None = None, arms: list[Arm] | None = None) -> list[Result]:
    """The GPU section. `device`/`configs`/`arms` let a test run the same code on a CPU with a tiny model."""
    if device is None:
        if not torch.cuda.is_available():
            raise NotAvailable("no GPU was available on this machine (torch.cuda.is_available() is False); "
                               "the section is ready: run `bmj bench --gpu` on a CUDA machine")
        if not requested:
            raise NotAvailable("a GPU is present but the section was not requested: run `bmj bench --gpu`")
        device = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 baseline means fp32 (PyTorch's default)
    size, batch = cfg.gpu_size, cfg.gpu_batch
    unet_cfg, vae_cfg, text_cfg = configs or (dict(SD15_UNET_CONFIG, sample_size=size // 8), SD15_VAE_CONFIG,
                                              SD15_TEXT_CONFIG)
    parts = Parts(device, unet_cfg, vae_cfg, text_cfg, size, seed=cfg.seed)
    name = torch.cuda.get_device_name() if device == "cuda" else device
    rows: list[Result] = []
    counted, _ = count_train_gflop(unet_cfg, size)
    base = None
    for arm in arms or ARMS:
        with PeakMemory() as mem:
            try:
                rate, loss = train_rate(parts, arm, batch, cfg.gpu_steps, seed=cfg.seed)
            except Exception as e:
                rows.append(Result("GPU", f"training samples/s: {arm.name}",
                                   note=f"failed: {type(e).__name__}: {str(e)[:200]}", failed=True))
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
        base = base if base is not None else (rate if arm is (arms or ARMS)[0] else None)
        frac = rate * GFLOP_PER_IMAGE * 1e9 / (PEAK_BF16_TFLOPS * 1e12)
        frac_counted = rate * counted * 1e9 / (PEAK_BF16_TFLOPS * 1e12)
        rows.append(Result(
            "GPU", f"training samples/s: {arm.name}", rate, "samples/s",
            compare=(f"{rate / base:.1f}x baseline; " if base else "") + f"{rate / PAPER_RATE:.1f}x paper's 13.5/s",
            peak_mb=mem.cuda_mb if mem.cuda_mb is not None else mem.rss_mb,
            note=f"{name}, batch {batch}, {size} px, {cfg.gpu_steps} steps; {100 * frac:.1f}% of "
                 f"{PEAK_BF16_TFLOPS:.0f} TFLOP/s bf16 peak at {GFLOP_PER_IMAGE:.0f} GFLOP/image"
                 + f" ({100 * frac_counted:.1f}% at the counted {counted:.3g})"
                 + f"; last loss {loss:.3f}",
            extra={"fraction_of_peak": frac, "fraction_of_peak_counted": frac_counted, "loss": loss}))
    with PeakMemory() as mem:
        n = max(1, batch // 4)
        rate = sample_rate(parts, n, cfg.gpu_sample_steps, bf16=True)
    rows.append(Result("GPU", f"counterfactuals/s ({cfg.gpu_sample_steps}-step DPM-Solver++, dual guidance)", rate, "images/s",
                       peak_mb=mem.cuda_mb if mem.cuda_mb is not None else mem.rss_mb,
                       note=f"{name}, batch {n}, {size} px, bf16, 3 UNet evaluations per step + VAE"))
    return rows
