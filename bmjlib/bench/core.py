"""Benchmarks: how fast each step of the chain runs, how its cost grows, and how close it gets to the machine.

Paper anchors (§4.2): stage 1 took 288 A100-hours for 69,846 images x 200
epochs, i.e. 13.5 images/s per A100; InstructPix2Pix samples with 100 steps and three UNet evaluations per
step. `bmj bench [--quick] [--gpu]` measures, side by side in one run, every throughput the chain depends
on and prints one table, also written to figures/benchmarks.md with the machine, the package versions and
the command. A measurement that cannot run here for a stated reason (no GPU, no demo chain run yet) is a
row that says why; a measurement that raises is a row marked failed with the error, and `bmj bench` then
exits with status 1. No number in the table is anything but a measurement of this run.

Peak memory is the process's peak resident set size during one measurement (Linux VmHWM, reset before
each measurement through /proc/self/clear_refs; elsewhere a 5 ms psutil sampler), plus the CUDA
allocator's peak for GPU rows. It includes what the process already held (Python, torch), so compare
rows with each other rather than reading them as the cost of one step alone.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bmjlib.runtime import STAMP_FORMAT, resolve

GROUPS = ["Throughput", "Scaling", "Demo chain", "GPU"]
PACKAGES = ["numpy", "torch", "diffusers", "open_clip_torch", "SimpleITK", "scikit-image", "pandas", "papermill"]


# --------------------------------------------------------------------------- results

@dataclass
class Result:
    """One row of the table. `value` is None when the measurement did not run; `note` then says why."""
    group: str
    name: str
    value: float | None = None
    unit: str = ""
    compare: str = ""          # the other arm of a side-by-side measurement, e.g. "vs ProgEmu 1.2 pairs/s"
    peak_mb: float | None = None
    note: str = ""             # configuration, fidelity, or why the row is not available
    extra: dict = field(default_factory=dict)   # machine-readable numbers behind `compare` / `note`
    failed: bool = False       # the measurement raised (`note` names the error): `bmj bench` exits 1

    @property
    def available(self) -> bool:
        return self.value is not None and math.isfinite(self.value)


class NotAvailable(Exception):
    """Raised by a measurement that cannot run here; the message is shown in the table's note column."""


@dataclass
class BenchConfig:
    """Sizes of every measurement. `quick()` fits the 2-core CPU budget (< 3 min); `full()` is steadier."""
    phantom_images: int = 400          # images rendered for the phantom rate (fewer mostly time the pool start)
    phantom_size: int = 256
    reg_pairs: int = 2
    reg_size: int = 256
    descriptions: int = 200
    train_steps: int = 4               # timed optimisation steps per arm (after one warm-up step)
    train_batch: int = 16
    train_batches: tuple[int, ...] = (8, 32)
    image_size: int = 64               # the demo model's resolution
    gen_pairs: int = 2                 # counterfactuals per sampler arm
    fast_steps: int = 20               # DPM-Solver++
    slow_steps: int = 100              # InstructPix2Pix's sampling length
    scale_sizes: tuple[int, ...] = (128, 256, 512)
    scale_reg_pairs: int = 1
    scale_gen_steps: int = 2           # generation scaling: a few steps (the table says how many)
    chain_json: str = "runs/demo/chain.json"
    model: str = "demo"                # trained model for the sampler comparison ("demo" = shipped)
    seed: int = 0
    speed_batch: int = 32              # the CPU speed options row: the demo profile's batch
    speed_steps: int = 4
    speed_compile: bool = False        # torch.compile arm (compiling takes a minute or two): full bench only
    gpu_steps: int = 20
    gpu_batch: int = 32
    gpu_size: int = 256
    gpu_sample_steps: int = 20

    @classmethod
    def quick(cls) -> "BenchConfig":
        return cls()

    @classmethod
    def full(cls) -> "BenchConfig":
        return cls(phantom_images=2000, reg_pairs=12, descriptions=2000, train_steps=12, gen_pairs=8,
                   scale_reg_pairs=4, scale_gen_steps=8, speed_steps=12, speed_compile=True, gpu_steps=50)


# --------------------------------------------------------------------------- peak memory

class PeakMemory:
    """Context manager: peak RSS (MB) of this process inside the block, and the CUDA peak if torch uses CUDA."""

    def __init__(self) -> None:
        self.rss_mb: float | None = None
        self.cuda_mb: float | None = None
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._max = 0

    @staticmethod
    def _hwm_kb() -> int | None:
        try:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
            return int(m.group(1)) if m else None
        except OSError:
            return None

    def __enter__(self) -> "PeakMemory":
        self._use_hwm = False
        try:  # "5" resets the peak RSS counter (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self._use_hwm = self._hwm_kb() is not None
        except OSError:
            pass
        if not self._use_hwm:
            import psutil

            proc = psutil.Process()
            self._max = proc.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self._max = max(self._max, proc.memory_info().rss)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        self._cuda = _cuda_ready()
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if self._use_hwm:
            self.rss_mb = self._hwm_kb() / 1024
        else:
            self._stop.set()
            self._sampler.join()
            import psutil

            self.rss_mb = max(self._max, psutil.Process().memory_info().rss) / 2**20
        if self._cuda:
            torch.cuda.synchronize()
            self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20


def _cuda_ready() -> bool:
    if "torch" not in sys.modules:
        return False

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def measure(group: str, name: str, fn: Callable[[], list[Result] | Result], log=print) -> list[Result]:
    """Run one measurement with peak-memory tracking. NotAvailable becomes a row that says why; any other
    exception becomes a row with `failed=True` naming the error (the other measurements still run)."""
    t0 = time.perf_counter()
    try:
        with PeakMemory() as mem:
            out = fn()
        rows = out if isinstance(out, list) else [out]
        for r in rows:
            if r.peak_mb is None and r.available:
                r.peak_mb = mem.cuda_mb if (mem.cuda_mb and r.group == "GPU") else mem.rss_mb
    except NotAvailable as e:
        rows = [Result(group, name, note=f"not available: {e}")]
    except Exception as e:  # a broken measurement must not hide the others
        tb = traceback.extract_tb(e.__traceback__)[-1]
        rows = [Result(group, name, note=f"failed: {type(e).__name__}: {e} "
                                         f"({Path(tb.filename).name}:{tb.lineno})", failed=True)]
    log(f"  {name}: {time.perf_counter() - t0:.1f} s")
    return rows


def timed(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> tuple[Any, float]:
    if sync:
        sync()
    t0 = time.perf_counter()
    out = fn()
    if sync:
        sync()
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------- the demo chain

def chain_rows(chain_json: str | os.PathLike) -> list[Result]:
    """Wall time of each notebook of the last demo chain, as recorded by `bmj reproduce` in chain.json."""
    path = resolve(chain_json)
    if not path.exists():
        raise NotAvailable(f"{chain_json} does not exist: run `bmj reproduce --profile demo` first")
    state = json.loads(path.read_text())
    steps = sorted(k for k, v in state.items() if isinstance(v, dict) and "seconds" in v)
    if not steps:
        raise NotAvailable(f"{chain_json} records no completed step")
    rows = [Result("Demo chain", f"notebook {s}", float(state[s]["seconds"]), "s",
                   note=f"finished {state[s].get('finished', '?')}") for s in steps]
    total = sum(r.value for r in rows)
    note = f"{len(steps)} steps from {chain_json}"
    span = _span_seconds([state[s] for s in steps])
    if span is not None and span > total + CHAIN_SLACK_S:
        # a rerun redoes only what changed: the steps' last runs are then from several runs of the chain
        note += (f"; the steps last ran in more than one run ({span:,.0f} s from the first start to the last end): "
                 "not one run's wall time (`bmj reproduce --profile demo` into an empty folder measures that)")
    rows.append(Result("Demo chain", "demo chain total", total, "s", compare="budget 1800 s", note=note))
    return rows


CHAIN_SLACK_S = 300  # kernel start-ups and bookkeeping between steps of one run


def _span_seconds(records: list[dict]) -> float | None:
    """Seconds from the first step's start (finished - seconds) to the last step's end; None without times."""
    try:
        ends = [time.mktime(time.strptime(r["finished"], STAMP_FORMAT)) for r in records]
    except (KeyError, TypeError, ValueError):
        return None
    return max(ends) - min(e - float(r["seconds"]) for e, r in zip(ends, records))


# --------------------------------------------------------------------------- the table

def _fmt(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def machine_info() -> dict[str, str]:
    import importlib.metadata as md

    import psutil

    info = {
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "cpu": f"{_cpu_model()}; {os.cpu_count()} logical cores visible, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'} usable",
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "load average (1/5/15 min) at the end": " / ".join(f"{x:.1f}" for x in os.getloadavg())
        if hasattr(os, "getloadavg") else "unknown",
    }
    try:
        import torch

        info["torch threads"] = str(torch.get_num_threads())
        info["gpu"] = (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                       if torch.cuda.is_available() else "none (torch.cuda.is_available() is False)")
    except ImportError:
        info["gpu"] = "torch not installed"
    versions = []
    for p in PACKAGES:
        try:
            versions.append(f"{p} {md.version(p)}")
        except md.PackageNotFoundError:
            versions.append(f"{p} (not installed)")
    info["packages"] = ", ".join(versions)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bmjlib"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        info["bmjlib commit"] = (commit + (" (+ uncommitted changes in bmjlib/)" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["bmjlib commit"] = "unknown"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def render_markdown(rows: list[Result], meta: dict[str, str], command: str, seconds: float) -> str:
    lines = ["# Benchmarks", "",
             f"Command: `{command}` (finished {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
             f"{seconds:.0f} s in all).", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| group | measurement | value | unit | compared with | peak memory (MB) | notes |",
              "|---|---|---:|---|---|---:|---|"]
    for g in GROUPS:
        for r in (r for r in rows if r.group == g):
            note = r.note.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r.group} | {r.name} | {_fmt(r.value)} | {r.unit} | {r.compare} | "
                         f"{_fmt(r.peak_mb) if r.available else ''} | {note} |")
    lines += ["", "Peak memory: the process's peak resident set during that measurement (CUDA allocator peak "
              "for GPU rows), including what the process already held. `n/a` rows did not run; the note "
              "says why. Every number is a measurement of this run on the machine above.", ""]
    return "\n".join(lines)


def render_text(rows: list[Result]) -> str:
    cols = [["group", "measurement", "value", "unit", "compared with", "peak MB", "notes"]]
    for r in rows:
        cols.append([r.group, r.name, _fmt(r.value), r.unit, r.compare,
                     _fmt(r.peak_mb) if r.available else "", r.note[:90]])
    widths = [max(len(c[i]) for c in cols) for i in range(len(cols[0]))]
    out = []
    for j, c in enumerate(cols):
        out.append("  ".join(s.ljust(w) for s, w in zip(c, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
