"""Benchmark of the latent cache that training reads (paper §5.1: the frozen encoders run once).

Writes `n_images` synthetic latents of the demo model's shape (64 px + 1 latent px of crop margin each
side -> 2 x 4 x 18 x 18 float16 per image, as is and mirrored) and `n_texts` token states of the demo
text tower's shape (48 x 128 float16) through the cache's own writer (`latents.ShardStore`,
`latents.write_dataset`), then reads one epoch of augmented (target, prior, sentence) training batches
through its reader (`latents.open_cache`, `CachedData.batch`) as training does. The VAE and the text
tower are not run (random values stand in for their outputs), so the rates are the cache's own.

Reported: write and read rates (images/s; a row is a target and a prior image), the rate at which a
resumed or repeated build checks every shard's sha256, and each phase's peak RSS (`core.PeakMemory`:
the whole process, so also what it held before; `rss_before_mb` is that). File-backed pages of the
memory-mapped shards count in RSS while mapped but are the page cache's, not the process's heap:
`read_rss_anon_mb` is the anonymous part. `legacy=True` also times what the cache replaced: one dict in
RAM, saved whole (torch.save) every 256 images, and loaded whole to read; its writes grow with the square
of the image count (about 3 minutes for 20,000 images on a loaded 2-core machine).

    scripts/env.sh python -m bmjlib.bench.cache --images 20000
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from bmjlib.bench.core import PeakMemory
from bmjlib.io import atomic_torch_save
from bmjlib.model.latents import SHARD_ENTRIES, ShardStore, open_cache, write_dataset

LATENT = (2, 4, 18, 18)   # demo: 64 px images, 4x VAE, crop margin 1 latent px, both orientations
TEXT = (48, 128)          # demo text tower: context 48, width 128
CHUNK = 256               # images per encoder call in `latents.write_cache`


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _status_mb(field: str) -> float | None:
    try:
        m = re.search(rf"{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def _block(seed: int, start: int, n: int, shape) -> np.ndarray:
    """The synthetic values of entries start .. start+n (reproducible, so what is read can be checked)."""
    return np.random.default_rng([seed, start]).standard_normal((n, *shape), dtype=np.float32).astype(np.float16)


def cache_benchmark(n_images: int = 20_000, folder: str | Path | None = None, shard_entries: int = SHARD_ENTRIES,
                    batch_size: int = 32, n_texts: int = 2_000, seed: int = 0, legacy: bool = False,
                    threads: int | None = None) -> dict:
    """Write, verify and read a cache of `n_images` synthetic demo-shaped latents; returns the figures.
    `threads`: torch's intra-op threads for the run (default: as set)."""
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(folder) if folder is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        r = {"images": n_images, "texts": n_texts, "latent_shape": list(LATENT), "text_shape": list(TEXT),
             "shard_entries": shard_entries, "batch_size": batch_size, "torch_threads": torch.get_num_threads()}

        # write: what write_cache does after each encoder call (one store entry per image)
        keys = [f"scaled|/img/{i:06d}.png|0" for i in range(n_images)]
        r["rss_before_mb"] = _rss_mb()
        spent = 0.0
        with PeakMemory() as mem:
            lat = ShardStore(root / "latents-bench-72", write=True, shard_entries=shard_entries)
            for i in range(0, n_images, CHUNK):
                block = _block(seed, i, min(CHUNK, n_images - i), LATENT)
                t0 = time.perf_counter()
                for k, a in zip(keys[i:i + CHUNK], block):
                    lat.add(k, a)
                spent += time.perf_counter() - t0
            t0 = time.perf_counter()
            lat.flush()
            spent += time.perf_counter() - t0
        r.update(write_s=spent, write_images_per_s=n_images / spent, write_peak_rss_mb=mem.rss_mb,
                 shards=len(lat.shards), cache_mb=sum(s["bytes"] for s in lat.shards.values()) / 2**20)

        txt = ShardStore(root / "text-bench", write=True, shard_entries=shard_entries)
        texts = [f"sentence {i}" for i in range(n_texts)]
        for i in range(0, n_texts, CHUNK):
            for t, a in zip(texts[i:i + CHUNK], _block(seed + 1, i, min(CHUNK, n_texts - i), TEXT)):
                txt.add(t, a)
        txt.flush()
        n_rows = n_images // 2  # row j: target image 2j, prior image 2j + 1
        g = torch.Generator().manual_seed(seed)
        text_idx = torch.randint(0, n_texts, (n_rows, 2), generator=g)
        path = write_dataset(root / "dataset-bench.safetensors", lat, txt, keys[0::2][:n_rows], keys[1::2][:n_rows],
                             None, texts, text_idx, 0, margin=1, skipped=0)

        # verify: a resumed or repeated build first checks every shard against its sha256
        t0 = time.perf_counter()
        ShardStore(root / "latents-bench-72", write=True, shard_entries=shard_entries)
        r["verify_s"] = time.perf_counter() - t0
        r["verify_images_per_s"] = n_images / r["verify_s"]

        # read: one epoch of augmented batches, as the training loop asks for them
        del lat, txt
        r["read_rss_before_mb"], r["read_rss_anon_before_mb"] = _rss_mb(), _status_mb("RssAnon")
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            data = open_cache(path)
            perm = torch.randperm(n_rows, generator=g)
            for i in range(0, n_rows, batch_size):
                b = data.batch(perm[i:i + batch_size], g, hflip=True, device="cpu")
            r["read_s"] = time.perf_counter() - t0
            r["read_rss_anon_mb"], r["read_rss_file_mb"] = _status_mb("RssAnon"), _status_mb("RssFile")
        r.update(read_images_per_s=2 * n_rows / r["read_s"], read_rows_per_s=n_rows / r["read_s"],
                 read_peak_rss_mb=mem.rss_mb)
        assert b["target"].shape == (len(perm[i:i + batch_size]), LATENT[1], LATENT[2] - 2, LATENT[3] - 2)
        for j in np.random.default_rng(seed).integers(0, n_rows, 8).tolist():  # read back what was written
            k = 2 * j + 1
            c = k // CHUNK * CHUNK
            want = _block(seed, c, min(CHUNK, n_images - c), LATENT)[k - c]
            if not np.array_equal(data.prior[j].numpy(), want):
                raise AssertionError(f"cache benchmark: row {j}'s prior does not read back as written")

        if legacy:
            r.update(_legacy(root / "legacy.pt", n_images, seed))
        return r


def _legacy(file: Path, n_images: int, seed: int) -> dict:
    """The cache this replaced: a dict of tensors in RAM, torch.save'd whole every CHUNK images."""
    r = {"legacy_rss_before_mb": _rss_mb()}
    cache, spent = {}, 0.0
    with PeakMemory() as mem:
        for i in range(0, n_images, CHUNK):
            block = torch.from_numpy(_block(seed, i, min(CHUNK, n_images - i), LATENT))
            t0 = time.perf_counter()
            for j, z in enumerate(block):
                cache[f"/img/{i + j:06d}.png|0"] = z.clone()
            atomic_torch_save(file, cache)
            spent += time.perf_counter() - t0
    r.update(legacy_write_s=spent, legacy_write_images_per_s=n_images / spent, legacy_write_peak_rss_mb=mem.rss_mb)
    del cache
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        loaded = torch.load(file, map_location="cpu", weights_only=True)
        stacked = torch.stack(list(loaded.values()))  # the old build_cache stacked every row in RAM
        r["legacy_load_s"] = time.perf_counter() - t0
    r["legacy_load_peak_rss_mb"] = mem.rss_mb
    del loaded, stacked
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--texts", type=int, default=2_000)
    ap.add_argument("--shard-entries", type=int, default=SHARD_ENTRIES)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--folder", default=None, help="where to write (default: a temporary folder, removed after)")
    ap.add_argument("--legacy", action="store_true", help="also time the in-RAM dict cache it replaced")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: as set)")
    a = ap.parse_args(argv)
    r = cache_benchmark(a.images, a.folder, a.shard_entries, a.batch, a.texts, legacy=a.legacy, threads=a.threads)
    print(f"latent cache, {r['images']} synthetic demo-shaped images ({'x'.join(map(str, LATENT))} fp16), "
          f"{r['shards']} shards of <= {r['shard_entries']}, {r['cache_mb']:.1f} MiB, "
          f"{r['torch_threads']} torch thread(s)")
    print(f"  write : {r['write_images_per_s']:,.0f} images/s ({r['write_s']:.2f} s), "
          f"peak RSS {r['write_peak_rss_mb']:.0f} MiB (process held {r['rss_before_mb']:.0f} MiB before)")
    print(f"  verify: {r['verify_images_per_s']:,.0f} images/s ({r['verify_s']:.2f} s, sha256 of every shard)")
    print(f"  read  : {r['read_images_per_s']:,.0f} images/s ({r['read_rows_per_s']:,.0f} rows/s of target + prior "
          f"+ text, batch {r['batch_size']}, {r['read_s']:.2f} s), peak RSS {r['read_peak_rss_mb']:.0f} MiB "
          f"(before {r['read_rss_before_mb']:.0f}; anonymous {r['read_rss_anon_before_mb']:.0f} before, "
          f"{r['read_rss_anon_mb']:.0f} after; file-backed after {r['read_rss_file_mb']:.0f} MiB)")
    if "legacy_write_s" in r:
        print(f"  replaced in-RAM dict: write {r['legacy_write_images_per_s']:,.0f} images/s "
              f"({r['legacy_write_s']:.1f} s), peak RSS {r['legacy_write_peak_rss_mb']:.0f} MiB; load "
              f"{r['legacy_load_s']:.2f} s, peak RSS {r['legacy_load_peak_rss_mb']:.0f} MiB")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, sort_keys=True))
    return r


if __name__ == "__main__":
    main()
