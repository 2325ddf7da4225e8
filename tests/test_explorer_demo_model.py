"""The shipped demo model: compact format round trip, sha256 record, loading by name."""
import shutil

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from bmjlib.model import demo_model as dm
from bmjlib.model.export import export


def _random_pipeline(folder):
    """A demo-scale pipeline with random weights, saved with save_pretrained (what the chain writes)."""
    import open_clip
    from diffusers import AutoencoderKL

    from bmjlib.model.encoders import TextEncoder
    from bmjlib.model.configs import DEMO_CLIP_CONFIG, DEMO_VAE_CONFIG
    from bmjlib.model.pipeline import BiomedJourneyPipeline

    torch.manual_seed(0)
    cfg = {k: v for k, v in DEMO_CLIP_CONFIG.items() if k != "custom_text"}
    clip = open_clip.CustomTextCLIP(**cfg)
    enc = TextEncoder(clip, open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"]),
                      DEMO_CLIP_CONFIG, "demo-clip")
    pipe = BiomedJourneyPipeline.build(AutoencoderKL(**DEMO_VAE_CONFIG), enc, image_size=64)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    src = _random_pipeline(root / "model")
    priors = np.random.default_rng(0).random((1, 64, 64)).astype(np.float32)
    summary = export(src, ["new small left pleural effusion", "no change"], root / "compact",
                        check_priors=priors, check_prompts=["new small left pleural effusion"], check_steps=3)
    return root, summary


def test_compact_state_round_trip_is_close_and_keeps_names():
    torch.manual_seed(0)
    state = {"w": torch.randn(64, 32, 3, 3), "b": torch.randn(64), "steps": torch.tensor([3]),
             dm.EMBEDDING_KEY: torch.randn(1000, 16)}
    back = dm.expand_state(dm.compact_state(state, keep_rows=[0, 5, 7]))
    assert set(back) == set(state)
    assert torch.equal(back["b"], state["b"]) and torch.equal(back["steps"], state["steps"])
    err = (back["w"] - state["w"]).abs().amax(dim=(1, 2, 3))
    assert (err <= state["w"].abs().amax(dim=(1, 2, 3)) / 127 * 0.6).all()  # half a step + the fp16 scale
    emb = back[dm.EMBEDDING_KEY]
    assert emb.shape == (1000, 16) and emb[[1, 2, 999]].abs().sum() == 0
    assert torch.allclose(emb[[0, 5, 7]], state[dm.EMBEDDING_KEY][[0, 5, 7]], atol=0.05)


def test_export_is_smaller_verified_and_generates_like_the_original(exported, tmp_path):
    root, summary = exported
    assert summary["bytes"] < summary["original_bytes"] / 3
    assert 2 < summary["embedding_rows_kept"] < 100
    assert summary["ssim"] > 0.9 and summary["max_abs_diff"] < 0.2
    sums = dm.verify(root / "compact")
    assert "unet/diffusion_pytorch_model.safetensors" in sums and "bmj_pipeline.json" in sums
    card = (root / "compact" / dm.CARD).read_text()
    assert "mean SSIM" in card

    from bmjlib.model.pipeline import BiomedJourneyPipeline

    folder = dm.materialise(root / "compact", tmp_path)
    assert dm.materialise(root / "compact", tmp_path) == folder  # cached: second call reuses it
    compact = BiomedJourneyPipeline.from_pretrained(folder)
    out = compact(np.full((64, 64), 0.5, np.float32), "no change", steps=2)
    assert out.shape == (1, 64, 64) and np.isfinite(out).all()
    # the export's own fidelity figures, checked here against the original and the compact model called directly
    # on another prior and prompt: close, and the recorded max difference is of the same order
    original = BiomedJourneyPipeline.from_pretrained(root / "model")
    prior = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    a = original(prior, "no change", steps=3, seed=2)
    b = compact(prior, "no change", steps=3, seed=2)
    diff = float(np.abs(a - b).max())
    assert 0 < diff < 0.2 and diff < 10 * summary["max_abs_diff"] + 0.01
    assert structural_similarity(a[0], b[0], data_range=1.0) > 0.9
    assert np.abs(a - original(prior, "no change", steps=3, seed=3)).max() > 10 * diff  # a real difference is larger


def test_fidelity_compares_both_models_at_the_shipped_guidance(exported, tmp_path):
    """A model exported with its chosen guidance (text 2, image 2.5; the original's folder holds none, so loaded
    alone it would sample at InstructPix2Pix's 7.5 / 1.5): the recorded difference is the quantisation's, as
    small as without guidance, not the difference between two guidance settings."""
    root, plain = exported
    priors = np.random.default_rng(0).random((1, 64, 64)).astype(np.float32)
    guided = export(root / "model", ["new small left pleural effusion", "no change"], tmp_path / "compact",
                    check_priors=priors, check_prompts=["new small left pleural effusion"], check_steps=3,
                    guidance={"text_scale": 2.0, "image_scale": 2.5})
    assert guided["max_abs_diff"] < 3 * plain["max_abs_diff"] + 0.01 and guided["ssim"] > 0.99


def test_a_changed_or_missing_file_is_named(exported, tmp_path):
    root, _ = exported
    copy = tmp_path / "c"
    shutil.copytree(root / "compact", copy)
    f = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(dm.DemoModelError, match="unet/diffusion_pytorch_model.safetensors: sha256"):
        dm.verify(copy)
    f.unlink()
    with pytest.raises(dm.DemoModelError, match="listed in SHA256SUMS but missing"):
        dm.materialise(copy, tmp_path / "cache")
    (copy / dm.SUMS).unlink()
    with pytest.raises(dm.DemoModelError, match="not shipped"):
        dm.verify(copy)


def test_other_names_are_paths():
    assert str(dm.resolve_model("runs/demo/05_stage2/model")) == "runs/demo/05_stage2/model"


def test_the_shipped_demo_model_matches_its_sha256_and_generates(tmp_path):
    """bmjlib/model/demo/ as committed: every file matches SHA256SUMS, it loads by name and generates."""
    from bmjlib.model.pipeline import BiomedJourneyPipeline

    sums = dm.verify()
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/open_clip_model.safetensors", "projection.safetensors"} <= set(sums)
    assert sum((dm.DEMO_DIR / r).stat().st_size for r in sums) < 12 * 2**20  # small enough to keep in git
    pipe = BiomedJourneyPipeline.from_pretrained(dm.materialise(cache=tmp_path))
    out = pipe(np.full((64, 64), 0.5, np.float32), "New small left pleural effusion.", steps=2)
    assert out.shape == (1, pipe.image_size, pipe.image_size) and np.isfinite(out).all() and out.std() > 0


def test_from_pretrained_by_name_is_the_shipped_model(tmp_path, monkeypatch):
    from bmjlib.model.pipeline import BiomedJourneyPipeline

    monkeypatch.setenv("BMJ_CACHE", str(tmp_path))
    by_name = BiomedJourneyPipeline.from_pretrained("demo")
    by_path = BiomedJourneyPipeline.from_pretrained(dm.materialise(cache=tmp_path))
    prior = np.full((64, 64), 0.4, np.float32)
    a = by_name(prior, "No change.", steps=2, seed=3)
    b = by_path(prior, "No change.", steps=2, seed=3)
    np.testing.assert_array_equal(a, b)
