"""The measurements behind `bmj bench`, one function per row group; see bmjlib/bench/core.py.

Each step's own module owns its `benchmark()` (phantom, registration, progression); this module calls it,
and measures the model itself (training with cached vs on-the-fly encoding, DPM-Solver++ 20 steps vs
100-step sampling at equal fidelity, scaling with image and batch size) through bmjlib.model.pipeline and
bmjlib.model.train. Only the GPU timings can be legitimately unavailable (no GPU, or `--gpu` not asked):
their `NotAvailable` becomes a row that says why.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pandas as pd
import torch
from diffusers import AutoencoderKL
from skimage.metrics import structural_similarity

from bmjlib.bench.core import BenchConfig, NotAvailable, Result
from bmjlib.bench.gpu import Arm, Parts, flops_row, gpu_rows, train_rate
from bmjlib.data.registration import RegConfig, register_pair, set_itk_threads
from bmjlib.bench.registration import compare as compare_registration
from bmjlib.data.registration_eval import phantom_pairs
from bmjlib.data.sources import mimic_report_path
from bmjlib.io import read_image, resize_image
from bmjlib.model.configs import DEMO_CLIP_CONFIG, DEMO_UNET_CONFIG, DEMO_VAE_CONFIG, vae_downsampling
from bmjlib.model.demo_model import DemoModelError, resolve_model
from bmjlib.model.encoders import TextEncoder
from bmjlib.model.latents import build_cache
from bmjlib.model.pipeline import BiomedJourneyPipeline, to_batch, train_scheduler
from bmjlib.model.stages import unet_config
from bmjlib.model.train import diffusion_loss
from bmjlib.phantom.cohort import write_cohort
from bmjlib.runtime import run_threads, side_by_side, use_run_threads
from bmjlib.text.progression import benchmark as progression_benchmark
from bmjlib.text.progression import synthesise


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


# --------------------------------------------------------------------------- shared inputs

def cohort(ctx: Context) -> Path:
    """A small phantom cohort (bmjlib.phantom.cohort.write_cohort) in the bench's temporary folder; its own
    summary is the phantom row's measurement."""
    if "cohort" not in ctx._cache:
        cfg = ctx.cfg
        n_patients = max(3, cfg.phantom_images // 4)
        out = ctx.tmp / "phantom"
        summary = write_cohort(out, n_patients=n_patients, size=cfg.phantom_size, seed=cfg.seed, workers=None)
        ctx._cache["cohort"] = (out, summary)
    return ctx._cache["cohort"][0]


def truth_pairs(ctx: Context):
    """Truly-PA phantom pairs with image paths, the progression sentence (offline synthesiser, from the
    two reports) and the path of the true counterfactual."""
    if "pairs" not in ctx._cache:
        root = cohort(ctx)
        tp = phantom_pairs(root)
        tp = tp[~tp["any_mislabeled"].astype(str).str.lower().isin(["true", "1"])].reset_index(drop=True)
        rep = lambda s, st: mimic_report_path(root / "mimic", s, st).read_text()
        tp["description"] = [synthesise(rep(s, a), rep(s, b)) for s, a, b in
                             zip(tp["subject_id"], tp["prior_study_id"], tp["followup_study_id"])]
        tp["truth_path"] = [str(root / "truth" / c) for c in tp["counterfactual_path"]]
        ctx._cache["pairs"] = tp
    return ctx._cache["pairs"]


# --------------------------------------------------------------------------- other modules' benchmarks

def phantom_rate(ctx: Context) -> Result:
    cohort(ctx)
    s = ctx._cache["cohort"][1]
    return Result("Throughput", "phantom images/s", float(s["images_per_s"]), "images/s",
                  note=f"bmjlib.phantom.cohort.write_cohort: {s['images']} images ({s['patients']} patients, "
                       f"masks and true counterfactuals included) at {s['size']} px, all cores, {s['seconds']} s",
                  extra=dict(s))


def registration_rate(ctx: Context) -> Result:
    """Ours vs ProgEmu's configuration on the bench's phantom (256 px images), each at its own resolution and at
    the other's, with bootstrap intervals (`bench.registration.compare`); the 50-pair table on 512 px images is
    `python -m bmjlib.bench.registration` (figures/table_registration_benchmark.md)."""
    cfg = ctx.cfg
    res = compare_registration(cohort(ctx), n_pairs=cfg.reg_pairs, seed=cfg.seed, log=None)
    arms, comp = res["arms"], res["comparisons"].set_index("comparison")
    ours = arms[(arms["method"] == "ours") & (arms["resolution"] == "its own")].iloc[0]
    pe = arms[(arms["method"] != "ours") & (arms["resolution"] == "its own")].iloc[0]
    ratio = lambda r: f"{r['speed_ratio']:.1f}x [{r['speed_ratio_lo']:.1f}, {r['speed_ratio_hi']:.1f}]"
    same = [f"{k.split(', ')[-1]}: {ratio(r)}" for k, r in comp.iterrows() if k.startswith("same")]
    return Result("Throughput", "registration pairs/s", float(ours["pairs_per_s"]), "pairs/s",
                  compare=(f"ProgEmu config at {pe['resolution_px']} px {pe['pairs_per_s']:.3g} pairs/s; ours / ProgEmu "
                           f"each at its own resolution {ratio(comp.iloc[0])}, same resolution " + "; ".join(same)),
                  note=f"bmjlib.bench.registration: the same {len(res['result']['per_pair']['pair_id'].unique())} "
                       f"truly-PA pairs ({res['result']['phantom_size']} px images), 1 ITK thread, 95 % bootstrap "
                       f"intervals; TRE ours {ours['tre_mean_px256']:.2f} vs ProgEmu {pe['tre_mean_px256']:.2f} px @256 "
                       "(each at its own resolution)",
                  extra={"arms": arms.to_dict("records"), "comparisons": res["comparisons"].to_dict("records")})


def description_rate(ctx: Context) -> Result:
    cfg = ctx.cfg
    res = progression_benchmark(n_offline=cfg.descriptions, n_api=max(8, cfg.descriptions // 50), log=lambda m: None)
    return Result("Throughput", "offline descriptions/s", res["offline_pairs_per_s"], "descriptions/s",
                  compare=(f"API path {res['api_pairs_per_s']:.3g}/s (openai client -> loopback server, "
                           f"{res['api_latency_s'] * 1000:.0f} ms/answer, {res['api_concurrency']} in flight)"),
                  note=f"bmjlib.text.progression.benchmark: {cfg.descriptions} distinct report pairs, offline synthesiser",
                  extra=res)


def registration_scaling(ctx: Context) -> list[Result]:
    cfg = ctx.cfg
    tp = truth_pairs(ctx).head(cfg.scale_reg_pairs)
    set_itk_threads(1)
    rows = []
    for size in cfg.scale_sizes:
        rc = replace(RegConfig(), size=size)
        t0 = time.perf_counter()
        for r in tp.itertuples(index=False):
            register_pair(r.prior_path, r.followup_path, rc)
        dt = (time.perf_counter() - t0) / len(tp)
        rows.append(Result("Scaling", f"registration at {size} px", dt, "s/pair",
                           note=f"our configuration at {size} px ({len(tp)} pairs, 1 ITK thread)"))
    return rows


# --------------------------------------------------------------------------- the model

def random_pipeline(image_size: int = 64, seed: int = 0):
    """The demo-scale model (demo VAE, demo CLIP text tower, demo UNet) with random weights: the same
    computation as the trained model, for timings that must not depend on a training run."""
    torch.manual_seed(seed)
    cfg = {k: v for k, v in DEMO_CLIP_CONFIG.items() if k != "custom_text"}
    enc = TextEncoder(open_clip.CustomTextCLIP(**cfg),
                      open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"]),
                      DEMO_CLIP_CONFIG, "demo-clip")
    vae = AutoencoderKL(**DEMO_VAE_CONFIG).eval().requires_grad_(False)
    return BiomedJourneyPipeline.build(vae, enc, image_size=image_size)


def trained_model(ctx: Context):
    """(pipeline, where from) for the fidelity comparison: the configured model, else None."""
    name = ctx.cfg.model
    try:
        path = resolve_model(name)
    except DemoModelError as e:
        return None, f"no trained model ({type(e).__name__}: the shipped demo model is missing or changed)"
    if not (path / "bmj_pipeline.json").is_file():
        return None, f"{path} is not a saved pipeline"
    return BiomedJourneyPipeline.from_pretrained(path), f"model '{name}'"


def _train_arm(pipe, rows, batch: int, steps: int, cached: bool, tmp: Path,
               fused: bool = True) -> tuple[float, float, float]:
    """Samples/s of `steps` optimisation steps (after one warm-up), the last loss, and the cache build time;
    AdamW fused as the trainer's default (`fused` False: torch's per-tensor loop)."""
    unet, proj = pipe.unet.train().requires_grad_(True), pipe.projection.train().requires_grad_(True)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(proj.parameters()), lr=1e-4, fused=fused)
    sched = train_scheduler(pipe.scheduler_config)
    size = pipe.image_size
    t0 = time.perf_counter()
    data = build_cache(pipe, rows, tmp, size, margin=0, dummy_prior=False, progress=False) if cached else None
    cache_s = time.perf_counter() - t0
    null = pipe.text_encoder.encode([pipe.null_prompt])
    n = len(rows)

    def step(k: int) -> float:
        g = torch.Generator().manual_seed(k)
        idx = torch.randint(0, n, (batch,), generator=g)
        if cached:
            b = data.batch(idx, g, hflip=True, device="cpu")
        else:  # what training without the cache does: read, resize and encode every image and sentence
            sel = rows.iloc[idx.tolist()]
            tg = torch.cat([to_batch(read_image(p), size) for p in sel["target_path"]])
            pr = torch.cat([to_batch(read_image(p), size) for p in sel["prior_path"]])
            b = {"target": pipe.encode_images(tg), "prior": pipe.encode_prior(pr),
                 "text": pipe.text_encoder.encode(list(sel["text"]))}
        b["null"] = null
        loss = diffusion_loss(unet, proj, sched, b, g, 0.05)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step(-1)
    t0 = time.perf_counter()
    for k in range(steps):
        loss = step(k)
    dt = time.perf_counter() - t0
    unet.eval().requires_grad_(False)
    proj.eval().requires_grad_(False)
    return batch * steps / dt, loss, cache_s


def _train_rows(ctx: Context):
    tp = truth_pairs(ctx)
    return pd.DataFrame({"prior_path": tp["prior_path"], "target_path": tp["followup_path"],
                         "text": tp["description"]})


def training_cached(ctx: Context) -> list[Result]:
    cfg = ctx.cfg
    rows = _train_rows(ctx)
    pipe = random_pipeline(cfg.image_size, cfg.seed)
    cached, loss_c, cache_s = _train_arm(pipe, rows, cfg.train_batch, cfg.train_steps, True, ctx.tmp / "lat")
    fly, loss_f, _ = _train_arm(pipe, rows, cfg.train_batch, cfg.train_steps, False, ctx.tmp / "lat")
    note = (f"demo model (random weights), {cfg.image_size} px, batch {cfg.train_batch}, {cfg.train_steps} steps "
            f"each, stage-2 triples from the phantom; cache of {len(rows)} pairs built once in {cache_s:.1f} s")
    return [Result("Throughput", "training samples/s, cached latents + text states", cached, "samples/s",
                   compare=f"on the fly {fly:.3g} samples/s (cached {cached / fly:.1f}x)", note=note,
                   extra={"cached": cached, "on_the_fly": fly, "cache_seconds": cache_s,
                          "loss_cached": loss_c, "loss_on_the_fly": loss_f}),
            Result("Throughput", "training samples/s, VAE + text encoder on the fly", fly, "samples/s",
                   note="same model, same run, same pairs")]


def training_fused_adamw(ctx: Context) -> list[Result]:
    """The trainer's fused AdamW against torch's per-tensor AdamW, alternated twice in one run (so a drift in the
    machine's speed falls on both); the faster of each pair of runs is compared."""
    cfg = ctx.cfg
    rows = _train_rows(ctx)
    rates: dict[bool, list[float]] = {False: [], True: []}
    for fused in (False, True, False, True):
        rate, _, _ = _train_arm(random_pipeline(cfg.image_size, cfg.seed), rows, cfg.train_batch, cfg.train_steps,
                                True, ctx.tmp / "lat", fused=fused)
        rates[fused].append(rate)
    loop, fused = max(rates[False]), max(rates[True])
    return [Result("Throughput", "training with fused AdamW (speed-up)", fused / loop, "x",
                   compare=f"per-tensor AdamW {loop:.3g} samples/s, fused {fused:.3g} samples/s",
                   note=f"demo model (random weights), {cfg.image_size} px, batch {cfg.train_batch}, "
                        f"{cfg.train_steps} steps per run, cached latents, {run_threads()} thread(s)",
                   extra={"per_tensor": rates[False], "fused": rates[True]})]


def _training_seconds(image_size: int, seed: int, rows: pd.DataFrame, cache: Path, batch: int, steps: int) -> float:
    """Wall seconds of one training of `steps` steps of a random demo model on an encoded cache (a job that
    `side_by_side` can run in a worker)."""
    t0 = time.perf_counter()
    _train_arm(random_pipeline(image_size, seed), rows, batch, steps, True, cache)
    return time.perf_counter() - t0


def training_side_by_side(ctx: Context) -> list[Result]:
    """Two independent trainings (notebook 05's stage 2 and one-stage arm, 08's arms) one after the other on every
    thread of the run, then side by side (`runtime.side_by_side`), in one run."""
    cfg = ctx.cfg
    n = run_threads()
    if n < 2:
        raise NotAvailable("one thread: nothing runs side by side")
    rows, cache = _train_rows(ctx), ctx.tmp / "lat"
    steps = 10 * cfg.train_steps
    job = (_training_seconds, cfg.image_size, cfg.seed, rows, cache, cfg.train_batch, steps)
    _training_seconds(*job[1:-1], 1)  # encodes the cache: the jobs then only read it
    use_run_threads()
    t0 = time.perf_counter()
    alone = [_training_seconds(*job[1:]) for _ in range(2)]
    after = time.perf_counter() - t0
    t0 = time.perf_counter()
    both = side_by_side({"first": job, "second": job})
    beside = time.perf_counter() - t0
    return [Result("Throughput", "two trainings side by side (speed-up)", after / beside, "x",
                   compare=f"one after the other on {n} threads {after:.1f} s; side by side {beside:.1f} s, "
                           f"starting the workers included (each training {min(both.values()):.1f}-"
                           f"{max(both.values()):.1f} s at {n // 2} thread(s), {min(alone):.1f} s alone on {n}: "
                           f"{sum(alone) / max(both.values()):.2f}x once the workers run)",
                   note=f"demo model (random weights), {cfg.image_size} px, batch {cfg.train_batch}, {steps} steps "
                        "each, cached latents",
                   extra={"one_after_the_other_s": after, "side_by_side_s": beside, "threads": n,
                          "each_alone_s": alone, "each_side_by_side_s": list(both.values())})]


# The trainer's speed options (`TrainConfig` fields) tried on the CPU; the first is the CPU default (fp32).
CPU_SPEED_ARMS = [Arm("fp32 (the trainer's CPU default)", dict(mixed_precision="no")),
                  Arm("bf16 autocast", dict(mixed_precision="bf16")),
                  Arm("channels_last", dict(mixed_precision="no", channels_last=True)),
                  Arm("torch.compile", dict(mixed_precision="no", compile="inductor"))]


def demo_parts(image_size: int, seed: int = 0) -> Parts:
    """The demo UNet and text projection at `image_size` (random weights) with encoders that only make its
    inputs: the demo VAE's layout on 3 channels (Parts feeds RGB) and a text transformer of the demo tower's size."""
    text = DEMO_CLIP_CONFIG["text_cfg"]
    vae = dict(DEMO_VAE_CONFIG, in_channels=3, out_channels=3)
    return Parts("cpu", unet_config("demo", image_size, vae_downsampling(vae)), vae,
                 dict(context_length=text["context_length"], vocab_size=1000, width=text["width"],
                      heads=text["heads"], layers=1, output_dim=DEMO_UNET_CONFIG["cross_attention_dim"]),
                 image_size, seed=seed)


def training_speed_options(ctx: Context) -> list[Result]:
    """The trainer's own step (`Trainer.step`) on the demo UNet at the demo profile's batch with each speed option
    of CPU_SPEED_ARMS, in one run, against fp32 measured first and last (the faster of the two). Whether
    any of them would shorten the demo chain's training on this CPU; torch.compile (a minute or two of compiling)
    only in the full bench."""
    cfg = ctx.cfg
    threads = use_run_threads()
    arms = [a for a in CPU_SPEED_ARMS if cfg.speed_compile or "compile" not in a.options]
    base_arm = arms[0]
    rates: dict[str, float] = {}
    losses: dict[str, float] = {}
    for arm in arms + [base_arm]:
        rate, loss = train_rate(demo_parts(cfg.image_size, cfg.seed), arm, cfg.speed_batch, cfg.speed_steps,
                                seed=cfg.seed)
        rates[arm.name] = max(rate, rates.get(arm.name, 0.0))
        losses[arm.name] = loss
    base = rates[base_arm.name]
    what = (f"demo UNet (random weights), {cfg.image_size} px, batch {cfg.speed_batch}, {cfg.speed_steps} steps "
            f"after 2 warm-up, {threads} thread(s); the trainer's step on latents encoded once")
    return [Result("Throughput", f"training samples/s on this CPU: {a.name}", rates[a.name], "samples/s",
                   compare="" if a is base_arm else f"{rates[a.name] / base:.2f}x fp32",
                   note=what if a is base_arm else f"same model and batch; last loss {losses[a.name]:.3f}",
                   extra={"speedup": rates[a.name] / base, "loss": losses[a.name]})
            for a in arms]


def training_batch_scaling(ctx: Context) -> list[Result]:
    cfg = ctx.cfg
    rows = _train_rows(ctx)
    pipe = random_pipeline(cfg.image_size, cfg.seed)
    out = []
    for b in cfg.train_batches:
        rate, _, _ = _train_arm(pipe, rows, b, max(2, cfg.train_steps // 2), True, ctx.tmp / "lat")
        out.append(Result("Scaling", f"training samples/s at batch {b}", rate, "samples/s",
                          note=f"cached latents, demo model, {cfg.image_size} px"))
    return out


def sampler_rates(ctx: Context) -> list[Result]:
    """DPM-Solver++ (fast_steps) vs Euler (slow_steps) on the same priors, with SSIM to the true counterfactual."""
    cfg = ctx.cfg
    pipe, source = trained_model(ctx)
    trained = pipe is not None
    if not trained:
        pipe = random_pipeline(cfg.image_size, cfg.seed)
    tp = truth_pairs(ctx).head(cfg.gen_pairs)
    priors = np.stack([read_image(p) for p in tp["prior_path"]])
    size = pipe.image_size
    truth = np.stack([resize_image(read_image(p), size) for p in tp["truth_path"]])
    rows = []
    for sched, steps in (("dpm", cfg.fast_steps), ("euler", cfg.slow_steps)):
        pipe(priors[:1], list(tp["description"])[:1], steps=2, scheduler=sched)  # warm-up
        t0 = time.perf_counter()
        out = pipe(priors, list(tp["description"]), steps=steps, scheduler=sched, seed=cfg.seed)
        rate = len(out) / (time.perf_counter() - t0)
        ssim = float(np.mean([structural_similarity(a, b, data_range=1.0) for a, b in zip(out, truth)]))
        rows.append((sched, steps, rate, ssim))
    (_, fs, fr, fss), (_, ss, sr, sss) = rows
    fid = (lambda x: f"SSIM to true counterfactual {x:.3f}") if trained else \
          (lambda x: f"SSIM {x:.3f} (random weights: {source}; not a fidelity figure)")
    what = f"{source}, {size} px, {len(tp)} phantom pairs, batch {len(tp)}, dual guidance 7.5 / 1.5"
    return [Result("Throughput", f"counterfactuals/s, DPM-Solver++ {fs} steps", fr, "images/s",
                   compare=f"{sr:.3g}/s at {ss} steps ({fr / sr:.1f}x)", note=f"{fid(fss)}; {what}",
                   extra={"ssim": fss, "trained": trained}),
            Result("Throughput", f"counterfactuals/s, Euler {ss} steps (InstructPix2Pix length)", sr, "images/s",
                   note=f"{fid(sss)}; same priors, sentences and seeds", extra={"ssim": sss, "trained": trained})]


def generation_scaling(ctx: Context) -> list[Result]:
    """Seconds per counterfactual at each image size (random-weight demo model: the UNet is convolutional,
    so the same network runs at any size; the cost, not the picture, is the point)."""
    cfg = ctx.cfg
    rows = []
    pipe = random_pipeline(64, cfg.seed)
    for size in cfg.scale_sizes:
        pipe.image_size = size
        prior = np.full((size, size), 0.5, np.float32)
        pipe(prior, "x", steps=1)  # warm-up
        t0 = time.perf_counter()
        pipe(prior, "new small left pleural effusion", steps=cfg.scale_gen_steps, seed=cfg.seed)
        dt = time.perf_counter() - t0
        rows.append(Result("Scaling", f"generation at {size} px", dt, "s/image",
                           note=f"{cfg.scale_gen_steps} DPM-Solver++ steps (3 UNet evaluations each) + VAE, "
                                f"demo model architecture, batch 1"))
    return rows


def gpu_section(cfg: BenchConfig, requested: bool) -> list[Result]:
    """The FLOP count (no GPU needed), then the GPU timings or a row that says why there are none."""
    rows = [flops_row(cfg)]
    try:
        rows += gpu_rows(cfg, requested)
    except NotAvailable as e:
        rows.append(Result("GPU", "GPU training and sampling timings", note=f"not available: {e}"))
    return rows
