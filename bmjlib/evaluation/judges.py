"""Judges: the classifiers that score counterfactuals (paper §4.3, §5.4.1-5.4.2, Fig. 3; DESIGN "Evaluation").

The paper scores generated images with pretrained torchxrayvision models (see `judges_xrv` for those).
No such weights exist for the phantom cohort, so at demo scale the judges are small CNNs trained here on
the phantom's REAL (rendered, never generated) images, with labels from the phantom's ground truth:

- `FindingJudge`: the five findings (multi-label, schema.FINDINGS order) -> N x 5 probabilities,
  with a Grad-CAM attention map (`attention`) for Fig. 3;
- `SexJudge`: P(male) -> N (retention AUROC; the phantom does not simulate race);
- `AgeJudge`: age in years -> N (retention Pearson r);
- `AnatomyJudge`: organ masks (schema.ORGANS) -> N x organs x H x W bool (Table 4, Fig. 5);
- `SeverityJudge`: the grade of the five findings (0 absent ... 3 large / severe) -> N x 5, for the validity
  table's dose response: the finding judge is trained to tell a finding's presence and does not order its grades.

Each judge is trained on patients of the cohort's train split and reports its accuracy on held-out
(val-split) patients' real images (`judge.heldout`): a judge that cannot see an effusion on real images
cannot judge a counterfactual, so the tables print these beside the counterfactual scores.
Every judge takes float images N,H,W in [0, 1] of any size and resizes them to its own input size.

A cohort without labels (every CheXpert finding blank, e.g. a bring-your-own CSV without reports;
`label_free_cohort`) gets no label judges: the finding, sex and age judges score against the cohort's labels and
demographics, which such a cohort does not give, so they are skipped and `run_judges` says so (`skipped.json`;
`load_judges` returns None for them) and every score that needs them stays NaN (never zero). The anatomy judge
needs no label: it is trained as always on the phantom's organ masks (step 00 of the run, or `judge_phantom`'s
where the run has none; patients held out by a seeded 10 % when the cohort is not the phantom), and on real
images it is a segmenter outside its training domain, which the tables say.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn
from tqdm.auto import tqdm

from bmjlib.evaluation import metrics as M
from bmjlib.evaluation.judges_xrv import load_paper_judges
from bmjlib.io import (atomic_torch_save, atomic_write_csv, atomic_write_json, code_fingerprint_of, fingerprint,
                       read_image, resize_image, sha256_file)
from bmjlib.phantom.cohort import write_cohort as write_phantom
from bmjlib.runtime import record_timing, resolve, side_by_side
from bmjlib.schema import FINDING_KEYS, FINDINGS, ORGANS

JUDGE_FILE = "judge.json"
WEIGHTS_FILE = "weights.pt"


# --------------------------------------------------------------------------- networks

def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Four conv blocks with max-pooling, global average pooling, a linear head."""

    def __init__(self, n_out: int, width: int = 16):
        super().__init__()
        w = [width, 2 * width, 4 * width, 4 * width]
        self.blocks = nn.ModuleList([_block(1, w[0]), _block(w[0], w[1]), _block(w[1], w[2]), _block(w[2], w[3])])
        self.head = nn.Linear(w[3], n_out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i < len(self.blocks) - 1:
                x = F.max_pool2d(x, 2)
        return x  # last block kept at 1/8 resolution: the Grad-CAM layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class SmallUNet(nn.Module):
    """Three-level U-Net for the organ masks (one logit channel per organ)."""

    def __init__(self, n_out: int, width: int = 16):
        super().__init__()
        w = [width, 2 * width, 4 * width]
        self.e1, self.e2, self.e3 = _block(1, w[0]), _block(w[0], w[1]), _block(w[1], w[2])
        self.d2, self.d1 = _block(w[2] + w[1], w[1]), _block(w[1] + w[0], w[0])
        self.out = nn.Conv2d(w[0], n_out, 1)
        nn.init.constant_(self.out.bias, -2.0)  # organs cover ~10 % of the image: start near that prior

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool2d(e1, 2))
        e3 = self.e3(F.max_pool2d(e2, 2))
        d2 = self.d2(torch.cat([F.interpolate(e3, scale_factor=2.0), e2], 1))
        d1 = self.d1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return self.out(d1)


# --------------------------------------------------------------------------- judges

def to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """N,H,W (or H,W) float in [0, 1] -> N,1,size,size (`resize_image`), centred at 0."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"judge input must be N,H,W or H,W; got shape {x.shape}")
    t = torch.from_numpy(resize_image(x, size))[:, None]
    return (t - 0.5) / 0.25


class _Judge:
    kind = ""
    n_out = 0
    net_cls: type = SmallCNN

    def __init__(self, size: int = 64, width: int = 16, net: nn.Module | None = None, heldout: dict | None = None,
                 extra: dict | None = None):
        self.size, self.width = int(size), int(width)
        self.net = net if net is not None else self.net_cls(self.n_out, self.width)
        self.net.eval()
        self.heldout = dict(heldout or {})
        self.extra = dict(extra or {})

    @torch.no_grad()
    def _logits(self, images: np.ndarray, batch: int = 256) -> torch.Tensor:
        self.net.eval()
        x = to_tensor(images, self.size)
        return torch.cat([self.net(x[i:i + batch]) for i in range(0, len(x), batch)]) if len(x) else \
            torch.zeros((0, self.n_out))

    def save(self, d: str | Path) -> Path:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(d / WEIGHTS_FILE, self.net.state_dict())
        atomic_write_json(d / JUDGE_FILE, {"kind": self.kind, "size": self.size, "width": self.width,
                                            "heldout": self.heldout, "extra": self.extra,
                                            "weights_sha256": sha256_file(d / WEIGHTS_FILE)})
        return d

    @classmethod
    def load(cls, d: str | Path) -> "_Judge":
        d = Path(d)
        for f in (d / JUDGE_FILE, d / WEIGHTS_FILE):
            if not f.exists():
                raise FileNotFoundError(f"{f}: judge file missing (train the judges with notebook 07 first)")
        meta = json.loads((d / JUDGE_FILE).read_text())
        if meta.get("kind") != cls.kind:
            raise ValueError(f"{d}: holds a '{meta.get('kind')}' judge, not '{cls.kind}'")
        j = cls(meta["size"], meta["width"], heldout=meta.get("heldout"), extra=meta.get("extra"))
        j.net.load_state_dict(torch.load(d / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        j.net.eval()
        return j


class FindingJudge(_Judge):
    """Five findings, multi-label: predict -> N x 5 probabilities in schema.FINDINGS order."""
    kind, n_out = "finding", len(FINDINGS)
    names = list(FINDINGS)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return torch.sigmoid(self._logits(images)).numpy()

    def attention(self, images: np.ndarray, finding: int | str) -> np.ndarray:
        """Grad-CAM (Selvaraju et al. 2017) of one finding's logit on the last conv block, upsampled to
        the input size and scaled to [0, 1] per image: where the judge looks for that finding."""
        k = FINDINGS.index(finding) if isinstance(finding, str) else int(finding)
        x = to_tensor(images, self.size).requires_grad_(False)
        self.net.eval()
        feats = self.net.features(x)
        feats.retain_grad()
        logit = self.net.head(feats.mean(dim=(2, 3)))[:, k]
        logit.sum().backward()
        w = feats.grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((w * feats).sum(1, keepdim=True)).detach()
        h, wd = np.asarray(images).shape[-2:]
        cam = F.interpolate(cam, size=(h, wd), mode="bilinear", align_corners=False)[:, 0].numpy()
        cam /= np.maximum(cam.reshape(len(cam), -1).max(1), 1e-8)[:, None, None]
        self.net.zero_grad(set_to_none=True)
        return cam


class SexJudge(_Judge):
    """predict -> N probabilities that the patient is male."""
    kind, n_out = "sex", 1

    def predict(self, images: np.ndarray) -> np.ndarray:
        return torch.sigmoid(self._logits(images)[:, 0]).numpy()


class AgeJudge(_Judge):
    """predict -> N ages in years (the net regresses standardised age; mean/std kept in `extra`)."""
    kind, n_out = "age", 1

    def predict(self, images: np.ndarray) -> np.ndarray:
        mu, sd = self.extra.get("age_mean", 0.0), self.extra.get("age_std", 1.0)
        return (self._logits(images)[:, 0] * sd + mu).numpy()


class SeverityJudge(_Judge):
    """The grade of each finding, regressed (0 absent, 1 small / mild, 2 moderate, 3 large / severe): predict ->
    N x 5 in schema.FINDINGS order."""
    kind, n_out = "severity", len(FINDINGS)
    names = list(FINDINGS)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self._logits(images).numpy()


class AnatomyJudge(_Judge):
    """predict -> N x len(ORGANS) x H x W bool at the input's own size."""
    kind, n_out = "anatomy", len(ORGANS)
    net_cls = SmallUNet
    organs = list(ORGANS)

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.ndim == 2:
            images = images[None]
        logits = self._logits(images, batch=64)
        h, w = images.shape[-2:]
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return (logits > 0).numpy()


DEMO_JUDGES = {"finding": FindingJudge, "sex": SexJudge, "age": AgeJudge, "anatomy": AnatomyJudge,
               "severity": SeverityJudge}


SKIPPED_FILE = "skipped.json"
# The judges that score against a cohort's labels or recorded demographics (skipped for a cohort without labels).
LABEL_JUDGES = ("finding", "sex", "age", "severity")


def predict(judge, images: np.ndarray, kind: str) -> np.ndarray:
    """`judge.predict(images)`, or for a judge this run does not have (None): NaN of the judge's output shape
    (finding / severity N x 5, sex / race / age N) or empty organ masks (anatomy N x organs x H x W, all False, so
    every Dice and measure taken from them is NaN). A score that needs a missing judge is undefined, never zero."""
    if judge is not None:
        return judge.predict(images)
    x = np.asarray(images)
    n = 1 if x.ndim == 2 else len(x)
    if kind == "anatomy":
        return np.zeros((n, len(ORGANS), *x.shape[-2:]), bool)
    return np.full((n, len(FINDINGS)) if kind in ("finding", "severity") else n, np.nan)


def load_judges(d: str | Path, scale: str = "demo", weights_dir: str | Path | None = None) -> dict:
    """The judges of one scale. demo: {'finding', 'sex', 'age', 'anatomy', 'severity'} loaded from `d/<kind>/`
    (None for the kinds `d/skipped.json` lists: see `run_judges`); paper: the torchxrayvision models {'finding',
    'race', 'age', 'anatomy'} (weights from `weights_dir` or the torchxrayvision cache; see judges_xrv)."""
    if scale == "paper":
        return load_paper_judges(weights_dir)
    f = Path(d) / SKIPPED_FILE
    skipped = set(json.loads(f.read_text()).get("skipped", [])) if f.is_file() else set()
    return {k: None if k in skipped else cls.load(Path(d) / k) for k, cls in DEMO_JUDGES.items()}


# The judges are trained once per run, in notebook 05 (the guidance scales are chosen with them), and read by
# the notebooks after it.
JUDGES_STEP = "05_stage2"


def judges_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its demo judges: <run>/05_stage2/judges."""
    return resolve(run_dir) / JUDGES_STEP / "judges"


def run_judges(run_dir: str | Path, scale: str = "demo", size: int = 64, epochs: int = 12, width: int = 16,
               seed: int = 0, weights_dir: str | Path | None = None, max_images: int | None = None) -> dict:
    """The judges of a run: at demo scale trained on the phantom's real images into `judges_dir(run_dir)` (or
    reused from there when nothing changed; `max_images` caps the training images, None or 0 = all), at paper
    scale torchxrayvision's from `weights_dir`."""
    max_images = int(max_images) if max_images else None
    if scale == "paper":
        return load_judges(judges_dir(run_dir), scale="paper", weights_dir=weights_dir or None)
    out = judges_dir(run_dir)
    if label_free_cohort(run_dir):
        why = (f"{resolve(run_dir) / '01_cohort' / 'pairs.csv'}: no pair carries a finding label, so the label "
               f"judges ({', '.join(LABEL_JUDGES)}) are not trained and every score that needs them stays empty "
               "(NaN); the anatomy judge (organ masks from the phantom's truth, no label needed) is trained.")
        atomic_write_json(out / SKIPPED_FILE, {"skipped": list(LABEL_JUDGES), "why": why})
        print(why)
        judges = train_demo_judges(run_dir, out, size=size, epochs=epochs, width=width, seed=seed,
                                   max_images=max_images, kinds=tuple(k for k in DEMO_JUDGES if k not in LABEL_JUDGES))
        return {k: judges.get(k) for k in DEMO_JUDGES}
    (out / SKIPPED_FILE).unlink(missing_ok=True)
    return train_demo_judges(run_dir, out, size=size, epochs=epochs, width=width, seed=seed, max_images=max_images)


def label_free_cohort(run_dir: str | Path) -> bool:
    """True when no pair of the cohort (01_cohort/pairs.csv) has any of the five findings labelled (1, 0 or -1)
    in either study: a cohort without reports or labels."""
    pairs = pd.read_csv(resolve(run_dir) / "01_cohort" / "pairs.csv", low_memory=False)
    cols = [c for c in (f"{w}_{f}" for w in ("prior", "followup") for f in FINDINGS) if c in pairs]
    return not cols or pairs[cols].apply(pd.to_numeric, errors="coerce").isna().all().all()


# --------------------------------------------------------------------------- training data (phantom truth)

# A run without a phantom cohort (step 00 builds none for csv and ICG-CXR sources) gets a small phantom for its
# demo judges alone, in the judges' folder; the run's cohort stays the user's data.
JUDGE_PHANTOM = {"n_patients": 40, "size": 128, "seed": 0}


def judge_phantom(run_dir: str | Path) -> Path:
    """The phantom the demo judges learn from: the run's own (00_phantom), else one written for them into
    `judges_dir(run_dir)/phantom` (JUDGE_PHANTOM; a rerun finds it current)."""
    own = resolve(run_dir) / "00_phantom"
    if (own / "truth" / "images.csv").is_file():
        return own
    d = judges_dir(run_dir) / "phantom"
    print(f"no phantom cohort in this run: the demo judges learn from a phantom of {JUDGE_PHANTOM['n_patients']} "
          f"patients written to {d}")
    write_phantom(d, **JUDGE_PHANTOM)
    return d

def sex_male(v) -> float:
    """1 for male, 0 for female, NaN when the record does not say."""
    s = str(v).strip().lower()
    if s in ("m", "male"):
        return 1.0
    if s in ("f", "female"):
        return 0.0
    return float("nan")


def judge_data(run_dir: str | Path, size: int, max_images: int | None = None, seed: int = 0) -> dict:
    """Real (non-generated) frontal PA images of the phantom with their truth, split by patient.

    Patients of test pairs are left out entirely (the judges score those later); val-split patients are
    the held-out set; every other patient trains. Returns arrays per split: images N,size,size,
    findings N x 5 (truth severity > 0), grades N x 5 (truth severity 0-3), male N, age N, masks
    N x organs x size x size, and `dicom_id`.
    Unreadable images are skipped and counted (`skipped`).
    """
    run = resolve(run_dir)
    truth = judge_phantom(run_dir) / "truth"
    images = pd.read_csv(truth / "images.csv", dtype={"dicom_id": str, "subject_id": str, "study_id": str})
    patients = pd.read_csv(truth / "patients.csv", dtype={"subject_id": str})
    pairs = pd.read_csv(run / "01_cohort" / "pairs.csv", dtype={"subject_id": str})
    split_of = dict(zip(pairs["subject_id"], pairs["split"]))
    images = images[images["view_true"].astype(str).str.upper() == "PA"].merge(patients, on="subject_id", how="left")
    if not images["subject_id"].isin(split_of).any():  # the cohort is not this phantom: hold out 10 % of its patients
        subjects = np.random.default_rng(seed).permutation(sorted(images["subject_id"].unique()))
        split_of = {s: "val" for s in subjects[:max(1, len(subjects) // 10)]}
    images["jsplit"] = images["subject_id"].map(split_of).fillna("train")
    images = images[images["jsplit"] != "test"]
    if max_images and len(images) > max_images:
        images = images.sample(max_images, random_state=seed)
    mimic = truth.parent / "mimic" / "files"
    out: dict = {"skipped": 0, "skipped_files": []}
    for split, want in (("train", "train"), ("heldout", "val")):
        rows = images[images["jsplit"] == want].sort_values("dicom_id")
        ims, masks, keep = [], [], []
        for r in tqdm(rows.itertuples(), total=len(rows), desc=f"judge data ({split})", leave=False):
            sid = str(r.subject_id)
            rel = getattr(r, "image_path", "")
            path = (mimic.parent / rel if isinstance(rel, str) and rel else
                    mimic / f"p{sid[:2]}" / f"p{sid}" / f"s{r.study_id}" / f"{r.dicom_id}.jpg")
            try:
                im = resize_image(read_image(path), size)
                m = np.load(truth / "masks" / f"{r.dicom_id}.npz")
                mk = resize_image(np.stack([m[o] for o in ORGANS]).astype(bool), size)
            except (OSError, ValueError, KeyError) as e:
                out["skipped"] += 1
                out["skipped_files"].append(f"{path}: {e}")
                continue
            ims.append(im)
            masks.append(mk)
            keep.append(r.Index)
        sub = rows.loc[keep]
        out[split] = {
            "images": np.stack(ims) if ims else np.zeros((0, size, size), np.float32),
            "masks": np.stack(masks) if masks else np.zeros((0, len(ORGANS), size, size), bool),
            "findings": np.stack([(sub[f"{FINDING_KEYS[f]}_sev"].to_numpy(float) > 0) for f in FINDINGS], 1)
            .astype(np.float32) if len(sub) else np.zeros((0, 5), np.float32),
            "grades": np.stack([sub[f"{FINDING_KEYS[f]}_sev"].to_numpy(float) for f in FINDINGS], 1)
            .astype(np.float32) if len(sub) else np.zeros((0, 5), np.float32),
            "male": sub["sex"].map(sex_male).to_numpy(float),
            "age": sub["age"].to_numpy(float),
            "dicom_id": sub["dicom_id"].tolist(),
        }
    return out


# --------------------------------------------------------------------------- training

def _augment(x: torch.Tensor, g: torch.Generator, masks: torch.Tensor | None = None):
    """Small shifts, contrast/brightness jitter and occasional blur: generated images are softer and
    slightly differently exposed than the rendered ones, and a judge must not key on that."""
    n = x.shape[0]
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if masks is not None:
        masks = torch.roll(masks, shifts=(dy, dx), dims=(2, 3))
    gain = 1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 2
    bias = 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 2
    x = x * gain + bias
    if float(torch.rand(1, generator=g)) < 0.5:
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None]) / 16
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k[None, None])
    return x, masks


def _fit(judge: _Judge, x: np.ndarray, y: np.ndarray, loss_fn, epochs: int, seed: int, batch: int = 64,
         lr: float = 2e-3, desc: str = "") -> list[float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = judge.net
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(1, epochs * int(np.ceil(len(x) / batch)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    xt = to_tensor(x, judge.size)
    yt = torch.as_tensor(y, dtype=torch.float32)
    losses = []
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        perm = torch.randperm(len(xt), generator=g)
        tot = 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            xb, yb = xt[idx], yt[idx]
            if isinstance(judge, AnatomyJudge):
                xb, yb = _augment(xb, g, yb)
            else:
                xb, _ = _augment(xb, g)
            loss = loss_fn(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        losses.append(tot / len(xt))
    # BatchNorm's running statistics were gathered on augmented batches (half of them blurred); a judge reads clean
    # images, so they are recomputed on the clean training images (without this the age judge read 24 years young)
    update_bn([xt[i:i + batch] for i in range(0, len(xt), batch)], net)
    net.eval()
    return losses


def evaluate_judge(judge: _Judge, data: dict) -> dict:
    """Accuracy of one judge on real images with truth: per-finding + mean AUROC, sex AUROC, age r and
    MAE, organ Dice, per-finding Spearman rho of the predicted grade + its mean absolute error."""
    x = data["images"]
    if isinstance(judge, FindingJudge):
        res = M.pathology_auroc(judge.predict(x), data["findings"], FINDINGS)
        return {f"auroc_{k}": v for k, v in res.items()}
    if isinstance(judge, SexJudge):
        return {"auroc_sex": M.auroc(data["male"], judge.predict(x))}
    if isinstance(judge, SeverityJudge):
        p, g = judge.predict(x), data["grades"]
        rho = {f"rho_grade_{f}": M.spearman_rho(g[:, k], p[:, k]) for k, f in enumerate(FINDINGS)}
        return {**rho, "rho_grade_mean": float(np.nanmean(list(rho.values()))) if len(x) else float("nan"),
                "mae_grade": float(np.mean(np.abs(p - g))) if len(x) else float("nan")}
    if isinstance(judge, AgeJudge):
        p = judge.predict(x)
        return {"pearson_age": M.pearson_r(p, data["age"]), "mae_age": float(np.nanmean(np.abs(p - data["age"])))}
    d = np.nan_to_num(M.dice(judge.predict(x), data["masks"]), nan=0.0).mean(axis=0)  # truth masks never empty
    return {**{f"dice_{o}": float(v) for o, v in zip(ORGANS, d)}, "dice_mean": float(d.mean())}


def _train_judge(kind: str, x: np.ndarray, y: np.ndarray, heldout: dict, out: Path, size: int, width: int,
                 epochs: int, seed: int, extra: dict | None = None) -> Path:
    """Train one demo judge from the seed, score it on the held-out patients, save it to `out`."""
    t1 = time.time()
    torch.manual_seed(seed)  # initial weights from the seed, not from whatever ran before
    judge = DEMO_JUDGES[kind](size, width // 2 if kind in ("sex", "age") else width,
                              **({"extra": extra} if extra else {}))
    loss = nn.SmoothL1Loss() if kind in ("age", "severity") else nn.BCEWithLogitsLoss()
    # dense and regression targets: smaller batches (more steps) converge within the same epochs
    bs, lr = {"anatomy": (16, 1e-2), "age": (16, 2e-3), "severity": (16, 2e-3)}.get(kind, (64, 2e-3))
    _fit(judge, x, y, loss, epochs, seed, batch=bs, lr=lr, desc=f"judge {kind}")
    judge.heldout = {**evaluate_judge(judge, heldout), "n_train": int(len(x)), "n_heldout": int(len(heldout["images"]))}
    record_timing(f"judge {kind}", time.time() - t1, n_train=int(len(x)))
    return judge.save(out)


def train_demo_judges(run_dir: str | Path, out_dir: str | Path, size: int = 64, epochs: int = 12,
                      width: int = 16, seed: int = 0, max_images: int | None = None,
                      kinds: tuple[str, ...] = tuple(DEMO_JUDGES)) -> dict:
    """Train (or reuse, when `out_dir` holds judges trained by the same code from the same data and settings)
    the demo judges `kinds` (default all four); write `out_dir/<kind>/` and `out_dir/heldout.csv` (one row per
    judge and metric)."""
    out_dir = Path(out_dir)
    truth = judge_phantom(run_dir) / "truth"
    everyone = tuple(kinds) == tuple(DEMO_JUDGES)
    key = fingerprint(code_fingerprint_of(__name__), size, epochs, width, seed, max_images,
                      sha256_file(truth / "images.csv"), sha256_file(resolve(run_dir) / "01_cohort" / "pairs.csv"),
                      *(() if everyone else (kinds,)))
    stamp = out_dir / "fingerprint.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        try:
            return {k: DEMO_JUDGES[k].load(out_dir / k) for k in kinds}
        except (FileNotFoundError, ValueError):
            pass
    data = judge_data(run_dir, size, max_images, seed)
    tr, ho = data["train"], data["heldout"]
    if len(tr["images"]) < 8:
        raise ValueError(f"{truth}: only {len(tr['images'])} usable training images for the judges")
    t0 = time.time()
    mu, sd = float(np.nanmean(tr["age"])), float(np.nanstd(tr["age"]) or 1.0)
    sex_ok = ~np.isnan(tr["male"])
    targets = {"finding": (tr["images"], tr["findings"]),
               "sex": (tr["images"][sex_ok], tr["male"][sex_ok, None]),
               "age": (tr["images"], ((tr["age"] - mu) / sd)[:, None]),
               "anatomy": (tr["images"], tr["masks"].astype(np.float32)),
               "severity": (tr["images"], tr["grades"])}
    # independent trainings, side by side on a CPU; the longest (the dense anatomy judge) first
    order = sorted((k for k in DEMO_JUDGES if k in kinds), key=lambda k: k != "anatomy")
    side_by_side({k: (_train_judge, k, *targets[k], ho, out_dir / k, size, width, epochs, seed,
                      {"age_mean": mu, "age_std": sd} if k == "age" else None) for k in order})
    judges = {k: DEMO_JUDGES[k].load(out_dir / k) for k in DEMO_JUDGES if k in kinds}
    rows = [{"judge": k, "metric": m, "value": v} for k, j in judges.items() for m, v in j.heldout.items()]
    atomic_write_csv(out_dir / "heldout.csv", pd.DataFrame(rows))
    atomic_write_json(stamp, {"key": key, "skipped": data["skipped"], "skipped_files": data["skipped_files"][:50]})
    record_timing("judges", time.time() - t0)
    return judges


def heldout_table(judges: dict) -> pd.DataFrame:
    """One row per judge: its held-out accuracy on real images (what each judge can and cannot see); a judge
    not trained in this run (None) is a row that says so."""
    return pd.DataFrame([{"judge": k, **{m: v for m, v in j.heldout.items()}} if hasattr(j, "heldout") else
                         {"judge": k, "note": "not trained: the cohort has no labels (judges/skipped.json)"}
                         for k, j in judges.items() if hasattr(j, "heldout") or j is None])
