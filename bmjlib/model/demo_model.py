"""The shipped demo model: BiomedJourney (paper §4.2) trained by the demo chain, loadable by name.

`resolve_model("demo")` returns a folder that `BiomedJourneyPipeline.from_pretrained` loads, so
`bmj generate --model demo ...` works on a fresh install with no training run. Any other name is taken as
a path and returned unchanged.

The repository keeps the model in a compact form under `bmjlib/model/demo/` (a few MB): the same folder
layout as `save_pretrained` (vae/, unet/, text_encoder/, scheduler/, projection.safetensors, configs), but
each safetensors file stores large weight matrices as int8 with one fp16 scale per output channel
(symmetric), small tensors (biases, norms) as float32, and of the text tower's 49,408-row token embedding
only the rows of tokens that occur in the training texts (the others never received a gradient; they are
zero in the shipped model). `SHA256SUMS` records every shipped file; `MODEL_CARD.md` records where the
model came from and how far the compact model's outputs are from the original's (measured at export).
On first use the compact folder is verified against SHA256SUMS and expanded to float32 in a cache folder
(`$BMJ_CACHE` or ~/.cache/bmjlib), keyed by the weights' hashes, so a changed model is never served stale.

Rebuild after a demo chain with `python -m bmjlib.model.export --run runs/demo` (`model/export.py`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bmjlib.io import atomic_dir, sha256_file

DEMO_DIR = Path(__file__).resolve().parent / "demo"
SUMS = "SHA256SUMS"
CARD = "MODEL_CARD.md"
FORMAT = "bmj-compact-1"
EMBEDDING_KEY = "text.token_embedding.weight"
QUANT_MIN_NUMEL = 4096      # tensors smaller than this (biases, norms, small convs) stay float32


class DemoModelError(RuntimeError):
    """The shipped demo model is missing or does not match its recorded sha256."""


# --------------------------------------------------------------------------- resolving by name

def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """'demo' -> the expanded shipped demo model (verified, cached); anything else -> Path(name_or_path)."""
    if str(name_or_path) == "demo":
        return materialise()
    return Path(name_or_path)


def cache_root() -> Path:
    return Path(os.environ.get("BMJ_CACHE") or Path.home() / ".cache" / "bmjlib")


def read_sums(folder: Path = DEMO_DIR) -> dict[str, str]:
    path = folder / SUMS
    if not path.is_file():
        raise DemoModelError(f"{path} does not exist: the demo model is not shipped in this checkout "
                             "(rebuild it with `python -m bmjlib.model.export --run runs/demo`)")
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, rel = line.split(maxsplit=1)
            sums[rel.strip().lstrip("*")] = digest
    return sums


def verify(folder: Path = DEMO_DIR) -> dict[str, str]:
    """Check every file in SHA256SUMS; return {relative path: sha256}. Raises DemoModelError naming the
    first missing or changed file, and lists files present but not recorded."""
    folder = Path(folder)
    sums = read_sums(folder)
    for rel, digest in sums.items():
        f = folder / rel
        if not f.is_file():
            raise DemoModelError(f"{f}: listed in {SUMS} but missing")
        got = sha256_file(f)
        if got != digest:
            raise DemoModelError(f"{f}: sha256 {got[:16]}... differs from the recorded {digest[:16]}...")
    extra = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and p.name not in (SUMS, CARD) and str(p.relative_to(folder)) not in sums
                   and "__pycache__" not in p.parts)
    if extra:
        raise DemoModelError(f"{folder}: files not recorded in {SUMS}: {extra}")
    return sums


def materialise(folder: Path = DEMO_DIR, cache: Path | None = None) -> Path:
    """Verify the compact model and expand it (once) into a float32 `save_pretrained` folder; return it."""
    sums = verify(folder)
    key = hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()[:16]
    out = (cache or cache_root()) / f"demo-{key}"
    if (out / "bmj_pipeline.json").is_file():
        return out
    with atomic_dir(out) as tmp:
        for rel in sums:
            src, dst = folder / rel, tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix == ".safetensors":
                expand_file(src, dst)
            else:
                shutil.copyfile(src, dst)
    return out


# --------------------------------------------------------------------------- compact format

def compact_state(state: dict, keep_rows: Iterable[int] | None = None) -> dict:
    """Float tensors -> compact tensors (int8 + per-channel fp16 scale, or float32 when small)."""
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if not v.is_floating_point():
            out[k] = v.contiguous()
            continue
        v = v.float()
        if k == EMBEDDING_KEY and keep_rows is not None:
            rows = torch.as_tensor(sorted(set(int(r) for r in keep_rows)), dtype=torch.int64)
            out[k + ".__rows"] = rows
            out[k + ".__shape"] = torch.tensor(list(v.shape), dtype=torch.int64)
            v = v[rows]
        if v.ndim >= 2 and v.numel() >= QUANT_MIN_NUMEL:
            flat = v.reshape(v.shape[0], -1)
            scale = (flat.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
            q = torch.round(flat / scale).clamp(-127, 127).to(torch.int8)
            out[k + ".__q"] = q.reshape(v.shape).contiguous()
            out[k + ".__scale"] = scale.to(torch.float16).reshape(-1).contiguous()
        else:
            out[k] = v.contiguous()
    return out


def expand_state(compact: dict) -> dict:
    """Inverse of compact_state: float32 tensors under the original names."""
    out = {}
    for k, v in compact.items():
        if k.endswith((".__scale", ".__rows", ".__shape")):
            continue
        if k.endswith(".__q"):
            name = k[: -len(".__q")]
            scale = compact[name + ".__scale"].float()
            w = (v.reshape(v.shape[0], -1).float() * scale[:, None]).reshape(v.shape)
        else:
            name, w = k, v
        if name + ".__rows" in compact:
            full = torch.zeros(tuple(compact[name + ".__shape"].tolist()), dtype=torch.float32)
            full[compact[name + ".__rows"]] = w
            w = full
        out[name] = w.contiguous()
    return out


def compact_file(src: Path, dst: Path, keep_rows: Iterable[int] | None = None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(compact_state(load_file(str(src)), keep_rows), str(dst), metadata={"format": FORMAT})


def expand_file(src: Path, dst: Path) -> None:
    with safe_open(str(src), "pt") as f:
        fmt = (f.metadata() or {}).get("format")
    if fmt != FORMAT:
        raise DemoModelError(f"{src}: not a compact demo-model file (format {fmt!r}, expected {FORMAT!r})")
    save_file(expand_state(load_file(str(src))), str(dst), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bmjlib.model.demo_model", description="verify the shipped demo model")
    p.add_argument("--verify", action="store_true", help="check the shipped files against SHA256SUMS (the default)")
    p.parse_args(argv)
    try:
        sums = verify()
    except DemoModelError as e:
        print(f"demo model: {e}", file=sys.stderr)
        return 1
    print(f"demo model: {len(sums)} files match {DEMO_DIR / SUMS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
