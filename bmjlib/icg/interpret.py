"""Interpretable counterfactuals: what did the image change? (ProgEmu / ICG-CXR "changes-of-findings").

ProgEmu (Ma et al., MICCAI 2025) argues that a counterfactual image alone is a silent prediction; the
user needs a text stating the visual changes it contains, to check against the hypothesis. Here the
interpretation of a counterfactual C of a prior P is derived from measurable evidence only:

- anatomy measured on segmentation masks (`anatomy`): cardiothoracic ratio (widest heart / widest
  thorax, both from masks), aerated lung area per side;
- a difference heat map (`difference_map`): smoothed C - P after removing the global exposure offset,
  positive = more opaque; summarised in regions of the prior's own anatomy (`regional_changes`): lower
  and middle zone of each lung (effusion, atelectasis), the apical / lateral band (pneumothorax: lucency),
  the perihilar zone of both lungs (edema), the rim just outside the heart border (cardiac enlargement);
- when available, finding-judge probabilities on P and on C (bmjlib.evaluation.judges.FindingJudge).

Per finding these features are mapped to a direction (increase / unchanged / decrease) by a small
classifier (shallow boosted trees) fitted on *calibration* pairs whose true change is known (the
phantom's truth), never on the pairs being scored. Prior presence (judge, else the prior report, else for
cardiomegaly the CTR) splits an increase into new / worse and rules out a decrease of a finding that was
not there; after-presence (judge, else CTR, else a second calibrated classifier) splits a decrease into
better / resolved. Lateral findings are decided per lung, which gives the side. `sentence` writes the result
as a short changes-of-findings text, with the measurement behind each statement.

Scoring: `truth_directions` (phantom severities of prior vs follow-up) and `direction_scores`
(per-finding direction accuracy, changed-F1, macro-F1, side accuracy); `parse_hypothesis` reads a
progression description with bmjlib.text.reports.extract_findings and `consistency` says whether the image
did what the description asked.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import f1_score

from bmjlib.io import resize_image
from bmjlib.schema import FINDING_KEYS, FINDINGS, ORGANS
from bmjlib.text.reports import extract_findings

LATERAL = ["Atelectasis", "Pleural Effusion", "Pneumothorax"]
DIRECTIONS = ["new", "worse", "unchanged", "better", "resolved"]
COARSE = {"new": 1, "worse": 1, "unchanged": 0, "better": -1, "resolved": -1}
CTR_NORMAL_MAX = 0.5   # conventional upper limit of a normal PA cardiothoracic ratio


# --------------------------------------------------------------------------- anatomy from masks

def as_mask_dict(masks) -> dict[str, np.ndarray]:
    """Masks as {organ: bool H x W}: from a dict / npz, or an array len(ORGANS) x H x W (judge output)."""
    if isinstance(masks, dict) or hasattr(masks, "files"):
        keys = list(masks.keys()) if isinstance(masks, dict) else list(masks.files)
        missing = [o for o in ("left_lung", "right_lung", "heart") if o not in keys]
        if missing:
            raise ValueError(f"masks lack organs {missing} (have {keys})")
        return {k: np.asarray(masks[k]).astype(bool) for k in keys}
    arr = np.asarray(masks)
    if arr.ndim != 3 or arr.shape[0] != len(ORGANS):
        raise ValueError(f"masks array must be {len(ORGANS)} x H x W in ORGANS order, got shape {arr.shape}")
    return {o: arr[i].astype(bool) for i, o in enumerate(ORGANS)}


def resize_masks(masks: dict, shape) -> dict[str, np.ndarray]:
    if next(iter(masks.values())).shape == tuple(shape):
        return masks

    return {k: resize_image(np.asarray(v, bool), shape) for k, v in masks.items()}


def _widest(mask: np.ndarray, theta: float = 0.0) -> float:
    """Largest transverse extent (pixels) of a mask, measured along the patient's left-right axis,
    which is at angle `theta` (radians) to the image rows: pixels are rotated by -theta and binned by
    their rotated row."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return 0.0
    c, s = np.cos(theta), np.sin(theta)
    u = xs * c + ys * s
    v = np.rint(-xs * s + ys * c).astype(int)
    v -= v.min()
    lo = np.full(v.max() + 1, np.inf)
    hi = np.full(v.max() + 1, -np.inf)
    np.minimum.at(lo, v, u)
    np.maximum.at(hi, v, u)
    return float((hi - lo).max() + 1)


def _axis_angle(m: dict) -> float:
    """Tilt of the patient's left-right axis: perpendicular to the spine mask's long axis (0 without
    a spine mask; the lungs themselves are too asymmetric to give the midline)."""
    spine = m.get("spine")
    if spine is None or spine.sum() < 10:
        return 0.0
    ys, xs = np.nonzero(spine)
    cov = np.cov(np.stack([xs, ys]).astype(float))
    w, v = np.linalg.eigh(cov)
    dx, dy = v[:, -1]
    if dy < 0:
        dx, dy = -dx, -dy
    return float(np.arctan2(-dx, dy))


def anatomy(masks) -> dict[str, float]:
    """Cardiothoracic ratio and aerated lung areas (fractions of the image) from organ masks."""
    m = as_mask_dict(masks)
    lungs = m["left_lung"] | m["right_lung"]
    for side in ("left", "right"):
        if not m[f"{side}_lung"].any():
            raise ValueError(f"masks: the {side} lung is empty, cannot measure the thorax")
    theta = _axis_angle(m)
    thorax = _widest(lungs | m["heart"] | m.get("mediastinum", np.zeros_like(lungs)), theta)
    n = lungs.size
    return {"ctr": _widest(m["heart"], theta) / thorax,
            "lung_left": float(m["left_lung"].sum() / n), "lung_right": float(m["right_lung"].sum() / n),
            "heart_area": float(m["heart"].sum() / n)}


# --------------------------------------------------------------------------- the difference heat map

def to_common_size(prior: np.ndarray, cf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bring both images to the smaller of the two sizes (anti-aliased), so that resampling a small
    generated image up never shows as change."""
    prior, cf = np.asarray(prior, np.float32), np.asarray(cf, np.float32)
    if prior.ndim != 2 or cf.ndim != 2:
        raise ValueError(f"expected 2-D images, got {prior.shape} and {cf.shape}")
    if prior.shape == cf.shape:
        return prior, cf
    shape = min(prior.shape, cf.shape, key=lambda s: s[0] * s[1])
    return resize_image(prior, shape), resize_image(cf, shape)


def difference_map(prior: np.ndarray, cf: np.ndarray, body=None, sigma_frac: float = 0.012) -> np.ndarray:
    """Smoothed C - P (positive = more opaque in the counterfactual), global exposure offset removed.

    The offset is the median difference over `body` (bool mask, e.g. the thorax; default the whole
    image); sigma is a fraction of the image width so the map means the same at every resolution.
    """
    prior, cf = to_common_size(prior, cf)
    sigma = max(0.5, sigma_frac * prior.shape[1])
    d = ndimage.gaussian_filter(cf, sigma) - ndimage.gaussian_filter(prior, sigma)
    region = body if body is not None and np.any(body) else np.ones_like(d, bool)
    return (d - np.median(d[region])).astype(np.float32)


def _zones(mask: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
    """Split one lung mask by height (upper 40 %, middle 30 %, lower 30 %); also its middle column."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise ValueError("empty lung mask")
    r0, h = rows[0], rows[-1] + 1 - rows[0]
    cut1, cut2 = r0 + int(round(0.4 * h)), r0 + int(round(0.7 * h))
    rr = np.arange(mask.shape[0])[:, None]
    z = {"upper": mask & (rr < cut1), "middle": mask & (rr >= cut1) & (rr < cut2), "lower": mask & (rr >= cut2)}
    return z, (cols[0] + cols[-1] + 1) / 2


VISIBLE = 0.04  # a heat-map change of 4 % of the grey range counts as visible (area measurements)


def regional_changes(d: np.ndarray, masks, visible: float = VISIBLE) -> dict[str, float]:
    """Mean of the difference map in regions of the prior's anatomy (masks at the map's size).

    Per side s: `opac_lower_s`, `opac_middle_s` (opacity gained low / mid lung: effusion, atelectasis),
    `lucent_upper_s` (lucency gained in the apical-lateral band: pneumothorax); `opac_perihilar`
    (opacity gained in the medial middle zone of the weaker side, so one-sided change is not edema);
    `heart_rim` (opacity gained in a band outside the heart border: enlargement). Areas, as fractions
    of that lung: `effusion_area_s` (visibly denser in the lower half), `ptx_area_s` (visibly more
    lucent in the apical-lateral band); negative when the change goes the other way.
    """
    m = resize_masks(as_mask_dict(masks), d.shape)
    heart = m["heart"]
    hc = ndimage.center_of_mass(heart)[1] if heart.any() else d.shape[1] / 2
    out = {}
    peri = []
    for side in ("left", "right"):
        lung = m[f"{side}_lung"]
        if not lung.any():
            raise ValueError(f"masks: the {side} lung is empty, nothing can be measured on that side")
        z, mid = _zones(lung)
        cc = np.arange(lung.shape[1])[None, :]
        lateral = (cc > mid) if ndimage.center_of_mass(lung)[1] > hc else (cc < mid)
        mean = lambda r: float(d[r].mean()) if r.any() else 0.0
        out[f"opac_lower_{side}"] = mean(z["lower"])
        out[f"opac_middle_{side}"] = mean(z["middle"])
        band = (z["upper"] | z["middle"]) & lateral
        out[f"lucent_upper_{side}"] = -mean(band)
        low = z["lower"]
        n = float(lung.sum())
        out[f"effusion_area_{side}"] = float(((d > visible) & low).sum() - ((d < -visible) & low).sum()) / n
        out[f"ptx_area_{side}"] = float(((d < -visible) & band).sum() - ((d > visible) & band).sum()) / n
        peri.append(mean(z["middle"] & ~lateral))
    out["opac_perihilar"] = min(peri, key=abs) if np.sign(peri[0]) != np.sign(peri[1]) else \
        float(np.sign(peri[0]) * min(abs(p) for p in peri))
    k = max(1, int(round(0.04 * d.shape[1])))
    rim = ndimage.binary_dilation(heart, iterations=k) & ~heart & (m["left_lung"] | m["right_lung"])
    out["heart_rim"] = float(d[rim].mean()) if rim.any() else 0.0
    return out


# --------------------------------------------------------------------------- evidence per pair

def evidence(prior: np.ndarray, cf: np.ndarray, masks_prior, masks_cf=None,
             probs_prior=None, probs_cf=None) -> dict:
    """Every measurement behind one interpretation: anatomy of both (when C's masks are given), the
    regional changes of the heat map, judge probabilities. Returns a flat dict plus 'heatmap'."""
    p, c = to_common_size(prior, cf)
    mp = resize_masks(as_mask_dict(masks_prior), p.shape)
    body = mp["left_lung"] | mp["right_lung"] | mp["heart"]
    d = difference_map(p, c, body=ndimage.binary_dilation(body, iterations=2))
    a0 = anatomy(mp)
    regions = mp
    if masks_cf is not None:
        mc = resize_masks(as_mask_dict(masks_cf), p.shape)
        # measure lung regions only where both images show lung: a growing heart or a rising
        # hemidiaphragm is then measured by CTR and lung area, not as new lung opacity
        regions = {**mp, "left_lung": mp["left_lung"] & mc["left_lung"],
                   "right_lung": mp["right_lung"] & mc["right_lung"]}
    ev = regional_changes(d, regions)
    ev.update({f"{k}_0": v for k, v in a0.items()})
    if masks_cf is not None:
        a1 = anatomy(mc)
        ev.update({f"{k}_1": v for k, v in a1.items()})
        ev["d_ctr"] = a1["ctr"] - a0["ctr"]
        for s in ("left", "right"):
            ev[f"d_lung_{s}"] = (a1[f"lung_{s}"] - a0[f"lung_{s}"]) / max(a0[f"lung_{s}"], 1e-6)
    for tag, probs in (("0", probs_prior), ("1", probs_cf)):
        if probs is not None:
            probs = np.asarray(probs, float).reshape(-1)
            if probs.size != len(FINDINGS):
                raise ValueError(f"judge probabilities: expected {len(FINDINGS)} (FINDINGS order), got {probs.size}")
            ev.update({f"p_{FINDING_KEYS[f]}_{tag}": float(v) for f, v in zip(FINDINGS, probs)})
    ev["heatmap"] = d
    return ev


# Regional features of one lung, and the global ones; every finding's model sees all of them (so it can
# learn, e.g., that haze in both middle zones is edema and not a basal effusion), plus the judge deltas.
SIDE_KEYS = ["opac_lower_{s}", "opac_middle_{s}", "lucent_upper_{s}", "effusion_area_{s}", "ptx_area_{s}",
             "d_lung_{s}"]
GLOBAL_KEYS = ["opac_perihilar", "heart_rim", "d_ctr"]


def features(ev: dict, finding: str, side: str | None = None) -> list[float]:
    """The feature vector of one finding: for a lateral finding the regional changes of lung `side`,
    else of both lungs; the global changes; anatomy deltas and judge probability deltas when present
    in the evidence (an Interpreter is calibrated and applied with the same evidence)."""
    sides = [side] if side else ["left", "right"]
    names = [n.format(s=s) for s in sides for n in SIDE_KEYS] + GLOBAL_KEYS
    vals = [ev[n] for n in names if n in ev]
    for f in FINDINGS:
        k = FINDING_KEYS[f]
        if f"p_{k}_0" in ev and f"p_{k}_1" in ev:
            vals.append(ev[f"p_{k}_1"] - ev[f"p_{k}_0"])
    return vals


# --------------------------------------------------------------------------- direction per finding

def _side_of_change(sev0, sev1, side0, side1) -> str:
    return str((side1 if sev1 > sev0 else side0) or "")


def truth_directions(pairs: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """True change per (pair, finding) from the phantom's truth/images.csv (prior vs follow-up severity).

    `pairs` needs pair_id, prior_dicom_id, followup_dicom_id. Returns pair_id, finding, sev_0, sev_1,
    direction (new / worse / unchanged / better / resolved), side (of the change; "" if none).
    """
    im = images.set_index(images["dicom_id"].astype(str))
    rows = []
    for r in pairs.itertuples(index=False):
        a, b = im.loc[str(r.prior_dicom_id)], im.loc[str(r.followup_dicom_id)]
        for f in FINDINGS:
            k = FINDING_KEYS[f]
            s0, s1 = int(a[f"{k}_sev"]), int(b[f"{k}_sev"])
            d = ("new" if s0 == 0 else "worse") if s1 > s0 else \
                ("resolved" if s1 == 0 else "better") if s1 < s0 else "unchanged"
            side = "" if d == "unchanged" or f not in LATERAL else \
                _side_of_change(s0, s1, _s(a.get(f"{k}_side")), _s(b.get(f"{k}_side")))
            rows.append({"pair_id": r.pair_id, "finding": f, "sev_0": s0, "sev_1": s1, "direction": d, "side": side})
    return pd.DataFrame(rows)


def _s(v) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def _side_target(direction: str, side: str, s: str) -> int:
    """Coarse direction of one lung: the finding's direction where its change lies, else 0."""
    c = COARSE[direction]
    return c if c and side in (s, "bilateral") else 0


def _classifier():
    # shallow boosted trees: the features interact (haze in both middle zones is edema, not effusion).
    # Not the Hist variant: its OpenMP threads make single-sample prediction slow on a busy machine.
    return GradientBoostingClassifier(max_depth=3, n_estimators=100, learning_rate=0.1, random_state=0)


class _Constant:
    """The classifier of a finding whose calibration pairs all had one direction."""

    def __init__(self, value: int):
        self.classes_ = np.array([value])

    def predict_proba(self, X):
        return np.ones((len(X), 1))

    def predict(self, X):
        return np.repeat(self.classes_, len(X))


@dataclass
class Interpreter:
    """Per finding a small classifier: features -> -1 / 0 / +1 (decrease / unchanged / increase), and one
    for 'resolved' among decreases (used when no judge says whether the finding is still there).

    Lateral findings get one model over per-lung samples (features of that lung), so the side comes
    out of the same decision. Fit on calibration pairs with known change (`fit`), then `interpret`.
    """
    models: dict = field(default_factory=dict)
    resolved_models: dict = field(default_factory=dict)
    n_calibration: int = 0

    def fit(self, evs: list[dict], truth: pd.DataFrame, pair_ids: list[str]) -> "Interpreter":
        t = truth.set_index(["pair_id", "finding"])
        for f in FINDINGS:
            X, y, Xr, yr = [], [], [], []
            for ev, pid in zip(evs, pair_ids):
                if (pid, f) not in t.index:  # change unknown (a report pair that does not mention f)
                    continue
                row = t.loc[(pid, f)]
                for s in (("left", "right") if f in LATERAL else (None,)):
                    x = features(ev, f, s)
                    target = _side_target(row["direction"], row["side"], s) if s else COARSE[row["direction"]]
                    X.append(x)
                    y.append(target)
                    if target < 0:
                        Xr.append(x)
                        yr.append(int(row["direction"] == "resolved"))
            if not X:
                raise ValueError(f"calibration: no calibration pair with a known change of {f}")
            if len(set(y)) < 2:  # e.g. a tiny smoke cohort: say so, and predict the only class seen
                warnings.warn(f"calibration: {f} is always {y[0]:+d} among {len(evs)} pairs; "
                              "its direction cannot be learned and is reported as that", stacklevel=2)
                self.models[f] = _Constant(y[0])
            else:
                self.models[f] = _classifier().fit(np.asarray(X), np.asarray(y))
            if len(set(yr)) == 2:
                self.resolved_models[f] = _classifier().fit(np.asarray(Xr), np.asarray(yr))
        self.n_calibration = len(evs)
        return self

    def _predict(self, f: str, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = self.models[f]
        p = m.predict_proba(X)
        i = p.argmax(1)
        return m.classes_[i].astype(int), p[np.arange(len(X)), i]

    def interpret(self, ev: dict, prior_labels: dict | None = None) -> list[dict]:
        """One row per finding: direction, side, confidence, and the measurement text behind it.

        `prior_labels` ({finding: 1/0/-1/NaN}, the prior report's) says whether a finding was present
        before when no judge probability on the prior is in the evidence.
        """
        return self.interpret_many([ev], [prior_labels])[0]

    def interpret_many(self, evs: list[dict], prior_labels: list | None = None) -> list[list[dict]]:
        """`interpret` for many pairs at once (one classifier call per finding and side)."""
        if not self.models:
            raise RuntimeError("Interpreter is not calibrated: call fit() on pairs with known change")
        prior_labels = prior_labels or [None] * len(evs)
        out = [[] for _ in evs]
        for f in FINDINGS:
            sides = ("left", "right") if f in LATERAL else (None,)
            X = {s: np.asarray([features(ev, f, s) for ev in evs]) for s in sides}
            pred = {s: self._predict(f, X[s]) for s in sides}
            for i, ev in enumerate(evs):
                before = _present_before(ev, f, prior_labels[i])
                moving = {s: (int(pred[s][0][i]), float(pred[s][1][i])) for s in sides if pred[s][0][i] != 0}
                if before is False:  # absent before: a lighter region there is not that finding lessening
                    moving = {s: v for s, v in moving.items() if v[0] > 0}
                if not moving:  # confidence: the least certain side's probability of not lessening
                    coarse, side, x = 0, "", None
                    conf = float(min(pred[s][1][i] if pred[s][0][i] == 0 else 1 - pred[s][1][i] for s in sides))
                else:
                    best = max(moving, key=lambda s: moving[s][1])
                    coarse, conf = moving[best]
                    x = X[best][i]
                    same = [s for s, v in moving.items() if v[0] == coarse]
                    side = ("bilateral" if f == "Edema" else "") if best is None else \
                        ("bilateral" if len(same) == 2 else best)
                after = _present_after(ev, f)
                if after is None and coarse < 0 and f in self.resolved_models:
                    after = not bool(self.resolved_models[f].predict(x[None])[0])
                if coarse > 0:
                    d = "worse" if before else "new"
                elif coarse < 0:
                    d = "resolved" if after is False else "better"
                else:
                    d = "unchanged"
                out[i].append({"finding": f, "direction": d, "side": side, "confidence": conf,
                               "present_before": before, "measure": _measure_text(ev, f, side, coarse)})
        return out


def _present_before(ev: dict, f: str, prior_labels: dict | None) -> bool | None:
    """Was `f` there on the prior: the judge's reading, else the prior report's label, else (cardiomegaly)
    the cardiothoracic ratio; None when nothing says (an increase is then reported as new)."""
    key = FINDING_KEYS[f]
    if f"p_{key}_0" in ev:
        return ev[f"p_{key}_0"] >= 0.5
    if prior_labels is not None:
        v = prior_labels.get(f)
        if v is not None and not (isinstance(v, float) and np.isnan(v)):
            return v in (1, -1)
    if f == "Cardiomegaly":
        return ev["ctr_0"] > CTR_NORMAL_MAX
    return None


def _present_after(ev: dict, f: str) -> bool | None:
    key = FINDING_KEYS[f]
    if f"p_{key}_1" in ev:
        return ev[f"p_{key}_1"] >= 0.5
    if f == "Cardiomegaly" and "ctr_1" in ev:
        return ev["ctr_1"] > CTR_NORMAL_MAX
    return None  # unknown: a decrease is reported as "better", never guessed to be "resolved"


def _pct(v: float) -> str:
    return f"{100 * v:+.0f} %"


def _measure_text(ev: dict, f: str, side: str, coarse: int) -> str:
    """The measurement that supports the statement, in words a reader can check on the heat map."""
    sides = ["left", "right"] if side in ("bilateral", "") else [side]
    if f == "Cardiomegaly":
        if "ctr_1" in ev:
            return f"CTR {ev['ctr_0']:.2f} -> {ev['ctr_1']:.2f}"
        return f"CTR {ev['ctr_0']:.2f}, heart-border density {_pct(ev['heart_rim'])}"
    if f == "Edema":
        return f"perihilar density {_pct(ev['opac_perihilar'])}"
    parts = []
    for s in sides:
        if f == "Pneumothorax":
            parts.append(f"{s} pneumothorax area {_pct(ev[f'ptx_area_{s}'])} of the lung")
        elif f == "Pleural Effusion":
            parts.append(f"{s} basal opacified area {_pct(ev[f'effusion_area_{s}'])} of the lung")
        else:
            txt = f"{s} mid-zone density {_pct(ev[f'opac_middle_{s}'])}"
            if f"d_lung_{s}" in ev:
                txt += f", aerated {s} lung {_pct(ev[f'd_lung_{s}'])}"
            parts.append(txt)
    return "; ".join(parts)


_NAMES = {"Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Edema": "pulmonary edema",
          "Pleural Effusion": "pleural effusion", "Pneumothorax": "pneumothorax"}


def sentence(rows: list[dict], with_measures: bool = True) -> str:
    """The changes-of-findings text of one interpretation (rows from Interpreter.interpret)."""
    said, same = [], []
    for r in rows:
        name = _NAMES[r["finding"]]
        side = f"{r['side']} " if r["side"] and r["finding"] != "Edema" else ""
        m = f" ({r['measure']})" if with_measures and r["measure"] else ""
        d = r["direction"]
        if d == "unchanged":
            same.append(name)
        elif d == "new":
            said.append(f"new {side}{name}{m}")
        elif d == "worse":
            said.append(f"{side}{name} has worsened{m}")
        elif d == "better":
            said.append(f"{side}{name} has improved{m}")
        else:
            said.append(f"{side}{name} has resolved{m}")
    if not said:
        return "No visible change in " + _join(same) + "."
    text = "; ".join(said)
    text = text[0].upper() + text[1:] + "."
    if same:
        text += " No change in " + _join(same) + "."
    return text


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# --------------------------------------------------------------------------- scoring

def direction_scores(pred: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Per finding (and 'mean'): direction accuracy (5 classes), coarse accuracy (increase / unchanged /
    decrease), F1 of 'changed', macro-F1 over the coarse classes, side accuracy (lateral findings, over
    pairs where both say the finding changed), n. `pred` and `truth` have pair_id, finding, direction, side."""
    m = pred.merge(truth, on=["pair_id", "finding"], suffixes=("", "_true"))
    if m.empty:
        raise ValueError("direction_scores: no (pair, finding) in common between prediction and truth")
    rows = []
    for f, g in list(m.groupby("finding", sort=False)) + [("mean", m)]:
        pc, tc = g["direction"].map(COARSE), g["direction_true"].map(COARSE)
        both = g[(pc != 0) & (tc != 0) & g["finding"].isin(LATERAL)]
        rows.append({"finding": f, "n": len(g) if f != "mean" else len(g) // len(FINDINGS),
                     "direction_acc": float((g["direction"] == g["direction_true"]).mean()),
                     "coarse_acc": float((pc == tc).mean()),
                     "changed_f1": float(f1_score(tc != 0, pc != 0, zero_division=0)),
                     "macro_f1": float(f1_score(tc, pc, labels=[-1, 0, 1], average="macro", zero_division=0)),
                     "side_acc": float((both["side"] == both["side_true"]).mean()) if len(both) else np.nan,
                     "n_changed_true": int((tc != 0).sum())})
    return pd.DataFrame(rows)


_RESOLVED_RE = re.compile(r"\b(?:resolv\w*|clear(?:ed|ing)|no\s+longer|disappear\w*|gone)\b", re.I)
_CLAUSE_SPLIT = re.compile(r"[.;,]\s*|\s+and\s+|\s+but\s+", re.I)


def parse_hypothesis(description: str) -> dict[str, dict]:
    """What a progression description asks for, per finding it mentions: {'expect': 'increase' |
    'decrease' | 'unchanged' | 'absent' | 'present', 'side': str} (bmjlib.text.reports.extract_findings).

    A finding said to have resolved ("the left pneumothorax has resolved", "resolved pulmonary edema")
    asks for a decrease; one merely denied ("no pneumothorax") asks for it to be absent."""
    out = {}
    resolved = set()
    for clause in _CLAUSE_SPLIT.split(description):
        if _RESOLVED_RE.search(clause):
            resolved |= {f for f, r in extract_findings(clause).items() if r["status"] == "absent"}
    for f, r in extract_findings(description).items():
        if f not in FINDINGS:
            continue
        ch = r.get("change")
        if r["status"] == "absent":
            expect = "decrease" if f in resolved else "absent"
        elif ch in ("new", "worse"):
            expect = "increase"
        elif ch == "better":
            expect = "decrease"
        elif ch == "unchanged":
            expect = "unchanged"
        elif r["status"] == "present":
            expect = "present"
        else:
            continue  # uncertain without a change word asks for nothing checkable
        out[f] = {"expect": expect, "side": r.get("side", "")}
    return out


def consistent(expect: str, direction: str, present_before: bool) -> bool:
    """Does one finding's interpreted change do what the description asked?"""
    c = COARSE[direction]
    return {"increase": c > 0, "decrease": c < 0, "unchanged": c == 0,
            "absent": c < 0 or (c == 0 and not present_before),
            "present": c > 0 or (c == 0 and present_before)}[expect]


def consistency(interp: pd.DataFrame, descriptions: pd.Series) -> pd.DataFrame:
    """Hypothesis consistency per (pair, mentioned finding): `interp` rows (pair_id, finding, direction,
    side, present_before), `descriptions` indexed by pair_id. Also flags unmentioned findings the image
    changed anyway (`spurious`). Returns pair_id, finding, expect, direction, consistent, side_ok, spurious."""
    rows = []
    by_pair = {pid: g for pid, g in interp.groupby("pair_id")}
    for pid, g in by_pair.items():
        asked = parse_hypothesis(str(descriptions.get(pid, "")))
        for r in g.itertuples(index=False):
            if r.finding in asked:
                a = asked[r.finding]
                ok = consistent(a["expect"], r.direction, r.present_before == 1)  # unknown (None, NaN): not present
                side_ok = np.nan
                if r.finding in LATERAL and a["side"] and COARSE[r.direction] != 0:
                    side_ok = float(a["side"] == r.side)
                rows.append({"pair_id": pid, "finding": r.finding, "expect": a["expect"],
                             "direction": r.direction, "consistent": ok, "side_ok": side_ok, "spurious": False})
            else:
                rows.append({"pair_id": pid, "finding": r.finding, "expect": "", "direction": r.direction,
                             "consistent": np.nan, "side_ok": np.nan, "spurious": COARSE[r.direction] != 0})
    return pd.DataFrame(rows)


def consistency_summary(table: pd.DataFrame) -> dict[str, float]:
    asked = table[table["expect"] != ""]
    free = table[table["expect"] == ""]
    return {"hypothesis_consistency": float(asked["consistent"].astype(float).mean()) if len(asked) else np.nan,
            "side_consistency": float(asked["side_ok"].astype(float).mean()) if asked["side_ok"].notna().any() else np.nan,
            "spurious_change_rate": float(free["spurious"].mean()) if len(free) else np.nan,
            "n_asked": int(len(asked))}
