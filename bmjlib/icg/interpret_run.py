"""Notebook 10's steps: interpret every counterfactual of a run, score the interpretations, export ICG-CXR.

(ProgEmu / ICG-CXR interpretable counterfactuals; the measurement and decision logic is in
bmjlib.icg.interpret.) The counterfactuals interpreted are, per test pair:

- `reference`: the real follow-up registered onto the prior (what ICG-CXR's changes-of-findings describe);
- `true_counterfactual` (phantom only): the prior patient with the follow-up's disease, pixel-aligned;
  interpreting it validates the whole pipeline against the truth;
- every model of Table 1 found in 06_generate/<model>/<pair_id>.png (biomedjourney, one_stage,
  text_only, copy_prior; copy_prior must read "unchanged" everywhere).

Masks of the prior come from the anatomy judge when judges are given, else from the phantom's truth;
masks of a counterfactual come from the anatomy judge (none without judges: then only the heat map and
the prior's anatomy are used, and the interpreter is calibrated the same way). Calibration pairs are
train-split pairs (never test pairs) with the registered follow-up as the counterfactual and the known
change (`change_table`): the phantom's truth, or on real data (MIMIC-CXR, ICG-CXR) what the two reports
say (`report_directions`; on the demo phantom it agrees with the truth on 96.6 % of the 1,639 of 2,600
(pair, finding) cells it labels, and on the side of all 399 changed lateral findings).
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from bmjlib.data.icg import read_icg, row_origins, rows_credentialed, write_icg
from bmjlib.data.registration import parse_affine
from bmjlib.evaluation.judges import load_judges
from bmjlib.icg import interpret as I
from bmjlib.io import (ImageError, atomic_dir, atomic_write_csv, atomic_write_json, code_fingerprint_of, fingerprint,
                       read_image, resize_image, save_figure, sha256_file, write_table)
from bmjlib.runtime import resolve
from bmjlib.schema import FINDINGS, label_col
from bmjlib.text.progression import changes, compose_report
from bmjlib.text.reports import extract_findings

MODELS = ["biomedjourney", "one_stage", "text_only", "copy_prior"]


def warp_masks(masks: dict, affine: np.ndarray, shape) -> dict:
    """Follow-up masks resampled into the prior's grid: prior pixel (x, y) takes the follow-up mask at
    affine @ (x, y, 1) (truth/pairs.csv's prior -> follow-up convention); nearest neighbour."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    fx = affine[0, 0] * xx + affine[0, 1] * yy + affine[0, 2]
    fy = affine[1, 0] * xx + affine[1, 1] * yy + affine[1, 2]
    return {k: ndimage.map_coordinates(v.astype(np.uint8), [fy, fx], order=0, mode="constant").astype(bool)
            for k, v in masks.items()}


class TruthMasks:
    """The phantom's true organ masks (truth/masks/<dicom_id>.npz)."""

    def __init__(self, truth_dir):
        self.dir = Path(truth_dir) / "masks"

    def __call__(self, dicom_id: str) -> dict:
        p = self.dir / f"{dicom_id}.npz"
        if not p.exists():
            raise FileNotFoundError(f"{p}: no true masks for image {dicom_id}")
        with np.load(p) as z:
            return I.as_mask_dict({k: z[k] for k in z.files})


def _labels(row) -> dict:
    return {f: row.get(label_col("prior", f), np.nan) for f in FINDINGS}


def pair_table(run_dir) -> pd.DataFrame:
    """Pairs with descriptions (03, else 02), joined with the phantom truth's affine and true
    counterfactual path when the run has a phantom."""
    run = resolve(run_dir)
    for p in (run / "03_descriptions" / "pairs.csv", run / "02_registration" / "pairs.csv"):
        if p.exists():
            pairs = pd.read_csv(p, dtype={"subject_id": str, "prior_study_id": str, "followup_study_id": str,
                                          "prior_dicom_id": str, "followup_dicom_id": str},
                                keep_default_na=False, na_values=[""])
            break
    else:
        raise FileNotFoundError(f"{run}: neither 03_descriptions/pairs.csv nor 02_registration/pairs.csv")
    truth = run / "00_phantom" / "truth" / "pairs.csv"
    if truth.exists():
        t = pd.read_csv(truth, dtype=str)[["pair_id", "affine", "counterfactual_path"]]
        pairs = pairs.merge(t, on="pair_id", how="left")
    for c in ("description", "registered_path"):
        if c not in pairs:
            pairs[c] = ""
    return pairs


def collect_evidence(pairs: pd.DataFrame, cf_paths: list[str], judges: dict | None, truth: TruthMasks | None,
                     size: int, cf_masks_from_truth: bool = False, batch: int = 64, desc: str = "evidence"):
    """Evidence for each (pair, counterfactual image). Unreadable images are skipped and returned in
    `skipped` (pair_id, path, problem), never turned into zeros. Returns (evidence list, kept rows, skipped)."""
    evs, kept, skipped = [], [], []
    rows = list(pairs.to_dict("records"))
    finding = (judges or {}).get("finding")
    anat = (judges or {}).get("anatomy")
    for i in tqdm(range(0, len(rows), batch), desc=desc, leave=False, disable=len(rows) <= batch):
        chunk, pri, cfs = [], [], []
        for r, cp in zip(rows[i:i + batch], cf_paths[i:i + batch]):
            try:
                p, c = read_image(r["prior_path"]), read_image(cp)
            except ImageError as e:
                skipped.append({"pair_id": r["pair_id"], "path": e.path, "problem": e.problem})
                continue
            p, c = resize_image(p, size), resize_image(c, size)
            chunk.append(r)
            pri.append(p)
            cfs.append(c)
        if not chunk:
            continue
        P, C = np.stack(pri), np.stack(cfs)
        probs0 = finding.predict(P) if finding is not None else [None] * len(chunk)
        probs1 = finding.predict(C) if finding is not None else [None] * len(chunk)
        if anat is not None:
            m0, m1 = anat.predict(P), anat.predict(C)
            masks0 = [I.as_mask_dict(m) for m in m0]
            masks1 = [I.as_mask_dict(m) for m in m1]
        else:
            masks0 = [I.resize_masks(truth(r["prior_dicom_id"]), (size, size)) for r in chunk]
            masks1 = [None] * len(chunk)
            if cf_masks_from_truth:
                masks1 = [I.resize_masks(warp_masks(truth(r["followup_dicom_id"]), parse_affine(r["affine"]),
                                                    _shape_of(truth, r["prior_dicom_id"])), (size, size))
                          for r in chunk]
        for j, r in enumerate(chunk):
            try:
                evs.append(I.evidence(P[j], C[j], masks0[j], masks1[j], probs0[j], probs1[j]))
            except ValueError as e:  # e.g. the anatomy judge finds no lung in a generated image
                skipped.append({"pair_id": r["pair_id"], "path": "", "problem": f"no evidence: {e}"})
                continue
            kept.append(r)
    return evs, pd.DataFrame(kept, columns=pairs.columns), pd.DataFrame(skipped, columns=["pair_id", "path", "problem"])


def _shape_of(truth: TruthMasks, dicom_id: str):
    return next(iter(truth(dicom_id).values())).shape


def report_directions(pairs: pd.DataFrame) -> pd.DataFrame:
    """The change per (pair, finding) as the two reports state it, for data without a phantom truth.

    Directions are the offline synthesiser's reading of the pair (`progression.changes`: new / worse /
    better / resolved / unchanged, from the stated status, severity and comparison wording); a finding
    both reports call absent is unchanged; a finding the follow-up report does not mention is left out
    (unknown: neither calibrated on nor scored). The side is the follow-up's for an increase and the
    prior's for a decrease (as `interpret.truth_directions`). Same columns as that function, with the
    stated grades as sev_0 / sev_1 (0 = absent or not stated)."""
    rows = []
    for r in pairs.to_dict("records"):
        prior = compose_report(r.get("prior_findings"), r.get("prior_impression"))
        follow = compose_report(r.get("followup_findings"), r.get("followup_impression"))
        said, p, f = changes(prior, follow), extract_findings(prior), extract_findings(follow)
        for name in FINDINGS:
            d = said.get(name) or ("unchanged" if name in f else None)
            if d is None:
                continue
            a, b = p.get(name) or {}, f.get(name) or {}
            side = ""
            if d != "unchanged" and name in I.LATERAL:
                first, second = (b, a) if I.COARSE[d] > 0 else (a, b)
                side = first.get("side") or second.get("side") or ""
            rows.append({"pair_id": r["pair_id"], "finding": name, "sev_0": a.get("severity", 0),
                         "sev_1": b.get("severity", 0), "direction": d, "side": side})
    return pd.DataFrame(rows, columns=["pair_id", "finding", "sev_0", "sev_1", "direction", "side"])


def change_table(pairs: pd.DataFrame, truth_images: pd.DataFrame | None) -> pd.DataFrame:
    """The known change that calibrates and scores the interpreter: the phantom's truth when the run has
    one (`truth_images`, truth/images.csv), else the reports' (`report_directions`)."""
    return I.truth_directions(pairs, truth_images) if truth_images is not None else report_directions(pairs)


def calibrate(pairs: pd.DataFrame, truth_images: pd.DataFrame | None, judges, truth: TruthMasks | None, size: int,
              n: int, seed: int = 0, truth_dir=None, cf_masks_from_truth: bool = False) -> tuple[I.Interpreter, int]:
    """Fit the interpreter on up to `n` train-split pairs with their known change (`change_table`). Each pair contributes
    its registered follow-up (a real image of the new state, registered onto the prior) and, on the
    phantom, its true counterfactual (pixel-aligned with the prior, as a generated image is), so the
    interpreter has seen both kinds of image. Without a phantom truth the only pixel-aligned image of a
    known change is the prior itself (every finding unchanged), so each pair also contributes that: without
    it the interpreter, never shown an image identical to its prior, read change into copies of the prior
    (on a 36-patient phantom: "resolved atelectasis" for every copy). Never test pairs."""
    cal = pairs[pairs["split"] == "train"]
    if len(cal) > n:
        cal = cal.sample(n, random_state=seed)
    parts = []
    reg = cal[cal["registered_path"].fillna("").astype(bool)]
    if len(reg):
        parts.append((reg, reg["registered_path"].tolist()))
    if truth_dir is not None and "counterfactual_path" in cal and cal["counterfactual_path"].notna().any():
        tc = cal[cal["counterfactual_path"].notna()]
        parts.append((tc, [str(Path(truth_dir) / p) for p in tc["counterfactual_path"]]))
    if not parts:
        raise ValueError("calibration: no train pair has a registered follow-up or a true counterfactual")
    identity = len(parts) if truth_images is None else None
    if identity is not None:
        parts.append((cal, cal["prior_path"].tolist()))
    evs, ids, kept_all, problems = [], [], [], []
    for k, (df, paths) in enumerate(parts):
        e, kept, skipped = collect_evidence(df, paths, judges, truth, size, desc="calibration",
                                            cf_masks_from_truth=cf_masks_from_truth)
        problems += skipped["problem"].tolist()
        evs += e
        ids += [f"{pid}#{k}" for pid in kept["pair_id"]]
        kept_all.append(kept.assign(pair_id=[f"{pid}#{k}" for pid in kept["pair_id"]]))
    if not evs:
        why = (f"all {len(problems)} calibration images were skipped (first problem: {problems[0]}); "
               "an anatomy judge that finds no lungs cannot calibrate, so train it longer or run without judges"
               if problems else "no train pair has a registered follow-up or a true counterfactual")
        raise ValueError(f"calibration: {why}")
    t = change_table(pd.concat([kp for k, kp in enumerate(kept_all) if k != identity], ignore_index=True),
                     truth_images)
    if identity is not None:
        t = pd.concat([t, pd.DataFrame([{"pair_id": pid, "finding": f, "sev_0": 0, "sev_1": 0,
                                         "direction": "unchanged", "side": ""}
                                        for pid in kept_all[identity]["pair_id"] for f in FINDINGS])],
                      ignore_index=True)
    return I.Interpreter().fit(evs, t, ids), len(evs)


def interpret_rows(interp: I.Interpreter, evs: list[dict], kept: pd.DataFrame, model: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long table (one row per pair and finding) and sentences (one per pair) for one model."""
    long, sent = [], []
    recs = kept.to_dict("records")
    for rows, r in zip(interp.interpret_many(evs, [_labels(r) for r in recs]), recs):
        for x in rows:
            long.append({"model": model, "pair_id": r["pair_id"], **x})
        sent.append({"model": model, "pair_id": r["pair_id"], "description": r.get("description", ""),
                     "changes_of_findings": I.sentence(rows)})
    return pd.DataFrame(long), pd.DataFrame(sent)


def counterfactual_sources(run_dir, pairs: pd.DataFrame, models=MODELS) -> dict[str, list[str]]:
    """model -> one image path per pair (missing files stay in the list; they are skipped and counted)."""
    run = resolve(run_dir)
    out = {"reference": pairs["registered_path"].fillna("").tolist()}
    if "counterfactual_path" in pairs and pairs["counterfactual_path"].notna().all():
        truth = run / "00_phantom" / "truth"
        out["true_counterfactual"] = [str(truth / p) for p in pairs["counterfactual_path"]]
    for m in models:
        d = run / "06_generate" / m
        if d.is_dir():
            out[m] = [str(d / f"{pid}.png") for pid in pairs["pair_id"]]
    return out


def run_interpretation(run_dir, out_dir, judges_dir: str = "", size: int = 64, n_calibration: int = 300,
                       max_pairs: int = 0, seed: int = 0, models=MODELS, truth_masks_row: bool = False) -> dict:
    """Interpret every counterfactual of the run's test pairs, score, write CSVs; return the tables.

    `truth_masks_row` (phantom, no judges) adds 'true_counterfactual+true_masks': the true counterfactual
    measured with its true organ masks, by an interpreter calibrated with true masks (the measurement
    ceiling); off by default as it costs a second calibration."""
    run, out = resolve(run_dir), resolve(out_dir)
    truth_dir = run / "00_phantom" / "truth"
    key = fingerprint(_inputs_key(run, judges_dir, size, n_calibration, max_pairs, seed, models), truth_masks_row)
    stamp = out / "run.json"
    names = ("interpretations", "sentences", "direction_scores", "summary", "skipped", "consistency")
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key and \
            all((out / f"{k}.csv").exists() for k in names):
        tables = {k: _read_table(out / f"{k}.csv") for k in names}
        return {**tables, **{k: v for k, v in json.loads(stamp.read_text()).items() if k != "key"}}
    pairs = pair_table(run)
    # a phantom's truth counts only for its own images: a run of other data may hold one that is not its cohort
    ids = pairs["prior_dicom_id"].dropna().astype(str)
    judges = None
    if judges_dir and (Path(judges_dir) / "finding").is_dir():
        judges = load_judges(judges_dir)
    truth = TruthMasks(truth_dir) if any((truth_dir / "masks" / f"{d}.npz").is_file() for d in ids) else None
    if judges is None and truth is None:
        # Real images without an anatomy judge (e.g. a label-free cohort on a shipped model): every measurement
        # of the interpreter lies inside organ masks, so nothing is interpreted; the export still runs.
        why = (f"not interpreted: the interpretation measures changes inside organ masks, from the phantom's truth "
               f"or the anatomy judge of notebook 05, and this run has neither (judges: {judges_dir or 'none'}); "
               "the ICG-CXR export carries each pair's own changes-of-findings, if any")
        return {**_empty_tables(), "n_calibration": 0, "judges": False, "directions_from": "", "interpreted": False,
                "why": why}
    images = pd.read_csv(truth_dir / "images.csv", dtype={"dicom_id": str}) \
        if (truth_dir / "images.csv").exists() else None
    if images is not None and not ids.isin(images["dicom_id"]).any():
        images = None
    directions_from = "phantom truth" if images is not None else "reports"
    interp, n_cal = calibrate(pairs, images, judges, truth, size, n_calibration, seed, truth_dir)
    test = pairs[pairs["split"] == "test"]
    if max_pairs:
        test = test.head(max_pairs)
    truth_dirs = change_table(test, images)
    longs, sents, skips, scores, cons, conss = [], [], [], [], [], []
    # the reference (registered follow-up) is interpreted for every pair, so the ICG-CXR export has a
    # changes-of-findings for each triple; only test pairs are scored (train pairs were calibration data)
    others = pairs[(pairs["split"] != "test") & pairs["registered_path"].fillna("").astype(bool)]
    if max_pairs:
        others = others.head(0)
    sources = counterfactual_sources(run, test, models)
    sources["reference"] = sources["reference"] + others["registered_path"].tolist()
    everyone = pd.concat([test, others], ignore_index=True)
    def one(model, paths, interpreter, true_masks=False):
        evs, kept, sk = collect_evidence(everyone.head(len(paths)), paths, judges, truth, size, desc=model,
                                         cf_masks_from_truth=true_masks)
        sk["model"] = model
        skips.append(sk)
        if not evs:
            return
        lg, st = interpret_rows(interpreter, evs, kept, model)
        longs.append(lg)
        sents.append(st)
        in_test = kept["pair_id"].isin(test["pair_id"]).to_numpy()
        lg = lg[lg["pair_id"].isin(test["pair_id"])]
        kept = kept[in_test]
        sc = I.direction_scores(lg, truth_dirs)
        scores.append(sc.assign(model=model))
        ct = I.consistency(lg, kept.set_index("pair_id")["description"])
        conss.append(ct.assign(model=model))
        cons.append({"model": model, "n_pairs": len(kept), "n_skipped": len(sk),
                     **sc.set_index("finding").loc["mean", ["direction_acc", "coarse_acc", "changed_f1",
                                                            "macro_f1", "side_acc"]].to_dict(),
                     **I.consistency_summary(ct)})

    for model, paths in sources.items():
        one(model, paths, interp)
    if truth_masks_row and judges is None and "true_counterfactual" in sources:
        # the measurement ceiling: the true counterfactual with its true masks (the follow-up's, moved
        # into the prior's frame by the true transform), interpreter calibrated the same way
        interp_tm, _ = calibrate(pairs, images, None, truth, size, n_calibration, seed, truth_dir,
                                 cf_masks_from_truth=True)
        one("true_counterfactual+true_masks", sources["true_counterfactual"], interp_tm, true_masks=True)
    tables = {"interpretations": pd.concat(longs, ignore_index=True),
              "sentences": pd.concat(sents, ignore_index=True),
              "direction_scores": pd.concat(scores, ignore_index=True),
              "summary": pd.DataFrame(cons), "skipped": pd.concat(skips, ignore_index=True),
              "consistency": pd.concat(conss, ignore_index=True),
              "n_calibration": n_cal, "judges": judges is not None, "directions_from": directions_from,
              "interpreted": True, "why": ""}
    out.mkdir(parents=True, exist_ok=True)
    for k in names:
        atomic_write_csv(out / f"{k}.csv", tables[k])
    atomic_write_json(stamp, {"key": key, "n_calibration": n_cal, "judges": judges is not None,
                              "directions_from": directions_from, "interpreted": True, "why": ""})
    return tables


def _empty_tables() -> dict:
    """run_interpretation's tables with their columns and no row (a run with nothing to interpret)."""
    return {"interpretations": pd.DataFrame(columns=["model", "pair_id", "finding", "direction", "side"]),
            "sentences": pd.DataFrame(columns=["model", "pair_id", "description", "changes_of_findings"]),
            "direction_scores": pd.DataFrame(columns=["finding", "direction_acc", "coarse_acc", "model"]),
            "summary": pd.DataFrame(columns=SUMMARY_COLS),
            "skipped": pd.DataFrame(columns=["pair_id", "path", "problem", "model"]),
            "consistency": pd.DataFrame(columns=["model", "pair_id", "finding", "expect", "consistent"])}


def _read_table(path: Path) -> pd.DataFrame:
    """A table written by run_interpretation, with its empty text cells as "" (not NaN) again."""
    t = pd.read_csv(path, keep_default_na=False, na_values=[""])
    text = [c for c in ("expect", "side", "measure", "description", "changes_of_findings", "path", "problem")
            if c in t]
    return t.fillna({c: "" for c in text})


def _inputs_key(run: Path, judges_dir, size, n_calibration, max_pairs, seed, models) -> str:
    """Fingerprint of everything an interpretation run reads: its code, parameters, pair tables, judges, and
    the names and sizes of the counterfactual images (a regenerated image changes the key)."""
    parts = [code_fingerprint_of(__name__), size, n_calibration, max_pairs, seed, list(models)]
    for p in (run / "03_descriptions" / "pairs.csv", run / "02_registration" / "pairs.csv",
              run / "00_phantom" / "truth" / "images.csv", Path(judges_dir or "/nonexistent") / "fingerprint.json"):
        parts.append(sha256_file(p) if p.exists() else "")
    for m in models:
        d = run / "06_generate" / m
        parts.append(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in d.glob("*.png"))
                     if d.is_dir() else None)
    return fingerprint(*parts)


# --------------------------------------------------------------------------- tables, figure, export

SUMMARY_COLS = ["model", "n_pairs", "direction_acc", "coarse_acc", "changed_f1", "macro_f1", "side_acc",
                "hypothesis_consistency", "side_consistency", "spurious_change_rate"]


def write_summary(summary: pd.DataFrame, fig_dir, name: str = "table_icg_interpretation") -> pd.DataFrame:
    """The per-model table (Table 1's models + reference + true counterfactual) as CSV and Markdown."""
    t = summary[[c for c in SUMMARY_COLS if c in summary]]
    note = ("\nDirection scores are against the phantom's true change (prior vs follow-up severity); "
            "hypothesis consistency compares the interpretation with what the progression description asked "
            "(parsed by bmjlib.text.reports); spurious = a finding the description did not mention that the image "
            "changed.\n")
    write_table(t, fig_dir, name, note=note)
    return t


def pick_examples(sentences: pd.DataFrame, cons: pd.DataFrame, model: str, n_good: int = 3) -> list[tuple[str, bool]]:
    """Pairs for the figure: the most consistent ones and the least consistent one (a failure)."""
    c = cons[(cons["model"] == model) & (cons["expect"] != "")].copy()
    c["consistent"] = c["consistent"].astype(float)
    per = c.groupby("pair_id")["consistent"].agg(["mean", "size"]).sort_values(["mean", "size"], ascending=False)
    if per.empty:
        return []
    good = [p for p in per.index[:n_good] if per.loc[p, "mean"] > 0.5]
    worst = per.sort_values(["mean", "size"], ascending=[True, False]).index[0]
    bad = [worst] if per.loc[worst, "mean"] < 1.0 and worst not in good else []
    return [(p, float(per.loc[p, "mean"])) for p in good + bad]


def interpretation_figure(run_dir, tables: dict, model: str, fig_dir, size: int, judges_dir: str = "",
                          n_good: int = 3, name: str = "fig_icg_interpretations"):
    """Prior | counterfactual | difference heat map | instruction and interpretation, for a few pairs
    including the least consistent (a failure). PNG + PDF. Returns (figure, path)."""
    run = resolve(run_dir)
    pairs = pair_table(run)
    test = pairs[pairs["split"] == "test"].set_index("pair_id", drop=False)
    cons = tables["consistency"]
    chosen = pick_examples(tables["sentences"], cons, model, n_good)
    if not chosen:
        raise ValueError(f"no interpreted pair of model {model!r} with a checkable description")
    sources = counterfactual_sources(run, test.loc[[p for p, _ in chosen]], [model])
    judges = None
    if judges_dir and (Path(judges_dir) / "finding").is_dir():
        judges = load_judges(judges_dir)
    truth_dir = run / "00_phantom" / "truth"
    truth = TruthMasks(truth_dir) if (truth_dir / "masks").is_dir() else None
    sub = test.loc[[p for p, _ in chosen]]
    evs, kept, _ = collect_evidence(sub, sources[model], judges, truth, size)
    sent = tables["sentences"][tables["sentences"]["model"] == model].set_index("pair_id")
    fig, axes = plt.subplots(len(kept), 4, figsize=(13, 3.1 * len(kept)),
                             gridspec_kw={"width_ratios": [1, 1, 1, 1.9]}, squeeze=False)
    for i, (ev, r) in enumerate(zip(evs, kept.to_dict("records"))):
        prior = resize_image(read_image(r["prior_path"]), size)
        cf = resize_image(read_image(sources[model][list(sub["pair_id"]).index(r["pair_id"])]), size)
        d = ev["heatmap"]
        lim = max(0.05, float(np.abs(d).max()))
        for ax, im, title in ((axes[i, 0], prior, "prior"), (axes[i, 1], cf, f"counterfactual ({model})")):
            ax.imshow(im, cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
        axes[i, 2].imshow(prior, cmap="gray", vmin=0, vmax=1)
        hm = axes[i, 2].imshow(d, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.65)
        axes[i, 2].set_title("difference (red = denser)", fontsize=9)
        fig.colorbar(hm, ax=axes[i, 2], fraction=0.046, pad=0.02)
        frac = dict(chosen)[r["pair_id"]]
        asked = cons[(cons["model"] == model) & (cons["pair_id"] == r["pair_id"]) & (cons["expect"] != "")]
        n_ok = int(asked["consistent"].astype(float).sum())
        verdict = (f"[consistent: {n_ok} of {len(asked)} requested changes]" if frac > 0.5 else
                   f"[FAILURE: {n_ok} of {len(asked)} requested changes]")
        text = ("Instruction: " + textwrap.fill(str(r.get("description", "")), 62) + "\n\nInterpretation: "
                + textwrap.fill(sent.loc[r["pair_id"], "changes_of_findings"], 62) + "\n\n" + verdict)
        axes[i, 3].text(0.0, 1.0, text, va="top", ha="left", fontsize=8, family="monospace",
                        color="black" if frac > 0.5 else "firebrick", transform=axes[i, 3].transAxes)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 3].axis("off")
    fig.suptitle("Interpretable counterfactuals: what the image changed, measured (ProgEmu-style changes-of-findings)",
                 fontsize=10)
    fig.tight_layout()
    return fig, save_figure(fig, fig_dir, name, dpi=130, bbox_inches=None)[0]


def export_icg(run_dir, out_dir, tables: dict, origin: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Every registered triple of the run as ICG-CXR pair folders, with the reference interpretation
    (registered follow-up vs prior) as changes-of-findings; read back and compared (nothing lost). The origin
    written is each row's own (`write_icg`); for a table whose rows do not say, 'phantom' only when no row is
    credentialed, else 'credentialed'."""
    pairs = pair_table(run_dir)
    pairs = pairs[pairs["registered_path"].fillna("").astype(bool)].drop(columns=["affine", "counterfactual_path"],
                                                                        errors="ignore")
    if origin is None and not all(row_origins(pairs)):
        origin = "phantom" if not rows_credentialed(pairs) else "credentialed"
    s = tables["sentences"]
    interp = s[s["model"] == "reference"][["pair_id", "changes_of_findings"]]
    # Rebuilt whole, never appended to: pairs a previous run exported and this one does not are gone.
    with atomic_dir(out_dir) as tmp:
        written = write_icg(pairs, tmp, interpretations=interp, origin=origin)
    for c in ("folder", "json"):
        if c in written:
            written[c] = [str(v).replace(str(tmp), str(Path(out_dir))) for v in written[c]]
    _, back, skipped = read_icg(out_dir)
    back = back.set_index("pair_id").loc[pairs["pair_id"]]
    same = {c: bool((pairs.set_index("pair_id")[c].fillna("").astype(str) ==
                     back[c].fillna("").astype(str)).all())
            for c in ("subject_id", "split", "description", "prior_findings", "followup_impression", "sex", "race",
                      "prior_study_id", "followup_dicom_id") if c in pairs}
    check = {"written": len(written), "read_back": len(back), "skipped": len(skipped),
             "interpretations": int((back["changes_of_findings"] != "").sum()), "identical_columns": same}
    return written, check
