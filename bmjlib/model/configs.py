"""The model's sizes, written once as literals (paper §4.2, §5.1; DESIGN "The model").

Paper scale: Stable Diffusion v1.5's UNet, VAE and noise schedule (the UNet widened to 8 input channels:
noisy latent || prior latent, InstructPix2Pix), BiomedCLIP as the text tower. Demo scale: the same classes
at a size a 2-core CPU trains from scratch in minutes.
"""
from __future__ import annotations

# Stable Diffusion v1.5 unet/config.json, with in_channels 8 (noisy latent || prior latent) and
# sample_size 32 (256 px / 8).
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 32,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


# Stable Diffusion v1.5 vae/config.json (8x downsampling, 4 latent channels).
SD15_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}


# Stable Diffusion v1.5's text encoder (CLIP ViT-L/14's text tower: 12 layers, width 768, 77 tokens) as an
# open_clip text config; the GPU benchmark's stand-in for a paper-size text tower with random weights.
SD15_TEXT_CONFIG = {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12,
                    "output_dim": 768}

# Stable Diffusion v1.5's training noise schedule (scheduler/scheduler_config.json, as DDPM).
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


# Demo scale: 64 px images -> 16x16x4 latents (4x VAE); ~4 M parameters, trainable on 2 CPU cores.
# Demo: narrow channels and cross-attention only at the lowest resolution (4x4 latents), so the 2-core CPU
# affords many more optimizer steps; measured on the demo phantom's val pairs this learns more within the
# budget than [64, 128, 128] with attention at the two upper levels (SSIM to the true counterfactual 0.59 vs 0.50).
DEMO_UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 128,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}


BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


# A tiny CLIP (open_clip CustomTextCLIP config): 64 px grey images repeated to RGB, ViT 8 px patches;
# the text tower uses open_clip's SimpleTokenizer (CLIP BPE) with a short context (phantom reports
# are short). Its token states (width 128) become the demo UNet's cross-attention context.
DEMO_CLIP_CONFIG = {
    "embed_dim": 128,
    "custom_text": True,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "head_width": 32, "patch_size": 8,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3,
                 "mlp_ratio": 2.0},
}


# A small AutoencoderKL: 2 downsamplings (4x), 4 latent channels, grey in/out.
DEMO_VAE_CONFIG = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
}


def vae_downsampling(vae_config) -> int:
    """How many image pixels one latent pixel spans per side: AutoencoderKL halves the image after every block but
    the last (diffusers' pipelines call it vae_scale_factor). `vae_config`: a config.json dict or a model's config."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)
