"""Multi-GPU training of the two stages outside Jupyter (paper §4.2, §5.1: 8 GPUs at paper scale).

Notebooks 04-05 train in the notebook's own process: one GPU (or the CPU). For many GPUs, run the same
training under `accelerate launch`, then let the chain continue; the notebooks find the finished
models (same data, config, initialisation and code) and do not train again:

    bmj reproduce --profile paper --to 03
    accelerate launch --multi_gpu --num_processes 8 -m bmjlib.model.launch --profile paper --run runs/paper --stage 1
    accelerate launch --multi_gpu --num_processes 8 -m bmjlib.model.launch --profile paper --run runs/paper --stage 2
    bmj reproduce --profile paper --from 4

The profile's `batch_size` is the global batch of one optimizer step, whatever the number of processes;
`accelerate launch --gradient_accumulation_steps K` splits each process's share into K micro-batches
(fewer or smaller GPUs, same model). Neither changes the model: the notebooks still find it up to date.
On a machine without GPUs, `accelerate launch --cpu --num_processes 2 ...` runs the same code over gloo
(tests/test_distributed.py).

Each function below calls the entry point its notebook calls (`stages.train_stage1`, `train_stage2`,
`train_one_stage`; tests/test_launch.py checks that a model trained by the notebook is "up to date" for
this module, i.e. the two cannot drift apart). Work that is not split over processes (the demo-scale
VAE and text encoder of stage 1) runs on the main process first; the others then find it done.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate.state import PartialState

from bmjlib.model import stages
from bmjlib.runtime import load_profile


def stage1(run_dir: str, p: dict) -> Path:
    """Notebook 04: the frozen components, then stage 1 on single image-report pairs with the dummy prior."""
    state = PartialState(cpu=not torch.cuda.is_available())  # processes on a CPU-only machine: gloo
    with state.main_process_first():  # trained once, by the main process; the others read them
        comp = stages.stage1_components(run_dir, p)
    return stages.train_stage1(run_dir, p, comp)


def stage2(run_dir: str, p: dict) -> list[Path]:
    """Notebook 05: stage 2 from stage 1's weights on registered triples, and the one-stage ablation."""
    done = [stages.train_stage2(run_dir, p)]
    if p["one_stage"]:
        done.append(stages.train_one_stage(run_dir, p))
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
