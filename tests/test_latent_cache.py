"""The latent cache (paper §5.1, frozen encoders run once): sharded memory-mapped stores with a sha256
manifest, batches bit-identical to latents computed directly, resume after a kill, torn shards rebuilt,
fingerprint keys, one writer and read-only openers."""
import json
import pickle

import numpy as np
import pytest
import torch

import bmjlib.model.latents as L
import bmjlib.model.train as T
from bmjlib.io import fingerprint, read_image, sha256_file
from bmjlib.model.latents import CacheError, build_cache, cache_path, open_cache, swap_laterality, write_cache
from bmjlib.model.pipeline import DUMMY_PRIOR_VALUE, BiomedJourneyPipeline, to_batch

from test_pipeline import tiny_pipeline
from test_train import make_table

SIZE, MARGIN = 32, 1


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return make_table(tmp_path_factory.mktemp("img"))


@pytest.fixture
def rows(table):
    return T.stage_rows(table, "registered", "description")  # 10 rows, 20 distinct images


@pytest.fixture
def encoded(monkeypatch):
    """Counts the images the VAE encodes (each image is encoded as is and mirrored: two per image)."""
    seen = []
    orig = BiomedJourneyPipeline.encode_images

    def counting(self, images, *a, **k):
        seen.append(len(images))
        return orig(self, images, *a, **k)
    monkeypatch.setattr(BiomedJourneyPipeline, "encode_images", counting)
    return lambda: sum(seen) // 2


def reference_batch(pipe, rows, dummy_prior, idx, g, hflip=True):
    """What the cache must give: latents and token states computed directly (the same calls, in one batch,
    as before the cache was sharded), cropped and flipped as training's in-memory batch always did."""
    size = SIZE + 2 * MARGIN * pipe.latent_factor
    paths = list(dict.fromkeys(list(rows["target_path"]) + ([] if dummy_prior else list(rows["prior_path"]))))
    x = torch.cat([to_batch(read_image(p), size) for p in paths])
    xf = torch.flip(x, dims=[-1])
    scaled = torch.stack([pipe.encode_images(x), pipe.encode_images(xf)], 1).half()
    mode = torch.stack([pipe.encode_prior(x), pipe.encode_prior(xf)], 1).half()
    at = {p: i for i, p in enumerate(paths)}
    target = scaled[[at[p] for p in rows["target_path"]]]
    if dummy_prior:
        d = pipe.encode_prior(torch.full((1, 1, size, size), DUMMY_PRIOR_VALUE)).half()
        prior = torch.cat([d, d])[None].expand(len(rows), -1, -1, -1, -1)
    else:
        prior = mode[[at[p] for p in rows["prior_path"]]]
    texts = list(dict.fromkeys([""] + list(rows["text"]) + [swap_laterality(t) for t in rows["text"]]))
    states = pipe.text_states(texts).half()
    pos = {t: i for i, t in enumerate(texts)}
    text_idx = torch.tensor([[pos[t], pos[swap_laterality(t)]] for t in rows["text"]])
    n, m = len(idx), MARGIN
    flip = (torch.rand(n, generator=g) < 0.5).long() if hflip else torch.zeros(n, dtype=torch.long)
    off = torch.randint(0, 2 * m + 1, (n, 2), generator=g)
    h = target.shape[-1] - 2 * m
    at = list(zip(idx.tolist(), flip.tolist(), off.tolist()))
    tg = torch.stack([target[i, f, :, oy:oy + h, ox:ox + h] for i, f, (oy, ox) in at])
    pr = torch.stack([prior[i, f, :, oy:oy + h, ox:ox + h] for i, f, (oy, ox) in at])
    return {"target": tg.float(), "prior": pr.float(), "text": states[text_idx[idx, flip]].float()}, states[0][None]


def assert_equal_to_fp16_rounding(a, b, key):
    """Latents encoded in another VAE call: the VAE's last float32 bit can depend on how many images share it."""
    torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4, msg=key)


def assert_same_batches(data, ref_fn, n=10, seeds=(0, 1, 2), exact=True):
    for s in seeds:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(s))[:7]
        a = data.batch(idx, torch.Generator().manual_seed(s), hflip=True, device="cpu")
        b = ref_fn(idx, torch.Generator().manual_seed(s))
        for k in ("target", "prior", "text"):
            if exact:
                assert torch.equal(a[k], b[k]), k
            else:
                assert_equal_to_fp16_rounding(a[k], b[k], k)


@pytest.mark.parametrize("dummy_prior", [False, True])
def test_batches_are_bit_identical_to_latents_computed_directly(tmp_path, rows, dummy_prior):
    pipe = tiny_pipeline()
    data = build_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=dummy_prior, progress=False, shard_entries=3)
    assert len(data) == 10 and data.skipped == 0
    side = (SIZE + 2 * MARGIN * pipe.latent_factor) // pipe.latent_factor
    assert data.target.shape == (10, 2, 4, side, side) and data.target[3].dtype == torch.float16
    assert (data.prior is None) == dummy_prior
    null = None
    for s in (0, 1, 2):
        idx = torch.randperm(10, generator=torch.Generator().manual_seed(s))[:7]
        a = data.batch(idx, torch.Generator().manual_seed(s), hflip=True, device="cpu")
        b, null = reference_batch(pipe, rows, dummy_prior, idx, torch.Generator().manual_seed(s))
        for k in ("target", "prior", "text"):
            assert a[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
        assert a["target"].shape == (7, 4, side - 2, side - 2)
    assert torch.equal(data.null_states, null) and data.null_states.dtype == torch.float16
    # the prior's latent is the unscaled posterior mode (InstructPix2Pix), the target's is scaled
    if not dummy_prior:
        b = data.batch(torch.arange(10), torch.Generator().manual_seed(0), hflip=False, device="cpu")
        assert b["prior"].abs().mean() > 2 * b["target"].abs().mean()


def test_stores_are_sharded_with_sha256_manifest_and_read_lazily(tmp_path, rows):
    pipe = tiny_pipeline()
    path = write_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False, shard_entries=4)
    assert path == cache_path(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False) and path.is_file()
    lat_dir = next(tmp_path.glob("latents-*"))
    man = json.loads((lat_dir / "manifest.json").read_text())
    assert [s["count"] for s in man["shards"]] == [4, 4, 4, 4, 4]  # 20 images, 4 per shard
    kinds = []
    for s in man["shards"]:
        keys = lat_dir / s["file"].replace(".npy", ".keys.json")
        assert sha256_file(lat_dir / s["file"]) == s["sha256"] and sha256_file(keys) == s["keys_sha256"]
        kinds += [k.split("|")[0] for k in json.loads(keys.read_text())]
    assert kinds == ["scaled"] * 10 + ["mode"] * 10  # targets scaled, priors as is (InstructPix2Pix)
    data = open_cache(path)
    assert data.latents._maps == {}  # nothing read before a batch asks for it
    data.batch(torch.tensor([0]), torch.Generator().manual_seed(0), hflip=False, device="cpu")
    assert 1 <= len(data.latents._maps) <= 2
    assert all(isinstance(m.base, np.memmap) for m in data.latents._maps.values())  # views of file maps


def test_killed_build_resumes_from_last_complete_shard(tmp_path, rows, monkeypatch):
    monkeypatch.setattr(L, "CHUNK", 3)  # encode 3 images at a time; shards of 4 entries
    pipe = tiny_pipeline()
    ref = build_cache(pipe, rows, tmp_path / "ref", SIZE, MARGIN, dummy_prior=False, progress=False, shard_entries=4)
    orig, seen, dies_after = BiomedJourneyPipeline.encode_images, [], [4]

    def encode(self, x, *a, **k):
        if len(seen) == dies_after[0]:
            raise KeyboardInterrupt  # the process dies while encoding the third chunk (images 7-9)
        seen.append(len(x))
        return orig(self, x, *a, **k)
    monkeypatch.setattr(BiomedJourneyPipeline, "encode_images", encode)
    with pytest.raises(KeyboardInterrupt):
        write_cache(pipe, rows, tmp_path / "run", SIZE, MARGIN, dummy_prior=False, progress=False, shard_entries=4)
    lat_dir = next((tmp_path / "run").glob("latents-*"))
    assert [s["count"] for s in json.loads((lat_dir / "manifest.json").read_text())["shards"]] == [4]
    # what a kill can also leave: a shard finished after the last manifest, a temporary file
    (lat_dir / "shard-00001.npy").write_bytes(b"half")
    (lat_dir / "shard-00001.keys.json").write_text("[]")
    (lat_dir / ".shard-00002.npy.x1y2.tmp.npy").write_bytes(b"half")
    seen.clear()
    dies_after[0] = -1
    data = build_cache(pipe, rows, tmp_path / "run", SIZE, MARGIN, dummy_prior=False, progress=False, shard_entries=4)
    assert sum(seen) // 2 == 16  # 20 images, 4 of them in the one complete shard
    assert sorted(p.name for p in lat_dir.iterdir()) == ["manifest.json"] + [
        f"shard-0000{i}{ext}" for i in range(5) for ext in (".keys.json", ".npy")]
    assert_same_batches(data, lambda idx, g: ref.batch(idx, g, hflip=True, device="cpu"), exact=False)
    kept = json.loads((lat_dir / "shard-00000.keys.json").read_text())
    for k in kept:  # the complete shard's entries are the ones first written, bit for bit
        assert np.array_equal(data.latents.get(k), ref.latents.get(k))
    seen.clear()
    build_cache(pipe, rows, tmp_path / "run", SIZE, MARGIN, dummy_prior=False, progress=False, shard_entries=4)
    assert seen == []  # written once: a later build encodes nothing


@pytest.mark.parametrize("store,name,torn", [("latents", "shard-00001.npy", "shard-00001.npy"),
                                             ("latents", "shard-00002.npy", "shard-00002.keys.json"),
                                             ("text", "shard-00000.npy", "shard-00000.npy")])
def test_torn_shard_is_found_by_sha256_and_encoded_again(tmp_path, rows, store, name, torn, capsys):
    pipe = tiny_pipeline()
    path = write_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False, shard_entries=4)
    ref = open_cache(path)
    batches = [ref.batch(torch.arange(10), torch.Generator().manual_seed(s), True, "cpu") for s in (0, 1)]
    folder = next(tmp_path.glob(f"{store}-*"))
    shard = folder / torn
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # same size, one byte changed: only the sha256 tells
    shard.write_bytes(bytes(raw))
    capsys.readouterr()
    data = build_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False, shard_entries=4)
    out = capsys.readouterr().out
    assert f"cache shard {folder.name}/{name} does not match its recorded sha256" in out
    man = json.loads((folder / "manifest.json").read_text())
    for s in man["shards"]:
        assert sha256_file(folder / s["file"]) == s["sha256"]
    for s, want in zip((0, 1), batches):
        got = data.batch(torch.arange(10), torch.Generator().manual_seed(s), True, "cpu")
        for k in want:  # the torn shard's images are encoded again, in a smaller call
            assert_equal_to_fp16_rounding(got[k], want[k], k)


def test_fingerprint_keys_rebuild_what_changed(tmp_path, rows, table, encoded):
    pipe = tiny_pipeline()
    build_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False)
    assert encoded() == 20
    build_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False)
    assert encoded() == 20  # nothing new
    build_cache(pipe, rows, tmp_path, SIZE + 8, MARGIN, dummy_prior=False, progress=False)
    assert encoded() == 40 and len(list(tmp_path.glob("latents-*"))) == 2  # another size: another store
    other = tiny_pipeline()
    with torch.no_grad():
        other.vae.encoder.conv_in.bias.add_(0.01)
    build_cache(other, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False)
    assert encoded() == 60 and len(list(tmp_path.glob("latents-*"))) == 3  # another VAE
    other = tiny_pipeline()
    with torch.no_grad():
        other.vae.decoder.conv_out.bias.add_(0.01)
        other.vae.post_quant_conv.bias.add_(0.01)
    build_cache(other, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False)
    assert encoded() == 60 and len(list(tmp_path.glob("latents-*"))) == 3  # another decoder: latents as they were
    other = tiny_pipeline()
    with torch.no_grad():
        other.text_encoder.model.text.ln_final.bias.add_(0.01)
    a = build_cache(other, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False)
    assert encoded() == 60 and len(list(tmp_path.glob("text-*"))) == 2  # another text encoder: text only
    assert not torch.equal(a.null_states, build_cache(pipe, rows, tmp_path, SIZE, MARGIN, False, False).null_states)
    # other rows: another dataset file; only their new images are encoded
    more = T.stage_rows(table, "dummy", "impression")
    b = build_cache(pipe, more, tmp_path, SIZE, MARGIN, dummy_prior=True, progress=False)
    assert encoded() == 60  # stage 1's images are stage 2's targets here: already cached as targets
    assert b.path != a.path and len(list(tmp_path.glob("dataset-*.safetensors"))) == 5  # one per setting
    # a rewritten image file is encoded again
    p = rows["target_path"][0]
    img = read_image(p)
    from bmjlib.io import atomic_write_png
    atomic_write_png(p, (255 - img * 255).astype(np.uint8))
    build_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False)
    assert encoded() == 61
    other = tiny_pipeline()
    other.vae.register_to_config(scaling_factor=2 * other.vae.config.scaling_factor)
    build_cache(other, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False)
    assert encoded() == 81  # another latent scale: another store


def test_a_change_to_the_code_that_reads_or_encodes_encodes_again(tmp_path, rows, encoded, monkeypatch):
    pipe = tiny_pipeline()
    build_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False)
    build_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False)
    assert encoded() == 20
    texts = []
    real_states = BiomedJourneyPipeline.text_states
    monkeypatch.setattr(BiomedJourneyPipeline, "text_states", lambda self, p: texts.extend(p) or real_states(self, p))
    code = L.code_fingerprint_of
    monkeypatch.setattr(L, "code_fingerprint_of", lambda *m: fingerprint(code(*m), "edited"))
    build_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False)
    assert encoded() == 40 and len(list(tmp_path.glob("latents-*"))) == 2 and len(list(tmp_path.glob("text-*"))) == 2
    assert pipe.null_prompt in texts and set(rows["text"]) <= set(texts)


def test_one_writer_then_every_process_opens_read_only(tmp_path, rows, encoded):
    pipe = tiny_pipeline()
    with pytest.raises(CacheError, match=r"dataset-[0-9a-f]{16}\.safetensors: no such cache file"):
        build_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, write=False)
    assert encoded() == 0 and not list(tmp_path.glob("*.safetensors"))
    main = build_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False)  # the main process
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    before = encoded()
    rank = build_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, write=False)  # any other rank
    worker = pickle.loads(pickle.dumps(rank))  # a data-loader worker maps the shards itself
    assert encoded() == before and sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == files
    assert worker.latents._maps == {}
    for d in (rank, worker):
        assert_same_batches(d, lambda idx, g: main.batch(idx, g, hflip=True, device="cpu"))
        assert torch.equal(d.null_states, main.null_states)


def test_unreadable_image_is_skipped_and_counted(tmp_path, rows, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    rows = rows.copy()
    rows.loc[2, "prior_path"] = str(bad)
    rows.loc[5, "target_path"] = str(tmp_path / "missing.png")
    data = build_cache(tiny_pipeline(), rows, tmp_path / "c", SIZE, MARGIN, dummy_prior=False, progress=False)
    assert len(data) == 8 and data.skipped == 2
    assert "2 unreadable image(s) skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no training example has readable images"):
        build_cache(tiny_pipeline(), rows.assign(target_path=str(bad)), tmp_path / "c", SIZE, MARGIN, False, False)


def test_bad_cache_files_are_refused_with_their_name(tmp_path, rows):
    with pytest.raises(CacheError, match="nothing.safetensors: no such cache file"):
        open_cache(tmp_path / "nothing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CacheError, match="junk.safetensors: unreadable cache file"):
        open_cache(tmp_path / "junk.safetensors")
    pipe = tiny_pipeline()
    path = write_cache(pipe, rows, tmp_path, SIZE, MARGIN, dummy_prior=False, progress=False, shard_entries=4)
    folder = next(tmp_path.glob("latents-*"))
    shard = folder / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes()[:100])  # torn under a reader
    data = open_cache(path)
    with pytest.raises(CacheError, match="shard-00000.npy: missing or not the size its manifest records"):
        for i in range(10):
            data.target[i]
    man = json.loads((folder / "manifest.json").read_text())
    man["shards"][1]["sha256"] = "0" * 64  # the store changed after the dataset file was written
    (folder / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CacheError, match="shard-00001.npy changed after this file was written"):
        open_cache(path)
    (folder / "manifest.json").write_text("{")
    with pytest.raises(CacheError, match="manifest.json: unreadable"):
        open_cache(path)


def test_benchmark_reports_rates_and_reads_back_what_it_wrote(tmp_path):
    from bmjlib.bench.cache import cache_benchmark

    r = cache_benchmark(n_images=64, folder=tmp_path, shard_entries=16, batch_size=8)
    assert r["images"] == 64 and r["shards"] == 4
    for k in ("write_images_per_s", "read_images_per_s", "verify_images_per_s"):
        assert r[k] > 0
    assert r["write_peak_rss_mb"] > 0 and r["read_peak_rss_mb"] > 0
