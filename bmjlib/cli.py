"""The `bmj` command: reproduce the chain, make the phantom cohort, generate one counterfactual, bench.

Each subcommand imports its module lazily, so `bmj --help` is instant and a missing optional piece
fails only the subcommand that needs it.
"""
from __future__ import annotations

import argparse
import sys


# Subcommands import their module when run (deferred on purpose: `bmj --help` stays instant).
def _reproduce(a: argparse.Namespace) -> int:
    from bmjlib.chain import ChainError, run_chain

    try:
        run_chain(a.profile, out=a.out, start=a.start, stop=a.stop, force=a.force)
    except (ChainError, ValueError, FileNotFoundError) as e:  # profile and range problems: one line, no traceback
        print(f"bmj reproduce: {e}", file=sys.stderr)
        return 1
    return 0


def _phantom(a: argparse.Namespace) -> int:
    from bmjlib.phantom.cohort import write_cohort

    summary = write_cohort(a.out, n_patients=a.patients, size=a.size, seed=a.seed, workers=a.workers)
    for k, v in summary.items():
        print(f"{k}: {v}")
    return 0


def _generate(a: argparse.Namespace) -> int:
    from bmjlib.model.generate import generate_cli

    return generate_cli(a)


def _bench(a: argparse.Namespace) -> int:
    from bmjlib.bench.run import main as bench_main

    return bench_main(quick=a.quick, out=a.out, gpu=a.gpu)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bmj", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("reproduce", help="run the numbered notebooks in order with papermill")
    r.add_argument("--profile", default="demo", help="smoke | demo | paper | path/to/profile.yaml")
    r.add_argument("--from", dest="start", type=int, default=None, help="first step (earlier outputs are reused)")
    r.add_argument("--to", dest="stop", type=int, default=None, help="last step (inclusive)")
    r.add_argument("--out", default=None, help="run folder (default runs/<profile>)")
    r.add_argument("--force", action="store_true", help="rerun steps even if their inputs are unchanged")
    r.set_defaults(func=_reproduce)

    ph = sub.add_parser("phantom", help="write the phantom cohort in the MIMIC-CXR-JPG layout")
    ph.add_argument("--out", required=True)
    ph.add_argument("--patients", type=int, default=200)
    ph.add_argument("--size", type=int, default=256, help="image size in px (128-512)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ph.set_defaults(func=_phantom)

    g = sub.add_parser("generate", help="make one counterfactual from a prior image and a description")
    g.add_argument("--model", required=True, help="a saved pipeline folder, or 'demo' for the shipped model")
    g.add_argument("--prior", required=True, help="PNG, JPEG or DICOM prior image")
    g.add_argument("--prompt", required=True, help="progression description, e.g. 'new small left effusion'")
    g.add_argument("--out", required=True, help="output PNG")
    g.add_argument("--text-scale", type=float, default=None,
                   help="text guidance s_T, a finite number >= 0 (default: the model's guidance.json, else 7.5)")
    g.add_argument("--image-scale", type=float, default=None,
                   help="image guidance s_I, a finite number >= 0 (default: the model's guidance.json, else 1.5)")
    g.add_argument("--steps", type=int, default=None, help="sampling steps, 1 to 1000 (default 20)")
    g.add_argument("--scheduler", default=None, choices=["ddim", "dpm", "euler"])
    g.add_argument("--strength", type=float, default=None,
                   help="how far from the prior sampling starts, in (0, 1] and at most what the model was trained "
                        "for (the demo model: 0.7); 1 = pure noise (default: the model's guidance.json, else its "
                        "max_strength)")
    g.add_argument("--text-guidance-min-t", type=float, default=None,
                   help="apply the text guidance only at timesteps >= this share of the schedule, in [0, 1); the "
                        "later steps use text scale 1 (default: the model's guidance.json, else 0 = every step)")
    g.add_argument("--edit-mask", type=float, default=None,
                   help="change only where the sentence moves the model's prediction (DiffEdit's mask; a finite "
                        "number >= 0, larger = a smaller region; default: the model's guidance.json, else 0 = the "
                        "whole image may change)")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="print the benchmark table and write figures/benchmarks.md")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--gpu", action="store_true", help="also run the GPU section (needs CUDA)")
    b.add_argument("--out", default="figures/benchmarks.md")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
