"""The on-disk cache of frozen-encoder outputs that training reads (paper §5.1; DESIGN "The model").

The VAE and the text tower are frozen, so each image is encoded once (at image_size + 2 x margin x
VAE factor px, in both orientations, for crop and flip augmentation in latent space) and each sentence
once (as written and with left/right swapped, the sentence of a flipped sample). Cache files are keyed
by a fingerprint of the encoder's weights, filled in chunks and saved atomically after each chunk, so
an interrupted encoding resumes and a second stage reusing the same images costs nothing.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from bmjlib.io import ImageError, atomic_torch_save, read_image
from bmjlib.model.pipeline import DUMMY_PRIOR_VALUE, to_batch

CHUNK = 256
_LR = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


def swap_laterality(text: str) -> str:
    """'new left effusion, right stable' -> 'new right effusion, left stable' (the sentence of a mirrored image)."""
    return _LR.sub(lambda m: _SWAP[m.group(0)], text)


def module_fingerprint(module) -> str:
    """sha256 over a module's floating-point state (names, shapes, bytes): the identity of frozen weights."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged cache file is rebuilt, never trusted
        print(f"cache file {path.name} unreadable ({e}); rebuilding it")
        return {}


def _save(path: Path, obj: dict) -> None:
    atomic_torch_save(path, obj)


@dataclass
class CachedData:
    """Training examples as cached latents. prior/target: N,2,C,H',W' (orientation 0 = as is, 1 = flipped;
    `prior` None means the one dummy latent `dummy` 2,C,H',W'), text_idx: N,2 into text_states U,L,D."""
    target: torch.Tensor
    prior: torch.Tensor | None
    dummy: torch.Tensor | None
    text_idx: torch.Tensor
    text_states: torch.Tensor
    null_states: torch.Tensor
    margin: int
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.target)

    def batch(self, idx: torch.Tensor, g: torch.Generator, hflip: bool, device) -> dict:
        """One augmented batch: the same flip and crop offset for a sample's prior and target."""
        n, m = len(idx), self.margin
        flip = (torch.rand(n, generator=g) < 0.5).long() if hflip else torch.zeros(n, dtype=torch.long)
        off = torch.randint(0, 2 * m + 1, (n, 2), generator=g)
        h, w = self.target.shape[-2] - 2 * m, self.target.shape[-1] - 2 * m
        tg, pr = [], []
        for i, f, (oy, ox) in zip(idx.tolist(), flip.tolist(), off.tolist()):
            tg.append(self.target[i, f, :, oy:oy + h, ox:ox + w])
            src = self.dummy[f] if self.prior is None else self.prior[i, f]
            pr.append(src[:, oy:oy + h, ox:ox + w])
        text = self.text_states[self.text_idx[idx, flip]]
        return {"target": torch.stack(tg).float().to(device), "prior": torch.stack(pr).float().to(device),
                "text": text.float().to(device)}


def encode_paths(pipe, paths: list[str], size: int, cache_file: Path, progress: bool = True) -> tuple[dict, list]:
    """Latents (2,C,h,w fp16: as is, flipped) for each readable path, from/into the cache file.
    Returns (cache dict keyed by 'path|mtime_ns', unreadable [(path, problem)])."""
    cache = _load(cache_file)
    keys = {p: f"{p}|{os.stat(p).st_mtime_ns}" if os.path.exists(p) else None for p in dict.fromkeys(paths)}
    bad = [(p, "file not found") for p, k in keys.items() if k is None]
    todo = [p for p, k in keys.items() if k is not None and k not in cache]
    bar = tqdm(total=len(todo), desc="encode latents", unit="img", disable=not progress or not todo)
    for i in range(0, len(todo), CHUNK):
        imgs, ok = [], []
        for p in todo[i:i + CHUNK]:
            try:
                imgs.append(to_batch(read_image(p), size))
                ok.append(p)
            except ImageError as e:
                bad.append((p, e.problem))
        if imgs:
            x = torch.cat(imgs)
            z = torch.stack([pipe.encode_images(x), pipe.encode_images(torch.flip(x, dims=[-1]))], 1)
            for p, zi in zip(ok, z.half()):
                cache[keys[p]] = zi.clone()
            _save(cache_file, cache)
        bar.update(len(todo[i:i + CHUNK]))
    bar.close()
    return {p: cache[k] for p, k in keys.items() if k is not None and k in cache}, bad


def build_cache(pipe, rows: pd.DataFrame, cache_dir: Path, image_size: int, margin: int,
                dummy_prior: bool, progress: bool = True) -> CachedData:
    """Encode (or read from the cache) every image and sentence of `rows` (prior_path, target_path, text).
    Rows with an unreadable image are skipped and counted (printed), never filled with zeros."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    f = pipe.latent_factor
    size = image_size + 2 * margin * f
    vae_fp = module_fingerprint(pipe.vae)[:16]
    lat_file = cache_dir / f"latents-{vae_fp}-{size}.pt"
    paths = list(rows["target_path"]) + ([] if dummy_prior else list(rows["prior_path"]))
    lat, bad = encode_paths(pipe, paths, size, lat_file, progress)
    if bad:
        print(f"{len(bad)} unreadable image(s) skipped, e.g. {bad[0][0]}: {bad[0][1]}")
    keep = rows["target_path"].isin(lat) & (dummy_prior | rows["prior_path"].isin(lat))
    skipped = int((~keep).sum())
    rows = rows[keep].reset_index(drop=True)
    if rows.empty:
        raise ValueError("no training example has readable images")

    te_fp = module_fingerprint(pipe.text_encoder.model)[:16]
    txt_file = cache_dir / f"text-{te_fp}.pt"
    txt = _load(txt_file)
    texts = list(dict.fromkeys([pipe.null_prompt] + list(rows["text"]) + [swap_laterality(t) for t in rows["text"]]))
    todo = [t for t in texts if t not in txt]
    for i in range(0, len(todo), 512):
        chunk = todo[i:i + 512]
        for t, s in zip(chunk, pipe.text_states(chunk)):
            txt[t] = s.half().clone()
        pipe._text_cache.clear()
        _save(txt_file, txt)
    index = {t: i for i, t in enumerate(texts)}
    text_states = torch.stack([txt[t] for t in texts])
    text_idx = torch.tensor([[index[t], index[swap_laterality(t)]] for t in rows["text"]], dtype=torch.long)

    target = torch.stack([lat[p] for p in rows["target_path"]])
    prior = dummy = None
    if dummy_prior:
        d = torch.full((1, 1, size, size), DUMMY_PRIOR_VALUE)
        dummy = torch.cat([pipe.encode_images(d), pipe.encode_images(d)]).half()
    else:
        prior = torch.stack([lat[p] for p in rows["prior_path"]])
    return CachedData(target, prior, dummy, text_idx, text_states, text_states[index[pipe.null_prompt]][None],
                      margin, skipped)
