"""Paper-scale judges: the torchxrayvision models the paper scores counterfactuals with (paper §4.3, §5.4).

- findings: `xrv.models.DenseNet(weights="densenet121-res224-all")` (Cohen et al. 2021), 224 px;
- race: `xrv.baseline_models.emory_hiti.RaceModel` (Gichoya et al. 2022; Asian / Black / White), 320 px;
- age: `xrv.baseline_models.riken.AgeModel` (Ieki et al. 2022), 320 px;
- anatomy: `xrv.baseline_models.chestx_det.PSPNet` (Lian et al. 2021; 14 structures, six used), 512 px.

Each gets the input its authors trained it on: one channel, resized to its own resolution, and
torchxrayvision's [-1024, 1024] scaling (each model then applies its own ImageNet normalisation inside).
Weights are read from a given folder or from the torchxrayvision cache (~/.torchxrayvision/models_data);
nothing is ever downloaded: a missing file raises `MissingWeights`, naming the file and where to put it.
The wrappers expose the same `predict` interface as the demo judges in `bmjlib.evaluation.judges`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bmjlib.io import resize_image
from bmjlib.schema import FINDINGS, ORGANS

XRV_CACHE = Path("~/.torchxrayvision/models_data").expanduser()
_BASE = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
# The files torchxrayvision would download; we only ever read them.
WEIGHT_FILES = {
    "finding": "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "race": "resnet_race_detection_val-loss_0.157_mimic_public.pt",
    "age": "baseline_models_riken_xray_age_every_model_age_senet154_v2_tl_26_ft_7_fp32.pt",
    "anatomy": "pspnet_chestxray_best_model_4.pth",
}
XRV_FINDING = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Edema": "Edema",
               "Pleural Effusion": "Effusion", "Pneumothorax": "Pneumothorax"}
PSPNET_ORGAN = {"left_lung": "Left Lung", "right_lung": "Right Lung", "heart": "Heart",
                "mediastinum": "Mediastinum", "diaphragm": "Facies Diaphragmatica", "spine": "Spine"}
RACES = ["Asian", "Black", "White"]


class MissingWeights(FileNotFoundError):
    """A paper-scale judge's weight file is not on disk; the message names it and where to put it."""


def find_weights(kind: str, weights_dir: str | Path | None = None) -> Path:
    """Path of one judge's weight file in `weights_dir` or the torchxrayvision cache, else MissingWeights."""
    name = WEIGHT_FILES[kind]
    places = ([Path(weights_dir).expanduser()] if weights_dir else []) + [XRV_CACHE]
    for p in places:
        if (p / name).is_file():
            return p / name
    where = " or ".join(str(p) for p in places)
    raise MissingWeights(
        f"{kind} judge: weight file '{name}' not found in {where}. Put it there (it is published at "
        f"{_BASE}{name}; this project never downloads), or pass weights_dir= pointing at a folder that holds it.")


@contextmanager
def _no_download() -> Iterator[None]:
    """torchxrayvision downloads a missing file; we have checked it exists, and make sure it cannot."""
    import torchxrayvision as xrv  # deferred: only the paper profile's judges need it, and it is slow to import

    def refuse(url, *a, **k):
        raise MissingWeights(f"refusing to download {url}: place the file by hand (see bmjlib.evaluation.judges_xrv)")

    saved = xrv.utils.download
    xrv.utils.download = refuse
    try:
        yield
    finally:
        xrv.utils.download = saved


@contextmanager
def _home_with(path: Path) -> Iterator[None]:
    """RaceModel / AgeModel read only ~/.torchxrayvision/models_data; point HOME at a temporary folder
    that links the given file there when it lives elsewhere."""
    if path.parent.resolve() == XRV_CACHE.resolve():
        yield
        return
    tmp = Path(tempfile.mkdtemp(prefix="bmj_xrv_home_"))
    (tmp / ".torchxrayvision" / "models_data").mkdir(parents=True)
    os.symlink(path.resolve(), tmp / ".torchxrayvision" / "models_data" / path.name)
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def xrv_input(images: np.ndarray, size: int) -> torch.Tensor:
    """N,H,W floats in [0, 1] -> N,1,size,size in torchxrayvision's [-1024, 1024] range."""
    x = np.asarray(images, np.float32)
    if x.ndim == 2:
        x = x[None]
    t = torch.from_numpy(resize_image(x, size))[:, None]
    return (t.clamp(0, 1) * 2 - 1) * 1024


class _XRVJudge:
    size = 224
    kind = ""

    def __init__(self, model: torch.nn.Module, weights: Path, device: str = "cpu", batch: int = 16):
        self.model = model.eval().to(device)
        self.weights, self.device, self.batch = weights, device, batch
        self.heldout: dict = {}

    @torch.no_grad()
    def _run(self, images: np.ndarray) -> list[torch.Tensor]:
        x = xrv_input(images, self.size)
        return [self.model(x[i:i + self.batch].to(self.device)).float().cpu() for i in range(0, len(x), self.batch)]


class XRVFindingJudge(_XRVJudge):
    """DenseNet-121 'densenet121-res224-all' -> N x 5 calibrated probabilities (schema.FINDINGS order)."""
    size, kind = 224, "finding"
    names = list(FINDINGS)

    def predict(self, images: np.ndarray) -> np.ndarray:
        out = torch.cat(self._run(images)).numpy()
        cols = [list(self.model.targets).index(XRV_FINDING[f]) for f in FINDINGS]
        return out[:, cols]


class XRVRaceJudge(_XRVJudge):
    """Emory HITI ResNet-34 -> N x 3 probabilities over RACES (retention AUROC, one-vs-rest)."""
    size, kind = 320, "race"
    names = RACES

    def predict(self, images: np.ndarray) -> np.ndarray:
        return torch.cat(self._run(images)).exp().numpy()  # the model ends in LogSoftmax


class XRVAgeJudge(_XRVJudge):
    """RIKEN SE-ResNeXt age regressor -> N ages in years."""
    size, kind = 320, "age"

    def predict(self, images: np.ndarray) -> np.ndarray:
        return torch.cat(self._run(images)).reshape(-1).numpy()


class XRVAnatomyJudge(_XRVJudge):
    """ChestX-Det PSPNet at 512 px -> N x len(ORGANS) x H x W bool at the input's size."""
    size, kind = 512, "anatomy"
    organs = list(ORGANS)

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.ndim == 2:
            images = images[None]
        cols = [list(self.model.targets).index(PSPNET_ORGAN[o]) for o in ORGANS]
        h, w = images.shape[-2:]
        outs = []
        for logits in self._run(images):
            logits = F.interpolate(logits[:, cols], size=(h, w), mode="bilinear", align_corners=False)
            outs.append(torch.sigmoid(logits) > 0.5)
        return torch.cat(outs).numpy()


def load_paper_judges(weights_dir: str | Path | None = None, device: str = "cpu",
                      kinds: tuple[str, ...] = ("finding", "race", "age", "anatomy")) -> dict:
    """The four torchxrayvision judges, from `weights_dir` or the torchxrayvision cache. Every missing
    file is named in one MissingWeights error before anything is built."""
    import torchxrayvision as xrv  # deferred: only the paper profile's judges need it, and it is slow to import

    paths, missing = {}, []
    for k in kinds:
        try:
            paths[k] = find_weights(k, weights_dir)
        except MissingWeights as e:
            missing.append(str(e))
    if missing:
        raise MissingWeights("\n".join(missing))
    judges = {}
    with _no_download():
        if "finding" in paths:
            m = xrv.models.DenseNet(weights="densenet121-res224-all", cache_dir=str(paths["finding"].parent) + "/")
            judges["finding"] = XRVFindingJudge(m, paths["finding"], device)
        if "race" in paths:
            with _home_with(paths["race"]):
                judges["race"] = XRVRaceJudge(xrv.baseline_models.emory_hiti.RaceModel(), paths["race"], device)
        if "age" in paths:
            with _home_with(paths["age"]):
                judges["age"] = XRVAgeJudge(xrv.baseline_models.riken.AgeModel(), paths["age"], device)
        if "anatomy" in paths:
            m = xrv.baseline_models.chestx_det.PSPNet(cache_dir=str(paths["anatomy"].parent))
            judges["anatomy"] = XRVAnatomyJudge(m, paths["anatomy"], device)
    return judges
