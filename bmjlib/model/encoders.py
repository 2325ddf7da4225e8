"""The frozen encoders of BiomedJourney: the open_clip text tower and the autoencoder (paper §4.2, §5.1).

- `TextEncoder`: an open_clip model's text tower returning token states (the UNet's cross-attention
  context, through the pipeline's learnable projection). Paper scale: BiomedCLIP
  (`hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`, context 256); any open_clip model
  loads from `hf-hub:org/repo` or `local-dir:/folder` (open_clip_config.json + weights, the layout
  `TextEncoder.save` writes).
- Demo scale, the BiomedCLIP stand-in: `train_demo_clip` trains a small CLIP-style image-text model
  (open_clip's own `CustomTextCLIP`, `ClipLoss` and tokenizer) contrastively on the cohort's
  image-report pairs and reports held-out image->report retrieval top-1 / top-5.
- Demo scale autoencoder: `train_demo_vae` trains a small `AutoencoderKL` (4x downsampling, 4 latent
  channels) on the cohort and reports held-out reconstruction PSNR / SSIM. Departure: the demo profile adds
  an SSIM term to the reconstruction loss, which keeps the rib detail a pixel loss blurs away, and fine-tunes
  the decoder alone on whole images after training on crops (`finetune_vae_decoder`). At paper scale
  the Stable Diffusion v1.5 VAE is used as is.
"""
from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from open_clip.loss import ClipLoss
from safetensors.torch import save_file
from pytorch_msssim import ssim as torch_ssim
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn
from tqdm.auto import tqdm

from bmjlib.io import ImageError, atomic_write_json, read_image, resize_image
from bmjlib.model.configs import DEMO_CLIP_CONFIG, DEMO_VAE_CONFIG
from bmjlib.runtime import record_timing, use_run_threads


def load_images(paths: Sequence[str | os.PathLike], size: int, skip_bad: bool = False,
                progress: bool = False) -> tuple[np.ndarray, list[int]]:
    """Read images with io.read_image and resize to size x size. Returns (N,size,size float32, kept indices).

    A missing or corrupt file raises ImageError unless `skip_bad`, in which case it is left out and
    reported in the kept-index list (never replaced by zeros).
    """
    out, kept = [], []
    it = enumerate(paths)
    if progress:
        it = tqdm(it, total=len(paths), desc="read images", unit="img")
    for i, p in it:
        try:
            img = read_image(p)
        except ImageError:
            if skip_bad:
                continue
            raise
        out.append(np.clip(resize_image(img, size), 0, 1))
        kept.append(i)
    arr = np.stack(out).astype(np.float32) if out else np.zeros((0, size, size), np.float32)
    return arr, kept


# =========================================================================== text tower

class TextEncoder(nn.Module):
    """Frozen open_clip text tower -> token states N x L x width (L = the model's context length).

    `spec`: 'hf-hub:org/repo' or 'local-dir:/path' (or a plain folder path). The whole open_clip model
    is kept (so `save` writes a folder open_clip itself can load), but only the text tower runs.
    """

    def __init__(self, model: nn.Module, tokenizer, model_cfg: dict, spec: str = "", tokenizer_dir: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_cfg = copy.deepcopy(model_cfg)
        self.spec = spec
        self.tokenizer_dir = tokenizer_dir
        self.context_length = int(getattr(tokenizer, "context_length", 0) or self.model_cfg["text_cfg"].get(
            "context_length", 77))
        with torch.no_grad():
            self.width = int(self._tokens(self.tokenizer(["x"])).shape[-1])

    @classmethod
    def load(cls, spec: str, device: str = "cpu") -> "TextEncoder":
        """Load an open_clip model from 'hf-hub:...' or 'local-dir:...' and keep its text tower."""
        if not spec.startswith(("hf-hub:", "local-dir:")):
            spec = f"local-dir:{spec}"
        if spec.startswith("local-dir:"):
            folder = Path(spec[len("local-dir:"):])
            if not (folder / "open_clip_config.json").is_file():
                raise FileNotFoundError(f"text encoder folder {folder} has no open_clip_config.json "
                                        "(write one with TextEncoder.save or train_demo_clip)")
        try:
            model = open_clip.create_model(spec, device=device)
            tokenizer = open_clip.get_tokenizer(spec)
            cfg = open_clip.get_model_config(spec)
        except Exception as e:  # network or cache miss for hf-hub, bad weights for local-dir
            raise RuntimeError(f"could not load the text encoder {spec!r}: {e}. For hf-hub models the weights "
                               "must be in the Hugging Face cache (HF_HOME) or downloadable; or save the "
                               "model to a folder and use local-dir:/that/folder") from e
        tok_dir = spec[len("local-dir:"):] if spec.startswith("local-dir:") else ""
        return cls(model, tokenizer, cfg, spec, tok_dir)

    def _tokens(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        ids = ids.to(next(m.parameters()).device)
        if hasattr(m, "text"):  # CustomTextCLIP (TextTransformer or HFTextEncoder, e.g. BiomedCLIP's PubMedBERT)
            prev, m.text.output_tokens = m.text.output_tokens, True  # leave the wrapped model as it was
            try:
                return m.text(ids)[1]
            finally:
                m.text.output_tokens = prev
        cast = m.transformer.get_cast_dtype()  # plain CLIP: encode_text without the pooling
        x = m.token_embedding(ids).to(cast) + m.positional_embedding.to(cast)
        return m.ln_final(m.transformer(x, attn_mask=m.attn_mask))

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Token states (float32, on the model's device) for a list of prompts."""
        prompts = list(prompts)
        out = [self._tokens(self.tokenizer(prompts[i:i + batch_size])).float()
               for i in range(0, len(prompts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.context_length, self.width)

    def prompt_tokens(self, prompt: str) -> tuple[int, int]:
        """(tokens the tower reads, tokens the prompt has), start and end tokens included. The tokenizer
        keeps the first `context_length` tokens of a longer prompt and drops the rest."""
        tok = self.tokenizer
        hf = getattr(tok, "tokenizer", None)
        if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):  # open_clip's BPE tokenizer
            total = len(tok.encode(prompt)) + 2
        elif hf is not None and callable(hf):  # open_clip's wrapper of a Hugging Face tokenizer
            clean = getattr(tok, "clean_fn", None) or (lambda t: t)
            total = len(hf(clean(prompt), truncation=False, verbose=False)["input_ids"])
        else:
            total = int((tok([prompt])[0] != 0).sum())
        return min(total, self.context_length), total

    def truncation_notice(self, prompt: str) -> str | None:
        """One line saying that `prompt` is longer than the text encoder reads, or None when it fits."""
        kept, total = self.prompt_tokens(prompt)
        if kept >= total:
            return None
        return (f"the prompt is {total} tokens long but the text encoder reads only {self.context_length}: "
                f"{kept} of {total} tokens kept, the rest of the prompt is ignored")

    def save(self, folder: str | os.PathLike) -> Path:
        """Write open_clip's local-dir layout: open_clip_config.json + open_clip_model.safetensors
        (+ the HF tokenizer files for HF text towers such as BiomedCLIP's)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / "open_clip_model.safetensors"))
        hf_tok = getattr(self.tokenizer, "tokenizer", None)
        if hf_tok is not None and hasattr(hf_tok, "save_pretrained"):
            hf_tok.save_pretrained(str(folder))
        atomic_write_json(folder / "open_clip_config.json", {"model_cfg": self.model_cfg, "preprocess_cfg": {}})
        return folder


# =========================================================================== demo CLIP

def _warmup_cosine(opt, total: int, warm_frac: float):
    """Linear warm-up, then cosine decay to 10 % of the peak lr (any total >= 1)."""
    warm = max(1, int(total * warm_frac))

    def f(step):
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _clip_images(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Grey [0,1] N,H,W -> N,3,H,W normalised to [-1, 1] (the demo CLIP's own preprocessing)."""
    t = torch.as_tensor(np.asarray(x, np.float32))[:, None]
    return (t * 2 - 1).repeat(1, 3, 1, 1)


def retrieval_topk(image_features: torch.Tensor, texts: Sequence[str], text_features_by_text: dict,
                   ks=(1, 5)) -> dict:
    """Image -> report retrieval among the UNIQUE held-out report texts (phantom reports repeat, so a hit
    is the image's own report text ranked within the top k). Returns top-k accuracies and the chance level."""
    uniq = list(dict.fromkeys(texts))
    tf = torch.stack([text_features_by_text[t] for t in uniq])
    sim = F.normalize(image_features, dim=-1) @ F.normalize(tf, dim=-1).T
    target = torch.tensor([uniq.index(t) for t in texts])
    rank = (sim > sim.gather(1, target[:, None])).sum(1)  # 0 = best
    res = {f"top{k}": float((rank < k).float().mean()) for k in ks}
    res.update({f"chance_top{k}": min(1.0, k / len(uniq)) for k in ks})
    res.update(n_images=len(texts), n_reports=len(uniq))
    return res


def train_demo_clip(images: np.ndarray, texts: Sequence[str], val_images: np.ndarray, val_texts: Sequence[str],
                    out_dir: str | os.PathLike, epochs: int = 10, batch_size: int = 64, lr: float = 5e-4,
                    seed: int = 0, config: dict | None = None, max_seconds: float | None = None) -> dict:
    """Train the demo CLIP contrastively (open_clip's ClipLoss), save it (TextEncoder.load-able folder),
    and return held-out image->report retrieval metrics + timing."""
    use_run_threads()
    torch.manual_seed(seed)
    cfg = copy.deepcopy(config or DEMO_CLIP_CONFIG)
    cfg["vision_cfg"]["image_size"] = int(images.shape[-1])
    model = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    ids = tokenizer(list(texts))
    x_all = _clip_images(images)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    n = len(x_all)
    steps = epochs * max(1, n // batch_size)
    sched = _warmup_cosine(opt, steps, 0.1)
    g = torch.Generator().manual_seed(seed)
    t0, step, losses = time.time(), 0, []
    bar = tqdm(total=steps, desc="CLIP", unit="step")
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            b = perm[i:i + batch_size]
            xb = x_all[b]
            if torch.rand(1, generator=g).item() < 0.5:  # small shift augmentation (no flip: laterality)
                dx, dy = torch.randint(-3, 4, (2,), generator=g).tolist()
                xb = torch.roll(xb, (dy, dx), (2, 3))
            img_f, txt_f, scale = model(xb, ids[b])
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if max_seconds and time.time() - t0 > max_seconds:
                break
        if max_seconds and time.time() - t0 > max_seconds:
            break
    bar.close()
    model.eval()
    enc = TextEncoder(model, tokenizer, cfg, "demo-clip")
    enc.save(out_dir)
    with torch.no_grad():
        imf = torch.cat([model.encode_image(_clip_images(val_images[i:i + 256]))
                         for i in range(0, len(val_images), 256)])
        uniq = list(dict.fromkeys(val_texts))
        tf = model.encode_text(tokenizer(uniq))
    metrics = retrieval_topk(imf, list(val_texts), dict(zip(uniq, tf)))
    metrics.update(steps=step, final_loss=float(np.mean(losses[-10:])))
    atomic_write_json(Path(out_dir) / "metrics.json", metrics)
    record_timing("demo CLIP", time.time() - t0, steps=step)
    return metrics


# =========================================================================== demo VAE

def psnr_ssim(ref: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over a batch of [0,1] images N,H,W."""
    ps = [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(ref, test)]
    ss = [structural_similarity(a, b, data_range=1.0) for a, b in zip(ref, test)]
    return float(np.mean(ps)), float(np.mean(ss))


def train_demo_vae(images: np.ndarray, val_images: np.ndarray, out_dir: str | os.PathLike, steps: int = 600,
                   batch_size: int = 32, lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0,
                   config: dict | None = None, max_seconds: float | None = None, crop: int | None = None,
                   ssim_weight: float = 0.0, decoder_steps: int = 0, decoder_lr: float = 1e-4) -> dict:
    """Train a small AutoencoderKL (L1 + MSE reconstruction + a small KL term, plus `ssim_weight` x (1 - SSIM)
    (pytorch_msssim, 7 px window) when given; no GAN/LPIPS at this scale),
    set its `scaling_factor` to 1 / std of the training latents (as SD does), save it, and return held-out
    PSNR / SSIM on whole images. `crop`: train on random crop x crop patches (the VAE is convolutional, so
    half-size crops cost a quarter and still teach it whole images). `decoder_steps` > 0: then fine-tune the
    decoder alone on whole images (`finetune_vae_decoder`)."""
    use_run_threads()
    torch.manual_seed(seed)
    cfg = dict(copy.deepcopy(config or DEMO_VAE_CONFIG), sample_size=int(images.shape[-1]))
    vae = AutoencoderKL(**cfg)
    x_all = torch.as_tensor(images, dtype=torch.float32)[:, None] * 2 - 1
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = _warmup_cosine(opt, steps, 0.05)
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.time(), []
    vae.train()
    done = 0
    for step in tqdm(range(steps), desc="VAE", unit="step"):
        b = torch.randint(0, len(x_all), (batch_size,), generator=g)
        xb = x_all[b]
        if crop and crop < xb.shape[-1]:
            oy, ox = torch.randint(0, xb.shape[-1] - crop + 1, (2,), generator=g).tolist()
            xb = xb[..., oy:oy + crop, ox:ox + crop]
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        loss = _reconstruction_loss(rec, xb, ssim_weight) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        done = step + 1
        if max_seconds and time.time() - t0 > max_seconds:
            break
    vae.eval()
    with torch.no_grad():  # from the encoder alone: a decoder fine-tune leaves it as it is
        z = torch.cat([vae.encode(x_all[i:i + 64]).latent_dist.mode() for i in range(0, min(len(x_all), 512), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    if decoder_steps:
        finetune_vae_decoder(vae, x_all, decoder_steps, batch_size, decoder_lr, ssim_weight, seed)
    metrics = _save_vae(vae, val_images, out_dir, {"steps": done, "decoder_steps": decoder_steps,
                                                   "final_loss": float(np.mean(losses[-10:]))})
    record_timing("demo VAE", time.time() - t0, steps=done)
    return metrics


def finetune_demo_decoder(vae_dir: str | os.PathLike, images: np.ndarray, val_images: np.ndarray,
                          out_dir: str | os.PathLike, steps: int, batch_size: int = 32, lr: float = 1e-4,
                          ssim_weight: float = 0.0, seed: int = 0) -> dict:
    """The VAE saved in `vae_dir` (by `train_demo_vae`) with its decoder fine-tuned `steps` steps
    (`finetune_vae_decoder`), saved to `out_dir` with its held-out PSNR / SSIM. The same VAE as
    `train_demo_vae(..., decoder_steps=steps)` with the same seed, so a changed step count reruns this alone."""
    use_run_threads()
    t0 = time.time()
    vae = load_vae(vae_dir)
    if steps:
        x = torch.as_tensor(images, dtype=torch.float32)[:, None] * 2 - 1
        finetune_vae_decoder(vae, x, steps, batch_size, lr, ssim_weight, seed)
        record_timing("demo VAE decoder", time.time() - t0, steps=steps)
    return _save_vae(vae, val_images, out_dir, {"decoder_steps": steps, **({"decoder_lr": lr} if steps else {})})


def _save_vae(vae: AutoencoderKL, val_images: np.ndarray, out_dir: str | os.PathLike, extra: dict) -> dict:
    """Save the VAE with metrics.json: held-out whole-image PSNR / SSIM through it and its scaling factor."""
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        xv = torch.as_tensor(val_images, dtype=torch.float32)[:, None] * 2 - 1
        rec = torch.cat([vae.decode(vae.encode(xv[i:i + 64]).latent_dist.mode()).sample
                         for i in range(0, len(xv), 64)])
    rec01 = ((rec[:, 0].numpy() + 1) / 2).clip(0, 1)
    psnr, ssim = psnr_ssim(val_images, rec01)
    vae.save_pretrained(out_dir)
    metrics = {"psnr": psnr, "ssim": ssim, "n_val": len(val_images), **extra,
               "scaling_factor": vae.config.scaling_factor}
    atomic_write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics


def _reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    """L1 + MSE (+ `ssim_weight` x (1 - SSIM), 7 px window) between images in [-1, 1]."""
    loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
    if ssim_weight:
        loss = loss + ssim_weight * (1 - torch_ssim((rec + 1) / 2, (x + 1) / 2, data_range=1.0, win_size=7))
    return loss


def finetune_vae_decoder(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch_size: int = 32,
                         lr: float = 1e-4, ssim_weight: float = 0.0, seed: int = 0) -> list[float]:
    """Fine-tune the decoder alone (and its post-quant conv) on whole images N,1,H,W in [-1, 1], decoding
    latents the frozen encoder samples, as Stable Diffusion's ft-MSE VAE did. The encoder, hence the latent
    space and its scaling factor, is unchanged. The demo VAE trains on half-size crops; its decoder then sees
    whole images (mid-block attention over the whole latent) only here. Returns the losses."""
    vae.requires_grad_(False)
    parts = [vae.decoder, vae.post_quant_conv] if vae.post_quant_conv is not None else [vae.decoder]
    params = [p for m in parts for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    vae.train()
    for _ in tqdm(range(steps), desc="VAE decoder", unit="step"):
        xb = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        with torch.no_grad():
            z = vae.encode(xb).latent_dist.sample(generator=g)
        loss = _reconstruction_loss(vae.decode(z).sample, xb, ssim_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def load_vae(folder: str | os.PathLike):
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"VAE folder {folder} has no config.json (train one with train_demo_vae, or "
                                "point to Stable Diffusion v1.5's vae/ folder)")
    return AutoencoderKL.from_pretrained(folder).eval().requires_grad_(False)


def untrained_text_encoder(like: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0) -> str:
    """A text encoder of the same architecture and size as `like` (spec or folder) with random frozen weights,
    saved to out_dir; returns its 'local-dir:' spec. A control arm for Table 5 (text encoder without
    image-text pretraining); a text-only *pretrained* encoder of the same size is the paper's other arm."""
    src = TextEncoder.load(str(like))
    torch.manual_seed(seed)
    args = {k: v for k, v in src.model_cfg.items() if k != "custom_text"}
    model = (open_clip.CustomTextCLIP(**args) if src.model_cfg.get("custom_text") else open_clip.CLIP(**args))
    TextEncoder(model, src.tokenizer, src.model_cfg, "untrained").save(out_dir)
    return f"local-dir:{out_dir}"
