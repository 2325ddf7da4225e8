"""The measurements behind `bmj bench` (issue 9), one function per row group; see bmjlib/bench.py.

Each step's own module owns its `benchmark()` (phantom, registration, progression); this module calls it,
and measures the model itself (training with cached vs on-the-fly encoding, DPM-Solver++ 20 steps vs
100-step sampling at equal fidelity, scaling with image and batch size) through bmjlib.pipeline and
bmjlib.train. A function raises `NotAvailable` with the reason when its code has not landed.
"""
from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Any

from .bench import BenchConfig, NotAvailable, Result, _optional


class Context:
    """Things several measurements share, built once on first use (a small phantom cohort, the model)."""

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._cache: dict[str, Any] = {}

    @property
    def tmp(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bmj-bench-")
        return Path(self._tmp.name)


def _call(fn, **kwargs):
    """Call another module's benchmark() with the keyword arguments it declares (it may take fewer)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _rate(res: Any, *keys: str) -> float:
    """The items/s figure in another module's benchmark() result (a number, or a dict holding one)."""
    if isinstance(res, (int, float)):
        return float(res)
    if isinstance(res, dict):
        for k in keys:
            if k in res and res[k] is not None:
                return float(res[k])
    raise NotAvailable(f"benchmark() returned {type(res).__name__} without any of {keys}: {res!r:.200}")


# --------------------------------------------------------------------------- other modules' benchmarks

def phantom_rate(ctx: Context) -> Result:
    cfg = ctx.cfg
    bench = _optional("bmjlib.phantom", "benchmark", "lands with the phantom issue")
    res = _call(bench, n_images=cfg.phantom_images, n=cfg.phantom_images, size=cfg.phantom_size,
                seed=cfg.seed, workers=None)
    r = Result("Throughput", "phantom images/s", _rate(res, "images_per_s", "images_per_second", "rate"),
               "images/s", note=f"{cfg.phantom_images} images at {cfg.phantom_size} px")
    r.extra = res if isinstance(res, dict) else {}
    return r


def registration_rate(ctx: Context) -> Result:
    cfg = ctx.cfg
    bench = _optional("bmjlib.registration", "benchmark", "lands with the cohort/registration issue")
    res = _call(bench, n_pairs=cfg.reg_pairs, size=cfg.reg_size, seed=cfg.seed)
    ours = _rate(res, "pairs_per_s", "ours_pairs_per_s", "rate")
    other = None
    if isinstance(res, dict):
        for k in ("progemu_pairs_per_s", "baseline_pairs_per_s", "reference_pairs_per_s"):
            if res.get(k) is not None:
                other = float(res[k])
    compare = f"ProgEmu config {other:.3g} pairs/s ({ours / other:.1f}x)" if other else ""
    return Result("Throughput", "registration pairs/s", ours, "pairs/s", compare=compare,
                  note=f"{cfg.reg_pairs} pairs at {cfg.reg_size} px, same pairs for both",
                  extra=res if isinstance(res, dict) else {})


def description_rate(ctx: Context) -> Result:
    cfg = ctx.cfg
    bench = _optional("bmjlib.progression", "benchmark", "lands with the reports/progression issue")
    res = _call(bench, n=cfg.descriptions, n_pairs=cfg.descriptions, seed=cfg.seed)
    return Result("Throughput", "offline descriptions/s",
                  _rate(res, "descriptions_per_s", "per_s", "rate"), "descriptions/s",
                  note=f"{cfg.descriptions} report pairs, offline synthesiser (no network)",
                  extra=res if isinstance(res, dict) else {})


def registration_scaling(ctx: Context) -> list[Result]:
    cfg = ctx.cfg
    bench = _optional("bmjlib.registration", "benchmark", "lands with the cohort/registration issue")
    rows = []
    for size in cfg.scale_sizes:
        res = _call(bench, n_pairs=cfg.scale_reg_pairs, size=size, seed=cfg.seed)
        rate = _rate(res, "pairs_per_s", "ours_pairs_per_s", "rate")
        rows.append(Result("Scaling", f"registration at {size} px", 1.0 / rate, "s/pair",
                           note=f"{cfg.scale_reg_pairs} pairs"))
    return rows


# --------------------------------------------------------------------------- the model (filled in below)

def training_cached(ctx: Context) -> list[Result]:
    raise NotAvailable("bmjlib.pipeline / bmjlib.train have not landed (model issue)")


def sampler_rates(ctx: Context) -> list[Result]:
    raise NotAvailable("bmjlib.pipeline has not landed (model issue)")


def generation_scaling(ctx: Context) -> list[Result]:
    raise NotAvailable("bmjlib.pipeline has not landed (model issue)")


def training_batch_scaling(ctx: Context) -> list[Result]:
    raise NotAvailable("bmjlib.train has not landed (model issue)")


def gpu_section(cfg: BenchConfig, requested: bool) -> list[Result]:
    from .bench_gpu import gpu_rows

    return gpu_rows(cfg, requested)
