"""The counterfactual explorer: pick a prior, type a hypothesis, see the counterfactual and what changed.

BiomedJourney's release planned a demo app (paper §1, §6); this one lives in JupyterLab
(notebooks/explorer.ipynb). A prior comes from the phantom (rendered on the fly, with its true organ
masks), from a file, or from the real radiographs in ../shared/real_cxr/hannover (CC BY 3.0, attribution
shown beside the image); a progression description is typed or picked; the text and image guidance
scales (paper §4.2: s_T, s_I), the number of DPM-Solver++ steps and the seed are set; the prior, the
counterfactual, the difference heat map (bmjlib.icg.interpret.difference_map) and the interpretation text
(ProgEmu-style changes-of-findings, bmjlib.icg.interpret) appear side by side. One click sweeps one
finding's severity (small / moderate / large), the journey of the paper's Fig. 9.

Generation runs in a worker thread and reports each sampling step to a progress bar, so the notebook
stays responsive. `sample()` is the pipeline's own sampling loop (BiomedJourneyPipeline._sample) with a
per-step callback; a test checks that both give identical images. Settings the pipeline refuses (guidance
scales that are not finite numbers >= 0, steps outside 1..1000, a negative seed) are named in the status
line and nothing is generated; a description longer than the text encoder reads is said to be cut.
"""
from __future__ import annotations

import html
import io
import pickle
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ipywidgets as W
import numpy as np
import pandas as pd
from matplotlib import colormaps
from PIL import Image

from bmjlib.data.registration_eval import phantom_pairs
from bmjlib.icg import interpret as I
from bmjlib.icg.interpret import difference_map, resize_masks, to_common_size
from bmjlib.icg.interpret_run import TruthMasks, collect_evidence
from bmjlib.io import (atomic_write_bytes, code_fingerprint_of, fingerprint, read_image, resize_image, sha256_file,
                       to_uint8)
from bmjlib.model.demo_model import cache_root, resolve_model
from bmjlib.model.generate import default_guidance, load_pipeline
from bmjlib.model.pipeline import check_sampling
from bmjlib.phantom.anatomy import render
from bmjlib.phantom.cohort import state_from_record, plan_patient
from bmjlib.runtime import resolve
from bmjlib.schema import FINDING_KEYS, FINDINGS, HANNOVER_ATTRIBUTION, SEVERITY_WORDS
from bmjlib.text.progression import SUGGESTIONS

HANNOVER_DIR = "../shared/real_cxr/hannover"


SWEEP_FINDINGS = {"Pleural Effusion": "pleural effusion", "Pneumothorax": "pneumothorax",
                  "Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Edema": "pulmonary edema"}
_GRADES = {1: "mild", 2: "moderate", 3: "severe"}


def sweep_prompts(finding: str, side: str = "left") -> list[str]:
    """The severity sweep of one finding (Fig. 9): 'New small left pleural effusion.' ... 'large'."""
    if finding not in SWEEP_FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; choose one of {list(SWEEP_FINDINGS)}")
    words = SEVERITY_WORDS if finding in ("Pleural Effusion", "Pneumothorax") else _GRADES
    lateral = finding in ("Pleural Effusion", "Pneumothorax", "Atelectasis")
    noun = f"{side} {SWEEP_FINDINGS[finding]}" if lateral and side else SWEEP_FINDINGS[finding]
    return [f"New {words[k]} {noun}." for k in (1, 2, 3)]


# --------------------------------------------------------------------------- priors

@dataclass
class Prior:
    image: np.ndarray                  # float32 H,W in [0,1]
    label: str
    attribution: str = ""
    masks: dict | None = None          # organ -> bool H,W (phantom truth), else None
    labels: dict | None = None         # finding -> 1.0 / 0.0 on the prior (phantom truth), else None


def real_images(folder: str | Path = HANNOVER_DIR) -> list[tuple[str, Path]]:
    """(label, path) of the real radiographs shipped beside the repository, from their MANIFEST.csv."""
    root = resolve(folder)
    if not (root / "data.csv").is_file():
        return []
    meta = pd.read_csv(root / "data.csv", dtype=str, keep_default_na=False)
    out = []
    for r in meta.itertuples(index=False):
        p = root / "png" / f"{r.image_id}.png"
        if p.is_file():
            out.append((f"{r.image_id} (patient {r.patient_id}, {r.projection.upper()}, {r.sex or '?'})", p))
    return out


def phantom_prior(index: int = 0, size: int = 256, seed: int = 0) -> Prior:
    """The first PA image of phantom patient `index` (cohort seed `seed`), rendered now, with its true masks."""
    plan = plan_patient(seed, index, size)
    for st in plan["studies"]:
        for im in st["images"]:
            if im["view_true"] == "PA":
                img, masks = render(plan["patient"], state_from_record(st["state"]), im["pose"], im["exposure"],
                                    view="PA", size=size, noise_seed=im["noise_seed"], devices=st["devices"],
                                    masks=True)
                state = ", ".join(f"{k} {v[0]}{' ' + v[1] if v[1] else ''}" for k, v in st["state"].items() if v[0])
                return Prior(img.astype(np.float32) / 255.0,
                             f"phantom patient {index} (seed {seed}), study 1: {state or 'no findings'}",
                             "synthetic (bmjlib.phantom.cohort)", masks,
                             {f: float(st["state"][FINDING_KEYS[f]][0] > 0) for f in FINDINGS})
    raise ValueError(f"phantom patient {index} has no PA image; try another index")


def file_prior(path: str | Path) -> Prior:
    p = resolve(path)
    return Prior(read_image(p), p.name)


def real_prior(path: str | Path) -> Prior:
    return Prior(read_image(path), Path(path).name, HANNOVER_ATTRIBUTION)


# --------------------------------------------------------------------------- sampling with progress

def sample(pipe, prior: np.ndarray, prompts: list[str], text_scale: float | None = None,
           image_scale: float | None = None, steps: int = 20, scheduler: str = "dpm", seed: int = 0,
           callback: Callable[[int, int], None] | None = None) -> np.ndarray:
    """One batch of counterfactuals (one prior, N prompts) -> N,H,W in [0,1]; callback(step, steps) after
    each denoising step, so the widget's progress bar moves while the pipeline samples. Scales left None are
    the model's defaults (its guidance.json, else InstructPix2Pix's), as in `bmj generate`."""
    return pipe(prior, list(prompts), text_scale=text_scale, image_scale=image_scale, steps=steps,
                scheduler=scheduler, seed=seed, batch_size=max(1, len(prompts)), callback=callback)


# --------------------------------------------------------------------------- what changed

def heatmap_rgb(prior: np.ndarray, cf: np.ndarray, masks: dict | None = None) -> np.ndarray:
    """The difference heat map (red = more opaque in the counterfactual, blue = more lucent) as uint8 RGB."""
    p, c = to_common_size(prior, cf)
    body = None
    if masks is not None:
        m = resize_masks(masks, p.shape)
        body = m["left_lung"] | m["right_lung"] | m["heart"]
    d = difference_map(p, c, body=body)
    lim = max(float(np.percentile(np.abs(d), 99.5)), 0.05)
    rgb = colormaps["RdBu_r"]((np.clip(d / lim, -1, 1) + 1) / 2)[..., :3]
    return (rgb * 255).astype(np.uint8)


def describe_change(prior: np.ndarray, cf: np.ndarray, masks: dict | None, interpreter=None,
                    labels: dict | None = None) -> str:
    """The interpretation text: the calibrated interpreter's sentence when one is given (`labels`, the
    prior's findings where known, decide new / worse and rule out lessening what was not there), else the
    measured regional changes; without organ masks only the heat map can be shown (said so)."""
    if masks is None:
        return ("No organ masks for this prior (only phantom priors carry their true masks), so the change "
                "cannot be measured per region; read the heat map.")
    p, c = I.to_common_size(prior, cf)
    if interpreter is not None and p.shape[0] > 64:  # measured at the calibration's size
        p, c = resize_image(p, 64), resize_image(c, 64)
    ev = I.evidence(p, c, masks)
    if interpreter is not None:
        return I.sentence(interpreter.interpret(ev, labels))
    regional = {k: ev[k] for k in ("opac_lower_left", "opac_lower_right", "opac_middle_left", "opac_middle_right",
                                   "lucent_upper_left", "lucent_upper_right", "opac_perihilar", "heart_rim")}
    top = sorted(regional.items(), key=lambda kv: -abs(kv[1]))[:3]
    parts = [f"{k.replace('_', ' ')} {v:+.3f}" for k, v in top]
    return ("Largest regional changes (mean difference, + = more opaque; no calibrated interpreter loaded): "
            + "; ".join(parts) + ".")


PHANTOM_RUNS = ("runs/demo/00_phantom", "runs/ship/00_phantom", "runs/smoke/00_phantom")


def find_phantom() -> Path | None:
    """A phantom cohort already written by a chain run (its truth calibrates the interpreter), or None."""
    for d in PHANTOM_RUNS:
        p = resolve(d)
        if (p / "truth" / "pairs.csv").is_file() and (p / "truth" / "images.csv").is_file():
            return p
    return None


def calibrate_interpreter(phantom_dir: str | Path, n: int = 300, size: int = 64, seed: int = 0):
    """Fit bmjlib.icg.interpret.Interpreter on the phantom's truth: each prior against its TRUE counterfactual
    (the same patient and pose with the follow-up's disease), true organ masks, known change per finding."""
    root = Path(phantom_dir)
    tp = phantom_pairs(root)
    tp = tp[~tp["any_mislabeled"].astype(str).str.lower().isin(["true", "1"])]
    tp = tp.sample(n=min(n, len(tp)), random_state=seed)
    cfs = [str(root / "truth" / c) for c in tp["counterfactual_path"]]
    evs, kept, _ = collect_evidence(tp, cfs, None, TruthMasks(root / "truth"), size, desc="calibrating")
    truth = I.truth_directions(kept, pd.read_csv(root / "truth" / "images.csv", dtype={"dicom_id": str}))
    return I.Interpreter().fit(evs, truth, kept["pair_id"].tolist())


def cached_interpreter(phantom_dir: str | Path):
    """calibrate_interpreter, kept (pickled) in the bmjlib cache, keyed by the phantom truth's sha256 and the
    code that calibrates (this module and all it imports from the package)."""
    root = Path(phantom_dir)
    key = fingerprint(sha256_file(root / "truth" / "images.csv"), sha256_file(root / "truth" / "pairs.csv"),
                      code_fingerprint_of(__name__))
    f = cache_root() / f"interpreter-{key[:32]}.pkl"
    if f.is_file():
        try:
            return pickle.loads(f.read_bytes())
        except Exception:  # a stale or damaged cache entry is recomputed
            pass
    interp = calibrate_interpreter(root)
    atomic_write_bytes(f, pickle.dumps(interp))
    return interp


def png_bytes(img: np.ndarray) -> bytes:
    arr = img if img.dtype == np.uint8 else to_uint8(img)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- the widgets

class Explorer:
    """The ipywidgets app. `Explorer(model="demo").widget` is what the notebook displays."""

    def __init__(self, model: str = "demo", phantom_size: int = 256, interpreter="auto", display_px: int = 256):
        self.model_name = model
        self.pipe = None
        self.interpreter = interpreter
        self.phantom_size = phantom_size
        self.px = f"{display_px}px"
        self.prior: Prior | None = None
        self.result: np.ndarray | None = None
        self._thread: threading.Thread | None = None
        reals = real_images()
        self.source = W.ToggleButtons(options=["phantom", "real", "file"], value="phantom", description="prior")
        # patient 7: the first phantom patient whose first study has no finding, so the default sentence (a new
        # small left effusion) asks for a change the prior does not already show
        self.phantom_index = W.BoundedIntText(value=7, min=0, max=100000, description="patient")
        self.real = W.Dropdown(options=[(lab, str(p)) for lab, p in reals] or [("(none found)", "")],
                               description="image", layout=W.Layout(width="420px"))
        self.path = W.Text(placeholder="path/to/prior.png (PNG, JPEG or DICOM)", description="file")
        self.load_btn = W.Button(description="load prior", icon="image")
        self.prompt = W.Combobox(value=SUGGESTIONS[0], options=SUGGESTIONS, description="description",
                                 ensure_option=False, layout=W.Layout(width="520px"))

        self.model_dir = resolve_model(model)  # verified once; load_model reads it from here
        ts, isc = default_guidance(self.model_dir)  # the model's own (chosen on validation pairs), else IP2P's
        self.text_scale = W.FloatSlider(value=ts, min=0, max=max(15, ts), step=0.5, description="text scale")
        self.image_scale = W.FloatSlider(value=isc, min=0, max=max(5, isc), step=0.1, description="image scale")
        self.steps = W.IntSlider(value=20, min=1, max=100, description="steps")
        self.seed = W.IntText(value=0, description="seed")
        self.go = W.Button(description="generate", button_style="primary", icon="play")
        self.sweep_finding = W.Dropdown(options=list(SWEEP_FINDINGS), value="Pleural Effusion", description="finding")
        self.sweep_side = W.Dropdown(options=["left", "right"], value="left", description="side")
        self.sweep_btn = W.Button(description="sweep severity", icon="forward")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="idle")
        self.status = W.HTML("")
        blank = png_bytes(np.zeros((8, 8), np.uint8))
        self.img_prior, self.img_cf, self.img_diff = (
            W.Image(value=blank, format="png", layout=W.Layout(width=self.px, height=self.px)) for _ in range(3))
        self.img_cf.add_class("bmj-counterfactual")
        self.cap_prior, self.cap_cf, self.cap_diff = (W.HTML(t, layout=W.Layout(width=self.px)) for t in
                                                      ("prior", "counterfactual", "difference (red = more opaque)"))
        self.interpretation = W.HTML("")
        self.sweep_box = W.HBox([])
        self.load_btn.on_click(lambda _: self.load_prior())
        self.go.on_click(lambda _: self.start([self.prompt.value]))
        self.sweep_btn.on_click(lambda _: self.start(sweep_prompts(self.sweep_finding.value, self.sweep_side.value),
                                                     sweep=True))
        col = lambda img, cap: W.VBox([img, cap])
        self.widget = W.VBox([
            W.HBox([self.source, self.phantom_index]), W.HBox([self.real, self.path, self.load_btn]),
            self.prompt, W.HBox([self.text_scale, self.image_scale]), W.HBox([self.steps, self.seed, self.go]),
            W.HBox([self.sweep_finding, self.sweep_side, self.sweep_btn]),
            W.HBox([self.progress, self.status]),
            W.HBox([col(self.img_prior, self.cap_prior), col(self.img_cf, self.cap_cf),
                    col(self.img_diff, self.cap_diff)]),
            self.interpretation, self.sweep_box])

    # ---- actions --------------------------------------------------------------------------------
    def load_model(self):
        if self.pipe is None:
            self.status.value = f"loading model {self.model_name!r}..."
            self.pipe = load_pipeline(self.model_dir)
        return self.pipe

    def load_interpreter(self):
        """'auto': calibrate once on a phantom cohort of an earlier chain run, if there is one."""
        if isinstance(self.interpreter, str):
            phantom = find_phantom() if self.interpreter == "auto" else resolve(self.interpreter)
            self.interpreter = None
            if phantom is not None:
                self.status.value = f"calibrating the interpreter on {phantom.name} truth..."
                try:
                    self.interpreter = cached_interpreter(phantom)
                except Exception as e:  # the heat map and regional measures still work without it
                    self.interpretation.value = f"(interpreter not calibrated: {type(e).__name__}: {e})"
        return self.interpreter

    def load_prior(self) -> Prior:
        try:
            if self.source.value == "phantom":
                self.prior = phantom_prior(self.phantom_index.value, self.phantom_size)
            elif self.source.value == "real":
                if not self.real.value:
                    raise FileNotFoundError(f"no real images found in {resolve(HANNOVER_DIR)}")
                self.prior = real_prior(self.real.value)
            else:
                self.prior = file_prior(self.path.value)
        except Exception as e:  # shown in the app, never a silent blank
            self.status.value = f"<b style='color:#b00'>prior: {type(e).__name__}: {e}</b>"
            raise
        self.img_prior.value = png_bytes(self.prior.image)
        attrib = f"<br><small>{self.prior.attribution}</small>" if self.prior.attribution else ""
        self.cap_prior.value = f"prior: {self.prior.label}{attrib}"
        self.status.value = "prior loaded"
        return self.prior

    def start(self, prompts: list[str], sweep: bool = False) -> threading.Thread:
        """Generate in a worker thread (the kernel keeps serving the widgets meanwhile)."""
        if self._thread is not None and self._thread.is_alive():
            self.status.value = "busy: wait for the running generation"
            return self._thread
        self._thread = threading.Thread(target=self._run, args=(list(prompts), sweep), daemon=True)
        self._thread.start()
        return self._thread

    def _progress(self, k: int, n: int) -> None:
        self.progress.max, self.progress.value = n, k
        self.progress.description = f"step {k}/{n}"

    def notices(self, prompts: list[str]) -> list[str]:
        """What the text encoder does not read: one line per description cut to its token limit."""
        enc = self.load_model().text_encoder
        found = [(p, enc.truncation_notice(p)) for p in dict.fromkeys(prompts)] if enc is not None else []
        return [f"'{p[:40]}{'...' if len(p) > 40 else ''}': {n}" for p, n in found if n]

    def _run(self, prompts: list[str], sweep: bool) -> None:
        try:
            self.go.disabled = self.sweep_btn.disabled = True
            settings = (self.text_scale.value, self.image_scale.value, self.steps.value, self.seed.value)
            try:
                check_sampling(*settings)
            except ValueError as e:
                self.status.value = f"<b style='color:#b00'>not generated: {html.escape(str(e))}</b>"
                return
            prior = self.prior or self.load_prior()
            pipe = self.load_model()
            notes = self.notices(prompts)
            self.status.value = f"generating {len(prompts)} counterfactual(s)..."
            t0 = time.perf_counter()
            out = sample(pipe, prior.image, prompts, *settings[:2], settings[2], "dpm", settings[3],
                         callback=self._progress)
            dt = time.perf_counter() - t0
            if not np.isfinite(out).all():
                self.status.value = ("<b style='color:#b00'>not shown: the model produced non-finite pixel values "
                                     "(NaN or inf); try smaller guidance scales</b>")
                return
            self.result = out
            self.img_cf.value = png_bytes(out[0])
            self.cap_cf.value = f"counterfactual: <i>{prompts[0]}</i>"
            self.img_diff.value = png_bytes(heatmap_rgb(prior.image, out[0], prior.masks))
            interp = self.load_interpreter() if prior.masks is not None else None
            self.interpretation.value = ("<b>What changed:</b> "
                                         + describe_change(prior.image, out[0], prior.masks, interp, prior.labels))
            if sweep:
                self.sweep_box.children = [W.VBox([W.Image(value=png_bytes(prior.image), format="png",
                                                           layout=W.Layout(width="160px", height="160px")),
                                                   W.HTML("prior")])] + [
                    W.VBox([W.Image(value=png_bytes(o), format="png", layout=W.Layout(width="160px", height="160px")),
                            W.HTML(f"<small>{p}</small>")]) for o, p in zip(out, prompts)]
            self.status.value = f"done: {len(out)} image(s) in {dt:.1f} s" + "".join(
                f"<br><b style='color:#a60'>note: {html.escape(n)}</b>" for n in notes)
        except Exception as e:  # the app shows the error; the thread must not die silently
            self.status.value = f"<b style='color:#b00'>{type(e).__name__}: {e}</b>"
        finally:
            self.go.disabled = self.sweep_btn.disabled = False
