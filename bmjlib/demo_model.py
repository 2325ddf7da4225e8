"""The shipped demo model: BiomedJourney (paper §4.2) trained by the demo chain, loadable by name (issue 10).

`resolve_model("demo")` returns a folder that `BiomedJourneyPipeline.from_pretrained` loads, so
`bmj generate --model demo ...` works on a fresh install with no training run. Any other name is taken as
a path and returned unchanged.

The repository keeps the model in a compact form under `bmjlib/models/demo/` (a few MB): the same folder
layout as `save_pretrained` (vae/, unet/, text_encoder/, scheduler/, projection.safetensors, configs), but
each safetensors file stores large weight matrices as int8 with one fp16 scale per output channel
(symmetric), small tensors (biases, norms) as float32, and of the text tower's 49,408-row token embedding
only the rows of tokens that occur in the training texts (the others never received a gradient; they are
zero in the shipped model). `SHA256SUMS` records every shipped file; `MODEL_CARD.md` records where the
model came from and how far the compact model's outputs are from the original's (measured at export).
On first use the compact folder is verified against SHA256SUMS and expanded to float32 in a cache folder
(`$BMJ_CACHE` or ~/.cache/bmjlib), keyed by the weights' hashes, so a changed model is never served stale.

Rebuild after a demo chain: `python -m bmjlib.demo_model --run runs/demo` (reads 05_stage2/model and the
run's training texts, writes bmjlib/models/demo/).
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

import numpy as np

from .io import atomic_write_text, sha256_file

DEMO_DIR = Path(__file__).resolve().parent / "models" / "demo"
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
                             "(rebuild it with `python -m bmjlib.demo_model --run runs/demo`)")
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
    from .pipeline import atomic_dir

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
    import torch

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
    import torch

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
    from safetensors.torch import load_file, save_file

    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(compact_state(load_file(str(src)), keep_rows), str(dst), metadata={"format": FORMAT})


def expand_file(src: Path, dst: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        fmt = (f.metadata() or {}).get("format")
    if fmt != FORMAT:
        raise DemoModelError(f"{src}: not a compact demo-model file (format {fmt!r}, expected {FORMAT!r})")
    save_file(expand_state(load_file(str(src))), str(dst), metadata={"format": "pt"})


# --------------------------------------------------------------------------- export

def vocabulary_rows(texts: Iterable[str], text_encoder_dir: Path) -> list[int]:
    """Token ids (incl. start/end/pad) of the text tower's tokenizer over `texts`."""
    import open_clip

    tok = open_clip.get_tokenizer(f"local-dir:{text_encoder_dir}")
    ids: set[int] = {0}
    texts = list(texts)
    for i in range(0, len(texts), 256):
        ids.update(int(t) for t in np.unique(tok(texts[i:i + 256]).numpy()))
    return sorted(ids)


def export(model_dir: str | os.PathLike, texts: Iterable[str], out: str | os.PathLike = DEMO_DIR,
           provenance: str = "", check_priors: np.ndarray | None = None,
           check_prompts: list[str] | None = None, check_steps: int = 20, guidance: dict | None = None) -> dict:
    """Write the compact model of `model_dir` (a saved BiomedJourneyPipeline) to `out`, with SHA256SUMS and
    MODEL_CARD.md. `texts`: the training texts (their tokens keep their embedding rows). When
    `check_priors` is given, the original and the compact model generate from them and the card records
    the largest pixel difference and the mean SSIM between the two. `guidance`: the scales chosen for the
    model on validation pairs, shipped as guidance.json (the defaults of `bmj generate` and the explorer)."""
    model_dir, out = Path(model_dir), Path(out)
    rows = vocabulary_rows(texts, model_dir / "text_encoder") if (model_dir / "text_encoder").is_dir() else None
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    for p in files:
        rel = p.relative_to(model_dir)
        if p.suffix == ".safetensors":
            compact_file(p, out / rel, keep_rows=rows if "text_encoder" in rel.parts else None)
        elif p.suffix in (".json", ".txt"):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, out / rel)
        else:
            raise DemoModelError(f"{p}: unexpected file type in a saved pipeline (not shipped)")
    if guidance:
        atomic_write_text(out / "guidance.json", json.dumps(guidance, indent=2, sort_keys=True) + "\n")
    sums = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    atomic_write_text(out / SUMS, "".join(f"{d}  {r}\n" for r, d in sums.items()))
    size = sum((out / r).stat().st_size for r in sums)
    summary = {"files": len(sums), "bytes": size, "original_bytes": sum(p.stat().st_size for p in files),
               "embedding_rows_kept": len(rows) if rows else None}
    if check_priors is not None:
        summary.update(fidelity(model_dir, out, check_priors, check_prompts or ["no change"], check_steps))
    card = [f"# Demo model (BiomedJourney, demo scale)", "",
            provenance or f"Exported from `{model_dir}`.", "",
            f"- files: {summary['files']}, {size / 2**20:.2f} MiB shipped "
            f"(the float32 original: {summary['original_bytes'] / 2**20:.2f} MiB)",
            f"- storage: weight matrices int8 with a per-output-channel fp16 scale; tensors under "
            f"{QUANT_MIN_NUMEL} elements float32",
            f"- text token embedding: {summary['embedding_rows_kept']} of the tokenizer's rows kept "
            "(tokens of the training texts); others are zero"]
    if guidance:
        card.append(f"- guidance.json: text scale {guidance['text_scale']:g}, image scale {guidance['image_scale']:g}, "
                    "chosen on validation pairs; the defaults of `bmj generate` and the explorer for this model")
    if "max_abs_diff" in summary:
        card.append(f"- compact vs original, {summary['n_checked']} counterfactuals ({check_steps} DPM-Solver++ steps, same seeds): max |pixel "
                    f"difference| {summary['max_abs_diff']:.4f}, mean SSIM {summary['ssim']:.4f}")
    card += ["", "Load: `BiomedJourneyPipeline.from_pretrained(bmjlib.demo_model.resolve_model('demo'))`; "
             "verify: `python -m bmjlib.demo_model --verify`.", ""]
    atomic_write_text(out / CARD, "\n".join(card))
    return summary


def fidelity(original: Path, compact: Path, priors: np.ndarray, prompts: list[str], steps: int = 20) -> dict:
    """Generate with the original and the compact model (same seeds); max pixel difference and SSIM."""
    import tempfile

    from skimage.metrics import structural_similarity

    from .pipeline import BiomedJourneyPipeline

    n = len(priors)
    prompts = (prompts * n)[:n]
    with tempfile.TemporaryDirectory() as tmp:
        a = BiomedJourneyPipeline.from_pretrained(original)(priors, prompts, steps=steps, seed=0)
        b = BiomedJourneyPipeline.from_pretrained(materialise(compact, Path(tmp)))(priors, prompts, steps=steps, seed=0)
    ssim = float(np.mean([structural_similarity(x, y, data_range=1.0) for x, y in zip(a, b)]))
    return {"n_checked": n, "max_abs_diff": float(np.abs(a - b).max()), "ssim": ssim}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bmjlib.demo_model", description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a demo run folder to export the shipped model from (05_stage2/model)")
    p.add_argument("--verify", action="store_true", help="check the shipped files against SHA256SUMS")
    a = p.parse_args(argv)
    if a.verify or not a.run:
        try:
            sums = verify()
        except DemoModelError as e:
            print(f"demo model: {e}", file=sys.stderr)
            return 1
        print(f"demo model: {len(sums)} files match {DEMO_DIR / SUMS}")
        return 0
    summary = export_from_run(a.run)
    print(json.dumps(summary, indent=2))
    return 0


def export_from_run(run: str | os.PathLike, out: Path = DEMO_DIR, provenance: str = "", check_steps: int = 20) -> dict:
    """Export `run`/05_stage2/model; training texts from 01_cohort/stage1.csv and 03_descriptions/pairs.csv."""
    import pandas as pd

    from .chain import resolve
    from .io import read_image

    run = resolve(run)
    model = run / "05_stage2" / "model"
    if not (model / "bmj_pipeline.json").is_file():
        raise DemoModelError(f"{model} is not a saved pipeline: run the demo chain to step 05 first")
    texts: list[str] = []
    for csv, cols in ((run / "01_cohort" / "stage1.csv", ["impression", "findings"]),
                      (run / "03_descriptions" / "pairs.csv", ["description", "instruction_impression"])):
        if csv.is_file():
            df = pd.read_csv(csv, dtype=str, keep_default_na=False)
            texts += [t for c in cols if c in df for t in df[c] if t]
    from .explorer import SUGGESTIONS

    texts += SUGGESTIONS
    pairs = pd.read_csv(run / "03_descriptions" / "pairs.csv", dtype=str, keep_default_na=False)
    test = pairs[pairs["split"] == "test"].head(4) if "split" in pairs else pairs.head(4)
    priors = np.stack([read_image(p) for p in test["prior_path"]])
    chain = json.loads((run / "chain.json").read_text()) if (run / "chain.json").is_file() else {}
    prov = provenance or (f"Trained by the demo chain (`bmj reproduce --profile demo`) in `{run.name}/`: stage 1 + stage 2 "
            f"(05_stage2/model); step 05 finished {chain.get('05_stage2', {}).get('finished', '?')}.")
    chosen = run / "05_stage2" / "guidance" / "guidance.json"
    return export(model, texts, out, provenance=prov, check_priors=priors, check_steps=check_steps,
                  check_prompts=list(test["description"]) if "description" in test else None,
                  guidance=json.loads(chosen.read_text()) if chosen.is_file() else None)


if __name__ == "__main__":
    sys.exit(main())
