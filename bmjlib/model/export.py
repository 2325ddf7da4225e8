"""Exporting a trained BiomedJourney model as the shipped demo model (the compact form of `demo_model`).

`python -m bmjlib.model.export --run runs/demo` reads the run's 05_stage2/model and training texts, writes
bmjlib/model/demo/ (compact weights, SHA256SUMS, MODEL_CARD.md) and measures how far the compact model's
counterfactuals are from the original's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import open_clip
import pandas as pd
from skimage.metrics import structural_similarity

from bmjlib.io import atomic_write_text, read_image, sha256_file
from bmjlib.model.demo_model import CARD, DEMO_DIR, QUANT_MIN_NUMEL, SUMS, DemoModelError, compact_file, materialise
from bmjlib.model.pipeline import BiomedJourneyPipeline
from bmjlib.runtime import resolve
from bmjlib.text.progression import SUGGESTIONS


def vocabulary_rows(texts: Iterable[str], text_encoder_dir: Path) -> list[int]:
    """Token ids (incl. start/end/pad) of the text tower's tokenizer over `texts`."""
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
        sampling = guidance.get("settings", {})
        card.append(f"- guidance.json: text scale {guidance['text_scale']:g}, image scale {guidance['image_scale']:g}, "
                    f"strength {float(sampling.get('strength', 1.0)):g}, output {sampling.get('output', 'decoded')}, "
                    f"text guidance at t >= {float(sampling.get('text_guidance_min_t', 0.0)):g} T, "
                    f"edit mask {float(sampling.get('edit_mask', 0.0)):g} (0: none), "
                    "chosen on validation pairs; the defaults of `bmj generate` and the explorer for this model")
    if "max_abs_diff" in summary:
        card.append(f"- compact vs original, {summary['n_checked']} counterfactuals ({check_steps} DPM-Solver++ steps, same seeds): max |pixel "
                    f"difference| {summary['max_abs_diff']:.4f}, mean SSIM {summary['ssim']:.4f}")
    card += ["", "Load: `BiomedJourneyPipeline.from_pretrained(bmjlib.model.demo_model.resolve_model('demo'))`; "
             "verify: `python -m bmjlib.model.demo_model --verify`.", ""]
    atomic_write_text(out / CARD, "\n".join(card))
    return summary


def fidelity(original: Path, compact: Path, priors: np.ndarray, prompts: list[str], steps: int = 20) -> dict:
    """Generate with the original and the compact model (same seeds, both at the compact model's default guidance,
    strength, output, text guidance interval and edit mask, which the original's folder may not hold); max pixel difference and
    SSIM."""
    n = len(priors)
    prompts = (prompts * n)[:n]
    with tempfile.TemporaryDirectory() as tmp:
        shipped = BiomedJourneyPipeline.from_pretrained(materialise(compact, Path(tmp)))
        ts, im = shipped.guidance
        b = shipped(priors, prompts, steps=steps, seed=0)
        a = BiomedJourneyPipeline.from_pretrained(original)(priors, prompts, text_scale=ts, image_scale=im, steps=steps,
                                                            seed=0, strength=shipped.strength, output=shipped.output,
                                                            text_guidance_min_t=shipped.text_guidance_min_t,
                                                            edit_mask=shipped.edit_mask)
    ssim = float(np.mean([structural_similarity(x, y, data_range=1.0) for x, y in zip(a, b)]))
    return {"n_checked": n, "max_abs_diff": float(np.abs(a - b).max()), "ssim": ssim}


def export_from_run(run: str | os.PathLike, out: Path = DEMO_DIR, provenance: str = "", check_steps: int = 20) -> dict:
    """Export `run`/05_stage2/model; training texts from 01_cohort/stage1.csv and 03_descriptions/pairs.csv."""
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



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bmjlib.model.export", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a demo run folder to export the shipped model from (05_stage2/model)")
    a = p.parse_args(argv)
    summary = export_from_run(a.run)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
