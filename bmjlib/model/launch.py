"""Multi-GPU training of the two stages outside Jupyter (paper §4.2, §5.1: 8 GPUs at paper scale).

Notebooks 04-05 train in the notebook's own process: one GPU (or the CPU). For many GPUs, run the same
training under `accelerate launch`, then let the chain continue; the notebooks find the finished
models (same data, config and initialisation) and do not train again:

    bmj reproduce --profile paper --to 03
    accelerate launch --multi_gpu --num_processes 8 -m bmjlib.model.launch --profile paper --run runs/paper --stage 1
    accelerate launch --multi_gpu --num_processes 8 -m bmjlib.model.launch --profile paper --run runs/paper --stage 2
    bmj reproduce --profile paper --from 4

Each function below makes exactly the call its notebook makes (tests/test_launch.py checks that a model
trained by the notebook is "up to date" for this module, i.e. the two cannot drift apart).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from bmjlib.chain import load_profile
from bmjlib.model import stages
from bmjlib.model.train import TrainConfig, train_stage
from bmjlib.runtime import step_dir


def _config(p: dict, epochs: int, vae_dir):
    return TrainConfig(image_size=p["image_size"], batch_size=p["batch_size"], lr=p["lr"], epochs=epochs,
                       cond_dropout=p["cond_dropout"], ema=p["use_ema"], checkpoint_every=p["checkpoint_every"],
                       seed=p["seed"], unet_config=stages.unet_config(p["model_scale"], p["image_size"],
                                                                      stages.vae_factor(vae_dir)))


def stage1(run_dir: str, p: dict) -> Path:
    """Notebook 04: the frozen components, then stage 1 on single image-report pairs with the dummy prior."""
    out = step_dir(run_dir, "04_stage1")
    table = pd.read_csv(step_dir(run_dir, "01_cohort") / "stage1.csv")
    comp = stages.prepare_components(table, out, model_scale=p["model_scale"], image_size=p["image_size"],
                                     vae_steps=p["vae_steps"], clip_epochs=p["clip_epochs"], seed=p["seed"],
                                     sd_vae_dir=p["sd_vae_dir"], text_encoder=p["text_encoder"])
    return train_stage(_config(p, p["stage1_epochs"], comp["vae"]), table, out, prior="dummy",
                       text_column="impression", vae=comp["vae"], text_encoder=comp["text_encoder"],
                       cache_dir=out / "latents", unet_init=p["sd_unet_dir"] or None)


def stage2(run_dir: str, p: dict) -> list[Path]:
    """Notebook 05: stage 2 from stage 1's weights on registered triples, and the one-stage ablation."""
    out = step_dir(run_dir, "05_stage2")
    s1 = step_dir(run_dir, "04_stage1")
    pairs = pd.read_csv(step_dir(run_dir, "03_descriptions") / "pairs.csv")
    cfg = _config(p, p["stage2_epochs"], s1 / "model" / "vae")
    done = [train_stage(cfg, pairs, out, init_from=s1 / "model", prior="registered", text_column="description",
                        cache_dir=s1 / "latents")]
    if p["one_stage"]:
        done.append(train_stage(cfg, pairs, out / "one_stage", prior="registered", text_column="description",
                                vae=s1 / "model" / "vae", text_encoder=f"local-dir:{s1 / 'model' / 'text_encoder'}",
                                cache_dir=s1 / "latents", unet_init=p["sd_unet_dir"] or None))
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bmjlib.model.launch", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, help="smoke | demo | paper | profile.yaml")
    ap.add_argument("--run", required=True, help="the run folder the chain writes (e.g. runs/paper)")
    ap.add_argument("--stage", required=True, choices=["1", "2"])
    a = ap.parse_args(argv)
    p = load_profile(a.profile)
    run_dir = str(Path(a.run).resolve())
    print(stage1(run_dir, p) if a.stage == "1" else stage2(run_dir, p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
