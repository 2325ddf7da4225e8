"""Text tower loading (open_clip local-dir / hf-hub), token states, retrieval metric, demo VAE / CLIP training."""
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bmjlib.model.encoders import (DEMO_VAE_CONFIG, TextEncoder, finetune_demo_decoder, finetune_vae_decoder,
                                   load_images, psnr_ssim, retrieval_topk, train_demo_clip, train_demo_vae)
from bmjlib.io import atomic_write_png

from test_pipeline import TINY_CLIP

WEIGHTS = "diffusion_pytorch_model.safetensors"
PLAIN_CLIP = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def save_open_clip_folder(model, cfg, folder):
    """The layout of an open_clip model on the Hugging Face hub (what local-dir: reads)."""
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")


@pytest.mark.parametrize("kind", ["custom_text", "plain"])
def test_text_tower_from_local_dir_matches_open_clip(tmp_path, kind):
    import open_clip

    torch.manual_seed(0)
    cfg = copy.deepcopy(TINY_CLIP if kind == "custom_text" else PLAIN_CLIP)
    args = {k: v for k, v in cfg.items() if k != "custom_text"}
    model = (open_clip.CustomTextCLIP(**args) if kind == "custom_text" else open_clip.CLIP(**args)).eval()
    save_open_clip_folder(model, cfg, tmp_path / "clip")

    enc = TextEncoder.load(f"local-dir:{tmp_path / 'clip'}")
    ctx = cfg["text_cfg"]["context_length"]
    prompts = ["new large left pleural effusion", "no acute cardiopulmonary process", ""]
    states = enc.encode(prompts)
    assert states.shape == (3, ctx, 32) and enc.width == 32 and enc.context_length == ctx
    # the pooled (EOT) token state, projected, is exactly open_clip's own text embedding
    ids = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'clip'}")(prompts)
    eot = ids.argmax(-1)
    proj = model.text.text_projection if kind == "custom_text" else model.text_projection
    with torch.no_grad():
        ref = model.encode_text(ids)
    torch.testing.assert_close(states[torch.arange(3), eot] @ proj, ref, atol=1e-5, rtol=1e-5)
    assert (states[0] - states[1]).abs().max() > 1e-3  # different sentences, different states
    assert not any(p.requires_grad for p in enc.parameters())  # frozen

    # TextEncoder.save writes a folder open_clip (and TextEncoder) loads back identically
    enc.save(tmp_path / "again")
    torch.testing.assert_close(TextEncoder.load(str(tmp_path / "again")).encode(prompts), states)


def test_text_tower_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no open_clip_config.json"):
        TextEncoder.load(f"local-dir:{tmp_path}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="could not load the text encoder 'hf-hub:nobody/no-such-model'"):
        TextEncoder.load("hf-hub:nobody/no-such-model")


def test_retrieval_topk_known_answer():
    texts = ["a", "b", "c", "a"]  # duplicate report text: retrieval ranks the 3 unique reports
    tf = {"a": torch.tensor([1.0, 0, 0]), "b": torch.tensor([0, 1.0, 0]), "c": torch.tensor([0, 0, 1.0])}
    img = torch.tensor([[1.0, 0.1, 0], [0.9, 0.5, 0], [0, 0.2, 1.0], [0.1, 1.0, 0.3]])
    r = retrieval_topk(img, texts, tf, ks=(1, 2))
    # image 0 -> a (hit), image 1 -> a first, b second (top-2 hit), image 2 -> c (hit), image 3 -> b, c, a (miss)
    assert r["top1"] == pytest.approx(2 / 4) and r["top2"] == pytest.approx(3 / 4)
    assert r["n_reports"] == 3 and r["chance_top1"] == pytest.approx(1 / 3)


def _blobs(n, size=32, seed=0):
    """Images with a bright blob on the left or right; the 'report' names the side."""
    rng = np.random.default_rng(seed)
    imgs, texts = [], []
    for _ in range(n):
        side = rng.choice(["left", "right"])
        x = np.full((size, size), 0.2, np.float32) + rng.normal(0, 0.02, (size, size)).astype(np.float32)
        c = size * 3 // 4 if side == "left" else size // 4  # patient's left = image right
        yy, xx = np.mgrid[:size, :size]
        x[(yy - size * 0.6) ** 2 + (xx - c) ** 2 < (size / 6) ** 2] = 0.9
        imgs.append(np.clip(x, 0, 1))
        texts.append(f"{side} effusion")
    return np.stack(imgs), texts


def test_demo_clip_learns_side(tmp_path):
    x, t = _blobs(64)
    xv, tv = _blobs(32, seed=1)
    cfg = copy.deepcopy(TINY_CLIP)
    m = train_demo_clip(x, t, xv, tv, tmp_path / "clip", epochs=20, batch_size=16, lr=5e-4, config=cfg)
    assert m["n_reports"] == 2
    assert m["top1"] >= 0.9  # chance 0.5: the contrastive model reads the image's side
    enc = TextEncoder.load(f"local-dir:{tmp_path / 'clip'}")
    assert enc.encode(["left effusion"]).shape == (1, 16, 32)


def test_demo_vae_reconstructs(tmp_path):
    x, _ = _blobs(64, size=16)
    xv, _ = _blobs(16, size=16, seed=2)
    cfg = dict(DEMO_VAE_CONFIG, block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4)
    m = train_demo_vae(x, xv, tmp_path / "vae", steps=80, batch_size=8, lr=3e-3, config=cfg)
    base_psnr, _ = psnr_ssim(xv, np.full_like(xv, xv.mean()))
    assert m["psnr"] > base_psnr + 5  # far better than predicting the mean grey
    assert m["scaling_factor"] > 0 and (tmp_path / "vae" / "config.json").is_file()



def test_vae_downsampling_is_the_latent_grid_the_vae_makes():
    from diffusers import AutoencoderKL
    from bmjlib.model.configs import SD15_VAE_CONFIG, vae_downsampling
    assert vae_downsampling(SD15_VAE_CONFIG) == 8  # Stable Diffusion: 512 px images, 64 x 64 latents
    for blocks in (2, 3):
        cfg = dict(DEMO_VAE_CONFIG, block_out_channels=[8] * blocks, down_block_types=["DownEncoderBlock2D"] * blocks,
                   up_block_types=["UpDecoderBlock2D"] * blocks, norm_num_groups=4, in_channels=1, out_channels=1)
        vae = AutoencoderKL(**cfg)
        with torch.no_grad():
            side = vae.encode(torch.zeros(1, 1, 16, 16)).latent_dist.mode().shape[-1]
        assert vae_downsampling(cfg) == vae_downsampling(vae.config) == 16 // side == 2 ** (blocks - 1)

def _ribs(n, size=16, seed=0):
    """Soft blobs crossed by fine tilted stripes (rib-like detail a 4x autoencoder tends to blur)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size
    out = []
    for _ in range(n):
        f, ph, tilt, a = rng.uniform(3, 5), rng.uniform(0, 2 * np.pi), rng.uniform(-0.5, 0.5), rng.uniform(0.1, 0.3)
        base = 0.3 + 0.4 * np.exp(-((x - rng.uniform(.3, .7)) ** 2 + (y - rng.uniform(.3, .7)) ** 2) / 0.08)
        out.append((base + a * np.sin(2 * np.pi * f * (y + tilt * x) + ph)).clip(0, 1).astype(np.float32))
    return np.stack(out)


def test_demo_vae_ssim_term_keeps_fine_detail(tmp_path):
    # the same 4x autoencoder, data, seed and steps, with and without the SSIM term: the term must raise the
    # held-out SSIM (the demo VAE: 0.923 -> 0.960 on the phantom's held-out images)
    x, xv = _ribs(64), _ribs(16, seed=10)
    cfg = dict(DEMO_VAE_CONFIG, block_out_channels=[8, 8, 8], norm_num_groups=4)
    plain = train_demo_vae(x, xv, tmp_path / "plain", steps=80, batch_size=8, lr=3e-3, config=cfg)
    with_ssim = train_demo_vae(x, xv, tmp_path / "ssim", steps=80, batch_size=8, lr=3e-3, config=cfg, ssim_weight=1.0)
    assert with_ssim["ssim"] > plain["ssim"] + 0.02


def test_decoder_finetune_keeps_the_latent_space_and_fits_whole_images(tmp_path):
    # a VAE trained on half-size crops, then its decoder alone on whole images: the encoder (the latent space the
    # UNets learn in, and its scaling factor) is bit-identical, and whole held-out images reconstruct better
    from diffusers import AutoencoderKL
    x, xv = _ribs(64, size=32), _ribs(16, size=32, seed=10)
    cfg = dict(DEMO_VAE_CONFIG, block_out_channels=[8, 8, 8], norm_num_groups=4)
    crops = train_demo_vae(x, xv, tmp_path / "crops", steps=60, batch_size=8, lr=3e-3, config=cfg, crop=16,
                           ssim_weight=1.0)
    vae = AutoencoderKL.from_pretrained(tmp_path / "crops")
    enc = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    dec = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    whole = torch.as_tensor(x)[:, None] * 2 - 1
    losses = finetune_vae_decoder(vae, whole, steps=60, batch_size=8, lr=3e-3, ssim_weight=1.0)
    assert len(losses) == 60 and np.mean(losses[-10:]) < np.mean(losses[:10])
    assert all(torch.equal(v, vae.encoder.state_dict()[k]) for k, v in enc.items())
    assert any(not torch.equal(v, vae.decoder.state_dict()[k]) for k, v in dec.items())
    both = train_demo_vae(x, xv, tmp_path / "both", steps=60, batch_size=8, lr=3e-3, config=cfg, crop=16,
                          ssim_weight=1.0, decoder_steps=60, decoder_lr=3e-3)
    assert both["decoder_steps"] == 60 and crops["decoder_steps"] == 0
    assert both["scaling_factor"] == pytest.approx(crops["scaling_factor"])  # same encoder, same latent scale
    assert both["ssim"] > crops["ssim"] + 0.01 and both["psnr"] > crops["psnr"]
    # the decoder fine-tuned afterwards, from the saved VAE, is the same VAE bit for bit: a new step count
    # redoes only this part
    later = finetune_demo_decoder(tmp_path / "crops", x, xv, tmp_path / "later", 60, batch_size=8, lr=3e-3,
                                  ssim_weight=1.0)
    a, b = load_file(tmp_path / "both" / WEIGHTS), load_file(tmp_path / "later" / WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert later["ssim"] == both["ssim"] and later["scaling_factor"] == both["scaling_factor"]


def test_components_redo_only_the_part_whose_inputs_changed(tmp_path, monkeypatch):
    # the demo's frozen components are three parts (vae_base, vae = its decoder fine-tuned, text_encoder), each
    # redone only when what it is made from changed, and kept when a later part fails
    from bmjlib.io import sha256_file
    from bmjlib.model import stages
    from test_train import make_table
    table = make_table(tmp_path / "img")
    calls = []
    for name in ("train_demo_vae", "finetune_demo_decoder", "train_demo_clip"):
        monkeypatch.setattr(stages, name, lambda *a, _f=getattr(stages, name), _n=name, **k: calls.append(_n)
                            or _f(*a, **k))
    kw = dict(image_size=16, vae_steps=3, vae_batch=4, clip_batch=4, vae_ssim_weight=1.0)
    out = tmp_path / "components"

    def files(part):
        return {p.relative_to(out): sha256_file(p) for p in (out / part).rglob("*") if p.is_file()}

    first = stages.prepare_components(table, out, clip_epochs=1, vae_decoder_steps=2, **kw)
    assert calls == ["train_demo_vae", "finetune_demo_decoder", "train_demo_clip"]
    assert first["vae_metrics"]["decoder_steps"] == 2 and first["vae_base_metrics"]["decoder_steps"] == 0
    assert first["vae_metrics"]["scaling_factor"] == first["vae_base_metrics"]["scaling_factor"]
    before = {part: files(part) for part in stages.COMPONENT_PARTS}
    calls.clear()
    assert stages.prepare_components(table, out, clip_epochs=1, vae_decoder_steps=2, **kw) == first and not calls

    again = stages.prepare_components(table, out, clip_epochs=1, vae_decoder_steps=4, **kw)
    assert calls == ["finetune_demo_decoder"] and again["vae_metrics"]["decoder_steps"] == 4
    assert files("vae_base") == before["vae_base"] and files("text_encoder") == before["text_encoder"]
    assert files("vae") != before["vae"]
    assert again["clip_metrics"] == first["clip_metrics"] and again["vae_base_metrics"] == first["vae_base_metrics"]
    base, vae = (load_file(out / part / WEIGHTS) for part in ("vae_base", "vae"))
    assert all(torch.equal(base[k], vae[k]) for k in base if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(base[k], vae[k]) for k in base if k.startswith("decoder."))

    calls.clear()
    vae_files = files("vae")
    monkeypatch.setattr(stages, "train_demo_clip", lambda *a, **k: calls.append("killed") or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        stages.prepare_components(table, out, clip_epochs=2, vae_decoder_steps=4, **kw)
    assert calls == ["killed"] and files("text_encoder") == before["text_encoder"]  # the old one, whole
    assert set(json.loads((out / "components.json").read_text())["keys"]) == {"vae_base", "vae"}
    monkeypatch.undo()
    done = stages.prepare_components(table, out, clip_epochs=2, vae_decoder_steps=4, **kw)
    assert files("vae") == vae_files and files("vae_base") == before["vae_base"]  # the CLIP alone was redone
    assert done["vae_metrics"] == again["vae_metrics"]
    assert set(done["keys"]) == set(stages.COMPONENT_PARTS) and files("text_encoder") != before["text_encoder"]

    # new pixels under the same image names (a rerun of the phantom or the cohort): every part is redone
    kept = {part: files(part) for part in stages.COMPONENT_PARTS}
    atomic_write_png(table["image_path"][0], np.full((36, 36), 90, np.uint8))
    redone = stages.prepare_components(table, out, clip_epochs=2, vae_decoder_steps=4, **kw)
    assert all(redone["keys"][part] != done["keys"][part] for part in stages.COMPONENT_PARTS)
    assert all(files(part) != kept[part] for part in stages.COMPONENT_PARTS)


def test_load_images_skips_and_names_bad_files(tmp_path):
    atomic_write_png(tmp_path / "ok.png", np.tile(np.arange(40, dtype=np.uint8) * 5, (40, 1)))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    paths = [tmp_path / "ok.png", tmp_path / "bad.png", tmp_path / "missing.png"]
    arr, kept = load_images(paths, 32, skip_bad=True)
    assert arr.shape == (1, 32, 32) and kept == [0] and arr.std() > 0.1
    from bmjlib.io import ImageError
    with pytest.raises(ImageError, match="bad.png"):
        load_images(paths, 32)


def test_untrained_text_encoder_same_size(tmp_path):
    from bmjlib.model.encoders import untrained_text_encoder

    from test_pipeline import tiny_text_encoder

    tiny_text_encoder(seed=3).save(tmp_path / "trained")
    spec = untrained_text_encoder(tmp_path / "trained", tmp_path / "random", seed=1)
    a, b = TextEncoder.load(str(tmp_path / "trained")), TextEncoder.load(spec)
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    x, y = a.encode(["left effusion"]), b.encode(["left effusion"])
    assert x.shape == y.shape and (x - y).abs().max() > 1e-2
