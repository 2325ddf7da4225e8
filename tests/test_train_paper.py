"""Paper-scale dry run: SD v1.5-sized UNet (8 input channels) and VAE from the config literals, random weights,
two training steps on random 256 px tensors (no weights downloaded)."""
import math

import pytest


def _available_gb() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


@pytest.mark.slow
def test_paper_scale_dry_run_two_steps():
    if _available_gb() < 18:
        pytest.skip(f"needs ~16 GB free RAM for an 860M-parameter UNet with AdamW on CPU; {_available_gb():.1f} GB free")
    from bmjlib.model.train import paper_dry_run

    r = paper_dry_run(batch_size=1, steps=2)
    assert 855 < r["unet_params_M"] < 870  # SD v1.5's UNet is 859.5 M parameters (+ 4 x 320 x 9 for conv_in)
    assert 80 < r["vae_params_M"] < 90     # SD v1.5's VAE: 83.7 M
    assert r["latent_shape"] == [4, 32, 32]
    assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    print(r)


def test_paper_configs_are_sd15():
    from bmjlib.model.pipeline import build_unet
    from bmjlib.model.configs import SD15_UNET_CONFIG, SD15_VAE_CONFIG

    assert SD15_UNET_CONFIG["in_channels"] == 8 and SD15_UNET_CONFIG["cross_attention_dim"] == 768
    assert SD15_UNET_CONFIG["block_out_channels"] == [320, 640, 1280, 1280]
    assert SD15_VAE_CONFIG["scaling_factor"] == 0.18215
    unet = build_unet(SD15_UNET_CONFIG, block_out_channels=[32, 32, 64, 64], norm_num_groups=32,
                      cross_attention_dim=64)  # same topology, narrow: builds fast
    assert unet.conv_in.in_channels == 8 and len(unet.down_blocks) == 4
