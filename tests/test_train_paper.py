"""Paper-scale dry run: SD v1.5-sized UNet (8 input channels) and VAE from the config literals, random weights,
two training steps on random 256 px tensors (no weights downloaded), and the memory that takes."""
import json
import math
import subprocess
import sys

import pytest


def _available_gb() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


DRY_RUN = """
import json, resource, sys
from bmjlib.model.train import paper_dry_run
r = paper_dry_run(batch_size=1, steps=2, device="cpu")
r["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(r))
"""


def test_paper_dry_run_memory_is_counted():
    from bmjlib.model.train import paper_dry_run_memory_gb

    need = paper_dry_run_memory_gb(batch_size=1)
    # 16 bytes x 859.5 M trainable parameters; SD v1.5's UNet at 256 px keeps ~1 GB of activations per image
    assert 12.7 < need["weights_grads_adamw_gb"] < 12.9 and 0.5 < need["activations_gb"] < 2
    assert paper_dry_run_memory_gb(batch_size=2)["activations_gb"] > 1.9 * need["activations_gb"]


@pytest.mark.slow
def test_paper_scale_dry_run_two_steps():
    from bmjlib.model.train import paper_dry_run_memory_gb

    need = paper_dry_run_memory_gb(batch_size=1)["total_gb"]
    if _available_gb() < 1.1 * need:
        pytest.skip(f"needs {need:.1f} GiB of RAM (+10 %) for an 860M-parameter UNet with AdamW on CPU "
                    f"(paper_dry_run_memory_gb); {_available_gb():.1f} GiB free")
    proc = subprocess.run([sys.executable, "-c", DRY_RUN], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 855 < r["unet_params_M"] < 870  # SD v1.5's UNet is 859.5 M parameters (+ 4 x 320 x 9 for conv_in)
    assert 80 < r["vae_params_M"] < 90     # SD v1.5's VAE: 83.7 M
    assert r["latent_shape"] == [4, 32, 32]
    assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    assert 0.8 * need < r["peak_rss_gb"] < 1.1 * need, (r["peak_rss_gb"], need)  # the count is what it takes
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
