"""The on-disk cache of frozen-encoder outputs that training reads (paper §5.1; DESIGN "The model").

The VAE and the text tower are frozen, so each image is encoded once (at image_size + 2 x margin x
VAE factor px, in both orientations, for crop and flip augmentation in latent space) and each sentence
once (as written and with left/right swapped, the sentence of a flipped sample). Latents follow
InstructPix2Pix: a target image's latent is the posterior mode x the VAE's scaling_factor, a prior
image's the posterior mode as is (scaled too for a model saved before that convention,
`BiomedJourneyPipeline.prior_latents`).

On disk, in the cache folder:
- `latents-<VAE encoder fingerprint>-<code>-<px>/`: a `ShardStore` of fp16 latents 2,C,h,w (as is, mirrored),
  keyed by kind ("scaled" / "mode"), path and the file's mtime, so a changed image is encoded again;
- `text-<text encoder fingerprint>-<code>/`: a `ShardStore` of fp16 token states L,D keyed by sentence;
  `<code>` is this module's code with all it imports from the package (reading, exposure matching, encoding),
  so a change to how images are read or encoded encodes them again;
- `dataset-<key>.safetensors`: one training set (key: rows, both fingerprints, size, margin, prior kind):
  where each row's target, prior and two sentences are in the stores, the rows skipped, the dummy prior.
A store is append-only: .npy shards of up to SHARD_ENTRIES entries (their keys in a JSON file beside
each) and a manifest.json holding every shard's sha256, so stage 2 reuses stage 1's entries, a killed
build keeps every complete shard, and a torn shard is found by its sha256 and encoded again. One
process writes (`write_cache`); then every process opens the same files read-only (`open_cache`):
shards are memory-mapped and read row by row, never held whole in RAM.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from bmjlib.io import (ImageError, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text,
                       code_fingerprint_of, fingerprint, read_image, sha256_bytes, sha256_file)
from bmjlib.data.registration import read_matched
from bmjlib.model.pipeline import DUMMY_PRIOR_VALUE, to_batch

CHUNK = 256
# A mirrored radiograph shows the patient's left where the right was, so its sentence swaps every word that
# states a side: left/right, leftward(s)/rightward(s), Lt/Rt, R/L ("R pleural effusion", "L base"), lobe
# and line abbreviations (RLL/LLL, RUL/LUL, RML/LML, RIJ/LIJ, RUQ/LUQ, RLQ/LLQ), dextro-/levo-
# (dextroconvex, levoscoliosis), and the lingula with the middle lobe, its counterpart in the other lung
# ("right middle lobe" <-> "left lingula"). Side-free words (bilateral, bibasilar) stay, and so does
# "retrocardiac": the heart is mirrored with the lungs. Words swap in lower, Capitalised and UPPER case
# only (other spellings stay as written), so swapping twice gives the text back.
_SIDE_PAIRS = [("left", "right"), ("leftward", "rightward"), ("leftwards", "rightwards"), ("lt", "rt"),
               ("lingula", "middle lobe"), ("lingular", "middle-lobe")]
_SIDE_CODES = [("L", "R"), ("LLL", "RLL"), ("LUL", "RUL"), ("LML", "RML"), ("LIJ", "RIJ"), ("LUQ", "RUQ"),
               ("LLQ", "RLQ")]
_SWAP = {}
for _a, _b in _SIDE_PAIRS + [("levo", "dextro")]:
    for _x, _y in ((_a, _b), (_a.capitalize(), _b.capitalize()), (_a.upper(), _b.upper())):
        _SWAP[_x], _SWAP[_y] = _y, _x
for _a, _b in _SIDE_CODES:
    _SWAP[_a], _SWAP[_b] = _b, _a
_WORDS = sorted((w for w in _SWAP if len(w) > 1 and w.lower() not in ("levo", "dextro")), key=len, reverse=True)
_LR = re.compile(
    r"\b(?:" + "|".join(map(re.escape, _WORDS)) + r")\b"
    # a lone R or L, not "R/O" (rule out), "2 L" (litres) or "L-spine"
    r"|(?<![\w/])(?<!\d )[LR](?![\w/]|-?\s?spine)"
    r"|\b(?:levo|Levo|LEVO|dextro|Dextro|DEXTRO)(?=-?(?i:convex|scolio|curv|rotat|position|cardia|version|deviat))")


def swap_laterality(text: str) -> str:
    """'new left effusion, R PTX stable' -> 'new right effusion, L PTX stable' (the sentence of a mirrored image)."""
    if not isinstance(text, str):
        raise TypeError(f"swap_laterality expects a sentence (str), got {type(text).__name__}")
    return _LR.sub(lambda m: _SWAP[m.group(0)], text)


def module_fingerprint(module) -> str:
    """sha256 over a module's floating-point state (names, shapes, bytes): the identity of frozen weights."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encoder_fingerprint(vae) -> str:
    """The identity of what a VAE's latents depend on: its encoder, quant conv and scaling factor. The decoder is
    left out: a decoder fine-tuned alone keeps the latent cache and every UNet trained on it."""
    parts = [module_fingerprint(vae.encoder)]
    if getattr(vae, "quant_conv", None) is not None:
        parts.append(module_fingerprint(vae.quant_conv))
    parts.append(json.dumps({k: vae.config.get(k) for k in ("scaling_factor", "shift_factor", "latent_channels")},
                            sort_keys=True))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


STORE_FORMAT = "bmj-shard-store/1"
DATASET_FORMAT = "bmj-latent-dataset/1"
MANIFEST = "manifest.json"
SHARD_ENTRIES = 4096          # entries per shard; fewer when entries are large (SHARD_BYTES)
SHARD_BYTES = 256 * 2**20
TEXT_CHUNK = 512
_SHARD = re.compile(r"shard-(\d{5,})\.npy")


class CacheError(ValueError):
    """A cache file that cannot be used; the message names the file and the problem."""


class ShardStore:
    """Equal-shaped float16 arrays keyed by strings, append-only: `shard-NNNNN.npy` (entries x shape) with
    its keys in `shard-NNNNN.keys.json`, and `manifest.json` ({format, shape, shards: [{file, sha256,
    bytes, count, keys_sha256}]}). Readers load the manifest only; the keys are read when looked up.

    `write=True` (one process at a time): each shard the manifest lists is checked against its sha256
    (data and keys); a missing, torn or altered one is dropped (its entries are missing again, so they are
    encoded again), and shard or temporary files the manifest does not list (left by a killed writer) are
    deleted. `add` buffers entries; each full shard is written atomically, then the manifest, so a killed
    writer keeps every complete shard; `flush` writes the last, partial one. `write=False`: shards are
    memory-mapped on first read, and one whose size is not the manifest's is refused.
    """

    def __init__(self, folder: str | os.PathLike, write: bool = False, shard_entries: int = SHARD_ENTRIES):
        self.folder = Path(folder)
        self.writable = write
        self.shard_entries = int(shard_entries)
        self.shape: tuple[int, ...] | None = None
        self.shards: dict[int, dict] = {}
        self._index: dict[str, tuple[int, int]] | None = None
        self._buffer: list[tuple[str, np.ndarray]] = []
        self._pending: set[str] = set()
        self._maps: dict[int, np.ndarray] = {}
        man = self.folder / MANIFEST
        if write:
            self.folder.mkdir(parents=True, exist_ok=True)
        elif not man.is_file():
            raise CacheError(f"{man}: missing (nothing was cached here; write the cache first)")
        if man.is_file():
            try:
                m = json.loads(man.read_text())
                if m.get("format") != STORE_FORMAT:
                    raise ValueError(f"format {m.get('format')!r}, expected {STORE_FORMAT!r}")
                self.shape = tuple(m["shape"]) if m["shape"] is not None else None
                self.shards = {int(_SHARD.fullmatch(s["file"]).group(1)): s for s in m["shards"]}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                if not write:
                    raise CacheError(f"{man}: unreadable ({e})") from None
                print(f"cache manifest {man} unreadable ({e}); the store is written again")
                self.shape, self.shards = None, {}
        if write:
            self._check()

    @staticmethod
    def _keys_file(name: str) -> str:
        return name[:-len(".npy")] + ".keys.json"

    def _check(self) -> None:
        dropped = False
        for i, s in sorted(self.shards.items()):
            f, kf = self.folder / s["file"], self.folder / self._keys_file(s["file"])
            problem = ("is missing" if not f.is_file() or not kf.is_file() else
                       "does not match its recorded sha256" if f.stat().st_size != s["bytes"]
                       or sha256_file(f) != s["sha256"] or sha256_file(kf) != s["keys_sha256"] else None)
            if problem:
                print(f"cache shard {self.folder.name}/{s['file']} {problem}; its {s['count']} entries are "
                      "encoded again")
                f.unlink(missing_ok=True)
                kf.unlink(missing_ok=True)
                del self.shards[i]
                dropped = True
        listed = {n for s in self.shards.values() for n in (s["file"], self._keys_file(s["file"]))}
        for f in self.folder.iterdir():  # a shard finished after the last manifest, or a temporary file
            if f.is_file() and f.name not in listed and f.name.startswith(("shard-", ".")):
                f.unlink()
        if dropped:
            self._write_manifest()
        if not self.shards:
            self.shape = None  # an empty store takes the shape of what is added next

    def _write_manifest(self) -> None:
        atomic_write_json(self.folder / MANIFEST, {
            "format": STORE_FORMAT, "shape": list(self.shape) if self.shape else None,
            "shards": [self.shards[i] for i in sorted(self.shards)]})

    @property
    def index(self) -> dict[str, tuple[int, int]]:
        """key -> (shard, row), read from the shards' key files on first use."""
        if self._index is None:
            idx = {}
            for i, s in sorted(self.shards.items()):
                kf = self.folder / self._keys_file(s["file"])
                try:
                    keys = json.loads(kf.read_text())
                except (OSError, ValueError) as e:
                    raise CacheError(f"{kf}: unreadable ({e}); write the cache again") from None
                idx.update({k: (i, j) for j, k in enumerate(keys)})
            self._index = idx
        return self._index

    def __len__(self) -> int:
        return sum(s["count"] for s in self.shards.values())

    def __contains__(self, key: str) -> bool:
        return key in self.index

    @property
    def capacity(self) -> int:
        """Entries per shard."""
        return max(1, min(self.shard_entries, SHARD_BYTES // (2 * math.prod(self.shape))))

    def add(self, key: str, value) -> None:
        """Buffer one entry (cast to float16); an entry already stored or buffered is kept as it is."""
        if not self.writable:
            raise CacheError(f"{self.folder}: opened read-only")
        a = np.ascontiguousarray(value, dtype=np.float16)
        if self.shape is None:
            self.shape = a.shape
        if a.shape != self.shape:
            raise CacheError(f"{self.folder}: entry {key!r} has shape {a.shape}, the store holds {self.shape}")
        if key in self.index or key in self._pending:
            return
        self._buffer.append((key, a))
        self._pending.add(key)
        if len(self._buffer) >= self.capacity:
            self.flush()

    def flush(self) -> None:
        """Write the buffered entries as one shard (data and keys, each atomically), then the manifest."""
        if not self._buffer:
            return
        n = max(self.shards, default=-1) + 1
        name = f"shard-{n:05d}.npy"
        keys = [k for k, _ in self._buffer]
        buf = io.BytesIO()
        np.save(buf, np.stack([a for _, a in self._buffer]), allow_pickle=False)
        data = buf.getbuffer()
        atomic_write_bytes(self.folder / name, data)
        kf = atomic_write_text(self.folder / self._keys_file(name), json.dumps(keys))
        self.shards[n] = {"file": name, "sha256": sha256_bytes(data), "bytes": len(data), "count": len(keys),
                          "keys_sha256": sha256_file(kf)}
        self._write_manifest()
        self.index.update({k: (n, j) for j, k in enumerate(keys)})
        self._buffer, self._pending = [], set()

    def rows(self, shard: int) -> np.ndarray:
        """One shard, memory-mapped read-only (entries x shape; a plain ndarray view of the np.memmap)."""
        m = self._maps.get(shard)
        if m is None:
            s = self.shards.get(shard)
            if s is None:
                raise CacheError(f"{self.folder}: has no shard {shard:05d} (the cache changed; write it again)")
            f = self.folder / s["file"]
            if not f.is_file() or f.stat().st_size != s["bytes"]:
                raise CacheError(f"{f}: missing or not the size its manifest records (torn); write the cache again")
            m = self._maps[shard] = np.asarray(np.load(f, mmap_mode="r", allow_pickle=False))
        return m

    def get(self, key: str) -> np.ndarray:
        i, j = self.index[key]
        return self.rows(i)[j]

    def __getstate__(self) -> dict:  # memory maps are not pickled: a worker process maps the files itself
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state


class _Rows:
    """Latents of a training set's rows, read on access: `.shape` N,2,C,h,w; `[i]` -> float16 2,C,h,w."""

    def __init__(self, store: ShardStore, loc: np.ndarray):
        self.store, self.loc = store, loc

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.loc),) + tuple(self.store.shape))

    def __len__(self) -> int:
        return len(self.loc)

    def __getitem__(self, i: int) -> torch.Tensor:
        s, r = self.loc[i]
        return torch.from_numpy(np.array(self.store.rows(s)[r]))


class CachedData:
    """A training set in the cache, read lazily from memory-mapped shards (`open_cache`).

    `len()`; `batch(idx, g, hflip, device)` -> {target, prior, text} float32; `null_states` 1,L,D (the empty
    prompt's token states); `target` / `prior` row views (`prior` None with the dummy prior, whose one
    latent is `dummy` 2,C,h,w); `margin`; `skipped` (rows left out for an unreadable image).
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise CacheError(f"{path}: no such cache file (write_cache writes it, on one process, first)")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["bmj"])
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - any unreadable file is refused with its name
            raise CacheError(f"{path}: unreadable cache file ({type(e).__name__}: {e})") from None
        if meta.get("format") != DATASET_FORMAT:
            raise CacheError(f"{path}: format {meta.get('format')!r}, expected {DATASET_FORMAT!r}")
        self.path = path
        self.latents = ShardStore(path.parent / meta["latents"])
        self.texts = ShardStore(path.parent / meta["text"])
        for store, name in ((self.latents, "latents"), (self.texts, "text")):
            for i, sha in meta["shards"][name].items():
                if store.shards.get(int(i), {}).get("sha256") != sha:
                    raise CacheError(f"{path}: {store.folder.name}/shard-{int(i):05d}.npy changed after this file "
                                     "was written; write the cache again")
        # (shard, row) of each row's target / prior and of each sentence, as numpy for cheap per-sample lookups
        self.target_loc = t["target"].numpy()
        self.prior_loc = None if "prior" not in t else t["prior"].numpy()
        self.text_loc, self.text_idx = t["text_loc"].numpy(), t["text_idx"]
        self.dummy = t.get("dummy")
        self.margin, self.skipped = int(meta["margin"]), int(meta["skipped"])
        self.null_states = self._text([int(meta["null"])])

    def __len__(self) -> int:
        return len(self.target_loc)

    @property
    def target(self) -> _Rows:
        return _Rows(self.latents, self.target_loc)

    @property
    def prior(self) -> _Rows | None:
        return None if self.prior_loc is None else _Rows(self.latents, self.prior_loc)

    def _text(self, ids) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.texts.rows(s)[r] for s, r in self.text_loc[ids].tolist()]))

    def batch(self, idx: torch.Tensor, g: torch.Generator, hflip: bool, device) -> dict:
        """One augmented batch: the same flip and crop offset for a sample's prior and target."""
        n, m = len(idx), self.margin
        flip = (torch.rand(n, generator=g) < 0.5).long() if hflip else torch.zeros(n, dtype=torch.long)
        off = torch.randint(0, 2 * m + 1, (n, 2), generator=g)
        h, w = self.latents.shape[-2] - 2 * m, self.latents.shape[-1] - 2 * m
        dummy = None if self.dummy is None else self.dummy.numpy()
        tg, pr = [], []
        rows = self.latents.rows
        for i, f, (oy, ox) in zip(idx.tolist(), flip.tolist(), off.tolist()):
            s, r = self.target_loc[i]
            tg.append(rows(s)[r, f, :, oy:oy + h, ox:ox + w])
            if dummy is not None:
                pr.append(dummy[f, :, oy:oy + h, ox:ox + w])
            else:
                s, r = self.prior_loc[i]
                pr.append(rows(s)[r, f, :, oy:oy + h, ox:ox + w])
        text = self._text(self.text_idx[idx, flip].numpy())
        # float16 travels to the device and becomes float32 there (exact, so the same values either way)
        return {"target": torch.from_numpy(np.stack(tg)).to(device).float(),
                "prior": torch.from_numpy(np.stack(pr)).to(device).float(), "text": text.to(device).float()}


def open_cache(path: str | os.PathLike) -> CachedData:
    """Open a training set written by `write_cache` (any process, any number of times; read-only)."""
    return CachedData(path)


def _layout(pipe, rows: pd.DataFrame, cache_dir: Path, image_size: int, margin: int, dummy_prior: bool,
            match_targets: bool = False) -> dict:
    """Where a training set lives: its stores (named by encoder fingerprints, code and px) and its dataset file."""
    size = image_size + 2 * margin * pipe.latent_factor
    code = code_fingerprint_of(__name__)[:8]  # how images are read, matched and encoded, sentences embedded
    lat = Path(cache_dir) / f"latents-{encoder_fingerprint(pipe.vae)[:16]}-{code}-{size}"
    txt = Path(cache_dir) / f"text-{module_fingerprint(pipe.text_encoder.model)[:16]}-{code}"
    prior_kind = "scaled" if pipe.prior_latents == "scaled" else "mode"
    key = fingerprint(DATASET_FORMAT, lat.name, txt.name, int(margin), bool(dummy_prior), prior_kind,
                      pipe.null_prompt, {c: [str(v) for v in rows[c]] for c in ("prior_path", "target_path", "text")},
                      *(("matched-targets-in-field",) if match_targets and not dummy_prior else ()))
    return {"size": size, "latents": lat, "text": txt, "prior_kind": prior_kind,
            "dataset": Path(cache_dir) / f"dataset-{key[:16]}.safetensors"}


def cache_path(pipe, rows: pd.DataFrame, cache_dir: str | os.PathLike, image_size: int, margin: int,
               dummy_prior: bool, match_targets: bool = False) -> Path:
    """The dataset file `write_cache` writes for these arguments (computed, nothing read or written)."""
    return _layout(pipe, rows, Path(cache_dir), image_size, margin, dummy_prior, match_targets)["dataset"]


def write_dataset(path: str | os.PathLike, latents: ShardStore, texts: ShardStore, target: list[str],
                  prior: list[str] | None, dummy: torch.Tensor | None, text_keys: list[str],
                  text_idx: torch.Tensor, null: int, margin: int, skipped: int) -> Path:
    """Write a dataset file (atomically): rows' target / prior keys in `latents`, the unique sentences'
    keys in `texts`, text_idx N,2 (as written, mirrored) into them, `null` the empty prompt's position."""
    def loc(store, keys):
        return torch.tensor([store.index[k] for k in keys], dtype=torch.long).reshape(-1, 2)
    tensors = {"target": loc(latents, target), "text_loc": loc(texts, text_keys),
               "text_idx": torch.as_tensor(text_idx, dtype=torch.long).contiguous()}
    if prior is not None:
        tensors["prior"] = loc(latents, prior)
    if dummy is not None:
        tensors["dummy"] = dummy.half().contiguous()
    used = {}  # the shards it reads and their sha256: a reader refuses a store changed since
    for name, store, keys in (("latents", latents, ("target", "prior")), ("text", texts, ("text_loc",))):
        ids = sorted({i for k in keys if k in tensors for i in tensors[k][:, 0].tolist()})
        used[name] = {str(i): store.shards[i]["sha256"] for i in ids}
    meta = {"format": DATASET_FORMAT, "latents": latents.folder.name, "text": texts.folder.name,
            "margin": int(margin), "skipped": int(skipped), "null": int(null), "rows": len(target), "shards": used}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"bmj": json.dumps(meta, sort_keys=True)})
    return Path(path)


def write_cache(pipe, rows: pd.DataFrame, cache_dir: str | os.PathLike, image_size: int, margin: int,
                dummy_prior: bool, progress: bool = True, shard_entries: int = SHARD_ENTRIES,
                match_targets: bool = False) -> Path:
    """Encode what the cache lacks for `rows` (prior_path, target_path, text) and write the training set's
    dataset file; returns its path (= `cache_path(...)`). `match_targets`: each target is read with its
    exposure fitted to its row's prior (`registration.read_matched`), cached under that pair. For ONE process
    (the main one); the others open the path once it returns. Rows with an unreadable image are skipped and
    counted (printed), never filled with zeros."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    match_targets = match_targets and not dummy_prior
    lay = _layout(pipe, rows, cache_dir, image_size, margin, dummy_prior, match_targets)
    size, prior_kind = lay["size"], lay["prior_kind"]
    lat = ShardStore(lay["latents"], write=True, shard_entries=shard_entries)
    kinds: dict[str, set[str]] = {}  # path -> the latents it needs: "scaled" (target), "mode" (IP2P prior)
    for p in [] if match_targets else rows["target_path"]:
        kinds.setdefault(p, set()).add("scaled")
    for p in [] if dummy_prior else rows["prior_path"]:
        kinds.setdefault(p, set()).add(prior_kind)
    stamp = {p: f"{p}|{os.stat(p).st_mtime_ns}" for p in kinds if os.path.exists(p)}
    bad = [(p, "file not found") for p in kinds if p not in stamp]
    todo = [p for p in stamp if any(f"{k}|{stamp[p]}" not in lat for k in kinds[p])]
    sf = pipe.vae.config.scaling_factor
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
            z = torch.stack([pipe.encode_images(x, scaled=False),
                             pipe.encode_images(torch.flip(x, dims=[-1]), scaled=False)], 1)
            variants = {"mode": z, "scaled": z * sf}
            for j, p in enumerate(ok):
                for k in sorted(kinds[p]):
                    lat.add(f"{k}|{stamp[p]}", variants[k][j].half().numpy())
        bar.update(len(todo[i:i + CHUNK]))
    bar.close()
    target_keys = [f"scaled|{stamp.get(p)}" for p in rows["target_path"]]
    if match_targets:
        for p in rows["target_path"]:
            if os.path.exists(p):
                stamp.setdefault(p, f"{p}|{os.stat(p).st_mtime_ns}")
        target_keys = [f"matched-in-field|{stamp.get(pr)}|{stamp.get(t)}" for t, pr in zip(rows["target_path"], rows["prior_path"])]
        pending = [(k, t, pr) for k, t, pr in dict.fromkeys(zip(target_keys, rows["target_path"], rows["prior_path"]))
                   if k not in lat and t in stamp and pr in stamp]
        for i in tqdm(range(0, len(pending), CHUNK), desc="encode matched targets", unit="chunk",
                      disable=not progress or not pending):
            imgs, ok = [], []
            for k, t, pr in pending[i:i + CHUNK]:
                try:
                    imgs.append(to_batch(read_matched(t, pr), size))
                    ok.append(k)
                except ImageError as e:
                    bad.append((t, e.problem))
            if imgs:
                x = torch.cat(imgs)
                z = torch.stack([pipe.encode_images(x), pipe.encode_images(torch.flip(x, dims=[-1]))], 1)
                for k, zi in zip(ok, z):
                    lat.add(k, zi.half().numpy())
    lat.flush()
    if bad:
        print(f"{len(bad)} unreadable image(s) skipped, e.g. {bad[0][0]}: {bad[0][1]}")

    def cached(kind):
        return lambda p: p in stamp and f"{kind}|{stamp[p]}" in lat
    keep = pd.Series([k in lat for k in target_keys], index=rows.index)
    if not dummy_prior:
        keep &= rows["prior_path"].map(cached(prior_kind))
    skipped = int((~keep).sum())
    rows = rows[keep].reset_index(drop=True)
    target_keys = [k for k, ok in zip(target_keys, keep) if ok]
    if rows.empty:
        raise ValueError("no training example has readable images")

    txt = ShardStore(lay["text"], write=True, shard_entries=shard_entries)
    texts = list(dict.fromkeys([pipe.null_prompt] + list(rows["text"]) + [swap_laterality(t) for t in rows["text"]]))
    todo = [t for t in texts if t not in txt]
    for i in range(0, len(todo), TEXT_CHUNK):
        chunk = todo[i:i + TEXT_CHUNK]
        for t, s in zip(chunk, pipe.text_states(chunk)):
            txt.add(t, s.half().numpy())
        pipe._text_cache.clear()
    txt.flush()
    pos = {t: i for i, t in enumerate(texts)}
    text_idx = torch.tensor([[pos[t], pos[swap_laterality(t)]] for t in rows["text"]], dtype=torch.long)
    dummy = None
    if dummy_prior:
        d = pipe.encode_images(torch.full((1, 1, size, size), DUMMY_PRIOR_VALUE), scaled=prior_kind == "scaled")
        dummy = torch.cat([d, d])
    return write_dataset(lay["dataset"], lat, txt, target_keys,
                         None if dummy_prior else [f"{prior_kind}|{stamp[p]}" for p in rows["prior_path"]],
                         dummy, texts, text_idx, pos[pipe.null_prompt], margin, skipped)


def build_cache(pipe, rows: pd.DataFrame, cache_dir: str | os.PathLike, image_size: int, margin: int,
                dummy_prior: bool, progress: bool = True, write: bool = True,
                shard_entries: int = SHARD_ENTRIES, match_targets: bool = False) -> CachedData:
    """Encode (or find in the cache) every image and sentence of `rows` (prior_path, target_path, text) and
    open the training set. Several processes: the main one calls this (or `write_cache`); the others, once
    it has returned, call it with `write=False`, which only opens the files (CacheError naming the file
    when they are not there)."""
    path = (write_cache(pipe, rows, cache_dir, image_size, margin, dummy_prior, progress, shard_entries,
                        match_targets) if write
            else cache_path(pipe, rows, cache_dir, image_size, margin, dummy_prior, match_targets))
    return open_cache(path)
