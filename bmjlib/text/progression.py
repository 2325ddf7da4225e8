"""Progression descriptions: the prompt, the offline synthesiser and the pipeline over pairs (paper §3, Fig. 2).

For each (prior, follow-up) pair the paper asks GPT-4 for a short description of how the disease changed
between the two reports; that sentence is the instruction the model learns to follow. Table 2 compares
it with the follow-up's IMPRESSION used as the instruction, so both are written:

- `description`: from the chosen backend (`llm`): OpenAI, Azure OpenAI, an OpenAI-compatible server, the
  replay-only cache, or the offline synthesiser (the default for the phantom): a deterministic sentence
  built from `reports.extract_findings` on both reports (new / worse / better / resolved / unchanged,
  side, severity).
- `instruction_impression`: the follow-up's IMPRESSION (its FINDINGS when a report has no IMPRESSION).

`describe_pairs` runs a backend over a pair table with the data-use guard first, the answer cache, the
retry policy and a concurrency limit; failed pairs are listed with their reason and left out of the
table, and a rerun retries only them. `run_step` is notebook 03's whole step.
"""
from __future__ import annotations

import json
import math
import random
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from bmjlib.io import (ImageError, Manifest, atomic_write_csv, atomic_write_json, code_fingerprint_of,
                       fingerprint, read_image, save_figure, sha256_file)
from bmjlib.runtime import resolve, step_dir
from bmjlib.testing import ChatServer, ok
from bmjlib.text import llm
from bmjlib.text.reports import clear_memo, extract_findings

PROMPT_VERSION = "bmj-progression-v1"
TARGET_CHARS = 150
PAPER_LENGTHS = {"GPT-4 description (paper)": 146, "impression (paper)": 179}
TEXT_COLUMNS = ["prior_findings", "prior_impression", "followup_findings", "followup_impression"]

SYSTEM_PROMPT = ("You are an experienced radiologist. You compare two chest X-ray reports of the same patient "
                 "and state how the disease changed between them, concisely and without any patient-identifying "
                 "information.")
USER_PROMPT = """Below are two chest X-ray reports of one patient: the PRIOR study and the FOLLOW-UP study.
Write ONE sentence of about {target} characters that describes how the findings changed from the prior to the follow-up; it will be used as an instruction to edit the prior image into the follow-up image.
- For each finding that changed, say whether it is new, worse, better or resolved; mention unchanged findings only briefly.
- Give the side (left, right, bilateral) and the severity (small/mild, moderate, large/severe) where the reports state them.
- Cover atelectasis, cardiomegaly, edema, pleural effusion, pneumothorax and other lung findings; ignore support devices, technique and comparison dates.
- Do not include names, dates, ages, "___" placeholders or any other patient-identifying information.
- Answer with the sentence only.

PRIOR REPORT:
<<<
{prior}
>>>

FOLLOW-UP REPORT:
<<<
{followup}
>>>"""


def compose_report(findings, impression) -> str:
    """A report from its two sections as the pair table holds them (NaN = absent section)."""
    f, i = _text(findings), _text(impression)
    parts = ([f"FINDINGS: {f}"] if f else []) + ([f"IMPRESSION: {i}"] if i else [])
    return "\n".join(parts)


def _text(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return " ".join(str(v).split())


def build_messages(prior_report: str, followup_report: str) -> list[dict]:
    """The chat messages for one pair (the Fig. 2 prompt)."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT.format(target=TARGET_CHARS, prior=prior_report,
                                                           followup=followup_report)}]


def reports_from_messages(messages: list[dict]) -> tuple[str, str]:
    """Inverse of build_messages (used by the loopback model in tests and the benchmark)."""
    user = next(m["content"] for m in messages if m["role"] == "user")
    prior = user.split("PRIOR REPORT:\n<<<\n", 1)[1].split("\n>>>", 1)[0]
    followup = user.split("FOLLOW-UP REPORT:\n<<<\n", 1)[1].split("\n>>>", 1)[0]
    return prior, followup


# --------------------------------------------------------------------------- offline synthesiser

_NAMES = {"Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Edema": "pulmonary edema",
          "Pleural Effusion": "pleural effusion", "Pneumothorax": "pneumothorax"}
_SIZE_WORDS = {1: "small", 2: "moderate", 3: "large"}
_GRADE_WORDS = {1: "mild", 2: "moderate", 3: "severe"}
_SEV_WORDS = {"Pleural Effusion": _SIZE_WORDS, "Pneumothorax": _SIZE_WORDS}
_ORDER = {"new": 0, "worse": 1, "better": 2, "resolved": 3, "unchanged": 4}


def _change(prior: dict | None, follow: dict | None) -> str | None:
    """new | worse | better | resolved | unchanged | None (nothing to say) for one finding."""
    p = prior["status"] if prior else None
    f = follow["status"] if follow else None
    if f is None or (f == "absent" and p in (None, "absent")):
        return None
    if f == "absent":
        return "resolved"
    stated = follow.get("change")
    if stated == "new":
        return "new"
    if p in (None, "absent"):
        return stated if stated in ("worse", "better", "unchanged") and p is None else "new"
    if f == "uncertain" and p == "present" and stated is None:
        return "better"
    if stated in ("worse", "better", "unchanged"):
        return stated
    ps, fs = prior["severity"], follow["severity"]
    if ps and fs and ps != fs:
        return "worse" if fs > ps else "better"
    return "unchanged"


def _clause(name: str, change: str, prior: dict | None, follow: dict | None) -> str:
    ref = follow if change != "resolved" else prior or follow
    words = _SEV_WORDS.get(name, _GRADE_WORDS)
    sev = words.get(ref["severity"], "") if change != "resolved" else ""
    side = ref["side"] if name not in ("Cardiomegaly", "Edema") or ref["side"] != "bilateral" else ""
    if name == "Atelectasis" and side == "bilateral":
        side = "bibasilar"
    noun = " ".join(w for w in (side, _NAMES[name]) if w)
    hedge = "possible " if follow and follow["status"] == "uncertain" else ""
    sized = name in _SEV_WORDS
    if change == "new":
        return f"{hedge}new {' '.join(w for w in (sev, noun) if w)}"
    if change in ("worse", "better") and follow["status"] == "uncertain":
        return f"questionable residual {noun}" if change == "better" else f"possible worsening {noun}"
    if change == "worse":
        return f"{noun} {'increased' if sized else 'worsened'} to {sev}" if sev else f"worsening {noun}"
    if change == "better":
        return f"{noun} {'decreased' if sized else 'improved'} to {sev}" if sev else f"improving {noun}"
    if change == "resolved":
        return f"resolved {noun}"
    return f"{hedge}unchanged {' '.join(w for w in (sev, noun) if w)}"


def _changes(p: dict, f: dict) -> dict[str, str]:
    out = {}
    for name in _NAMES:
        ch = _change(p.get(name), f.get(name))
        if ch:
            out[name] = ch
    return out


def changes(prior_report: str, followup_report: str) -> dict[str, str]:
    """{finding: new | worse | better | resolved | unchanged} for the five findings the two reports
    support (a finding neither report states is left out): what the offline synthesiser writes."""
    return _changes(extract_findings(prior_report), extract_findings(followup_report))


def synthesise(prior_report: str, followup_report: str) -> str:
    """The offline backend: one deterministic progression sentence from the extractor's reading of both reports."""
    return _sentence(extract_findings(prior_report), extract_findings(followup_report))


def _sentence(p: dict, f: dict) -> str:
    items = sorted((_ORDER[ch], ch, name) for name, ch in _changes(p, f).items())
    clauses = [_clause(name, ch, p.get(name), f.get(name)) for _, ch, name in items]
    # Keep it near the paper's length: beyond three clauses the unchanged ones are summarised.
    if len(clauses) > 3 and any(ch == "unchanged" for _, ch, _ in items):
        changed = [c for c, (_, ch, _) in zip(clauses, items) if ch != "unchanged"]
        clauses = changed + ["other findings unchanged"] if changed else clauses[:3] + ["other findings unchanged"]
    if not clauses:
        positive = any(v["status"] != "absent" for v in list(p.values()) + list(f.values()))
        return "No significant interval change." if positive else "No acute cardiopulmonary abnormality on either study."
    text = ", ".join(clauses[:-1]) + (" and " if len(clauses) > 1 else "") + clauses[-1]
    return text[0].upper() + text[1:] + "."


def describe_change(finding: str, change: str, severity: int = 0, side: str = "") -> str:
    """The synthesiser's sentence for one finding's change, e.g. ("Pleural Effusion", "new", 2, "left") ->
    "New moderate left pleural effusion." (`change`: new | worse | better | resolved | unchanged). The
    evaluation's probes (null edit, add-then-resolve, dose response) speak with the same words as the
    descriptions the model was trained on."""
    if finding not in _NAMES or change not in _ORDER:
        raise ValueError(f"describe_change: finding {finding!r} / change {change!r} unknown "
                         f"(findings {list(_NAMES)}, changes {list(_ORDER)})")
    stated = {"status": "present", "severity": int(severity), "side": side, "change": None}
    absent = {"status": "absent", "severity": 0, "side": side, "change": None}
    prior, follow = (stated, absent) if change == "resolved" else (None, stated)
    text = _clause(finding, change, prior, follow)
    return text[0].upper() + text[1:] + "."


def null_description(prior_report: str) -> str:
    """The description the synthesiser writes for a stable pair whose two reports both read like the prior
    ("Unchanged moderate left pleural effusion." / "No acute cardiopulmonary abnormality on either study."):
    every finding the prior states, unchanged. The prior's own change words ("New moderate right pleural
    effusion", "Worsening edema, now severe") compare it with an earlier study, not with itself, so they are
    dropped: "Unchanged moderate right pleural effusion.", "Unchanged severe pulmonary edema."."""
    same = {k: dict(v, change=None) for k, v in extract_findings(prior_report).items()}
    return _sentence(same, same)


def loopback_model(body: dict, n: int):
    """A responder for llm_server.ChatServer that answers like an LLM, using the offline synthesiser."""
    return ok(synthesise(*reports_from_messages(body["messages"])))


# --------------------------------------------------------------------------- the pipeline over pairs

# The description of every pair of a cohort that has no report text at all (`describe_pairs`).
NO_REPORT_DESCRIPTION = "No interval change."


class NoPairsError(ValueError):
    """Step 03 has no pair to describe, or described none; the message names the file."""


@dataclass
class DescribeResult:
    pairs: pd.DataFrame       # input rows that got a description, plus description, instruction_impression
    failures: pd.DataFrame    # pair_id, reason, attempts, backend, model
    decision: str             # the data-use guard's decision
    calls: int                # requests sent to a server in this run (0 for offline, replay and cache hits)
    cached: int               # answers taken from the cache
    seconds: float


def instruction_impression(row) -> str:
    """Table 2's "Impression" instruction: the follow-up's IMPRESSION, else its FINDINGS."""
    return _text(row.get("followup_impression")) or _text(row.get("followup_findings"))


_FALSE = {"false", "0", "0.0", "no"}


def credentialed_flags(values: pd.Series) -> pd.Series:
    """A `credentialed` column (booleans, or their text after a CSV round trip) -> booleans; a blank or
    unreadable value counts as credentialed."""
    return ~values.map(lambda v: str(v).strip().lower()).isin(_FALSE)


def data_origin(pairs: pd.DataFrame, source: str, declared: str | bool = "auto") -> tuple[str, bool]:
    """(name for the guard's messages, whether the text is credentialed), decided from the rows.

    Credentialed when any row says so (a `source` column naming mimic / chexpertplus / icg, or a true or
    blank `credentialed` value), when the profile's `source` names a credentialed dataset, when
    `declared` (the profile's data_credentialed) is true, or when the table has no `credentialed` column
    and `declared` is not false. Open only when every row is marked `credentialed = False` by its reader
    (or, without the column, the profile declares the data not credentialed). A declared false never
    reopens rows a reader marked credentialed: that is what llm_data_use_override (logged) is for.
    """
    declared = llm.declared_credentialed(declared)
    source = str(source or "").lower()
    names = [source]
    if "source" in pairs.columns:
        names += sorted(set(pairs["source"].dropna().astype(str).str.lower()))
    named = [n for n in names if n in llm.CREDENTIALED_SOURCES]
    if named:
        return named[0], True
    if "credentialed" in pairs.columns:
        if credentialed_flags(pairs["credentialed"]).any():
            return "credentialed", True
        return source, declared is True
    if declared is False:
        return source, False
    return (source if source not in llm.OPEN_SOURCES else "credentialed"), True


def data_source(pairs: pd.DataFrame, source: str, declared: str | bool = "auto") -> str:
    """The name the guard reports for this table (`data_origin`'s first element)."""
    return data_origin(pairs, source, declared)[0]


def describe_pairs(pairs: pd.DataFrame, backend: str = "offline", model: str = "", base_url: str = "",
                   azure_endpoint: str = "", api_version: str = "", key_env: str = "", source: str = "phantom",
                   allow_hosts: str | list[str] = "", data_use_override: bool = False, concurrency: int = 4,
                   cache_path: str | Path | None = None, retry: llm.RetryPolicy | None = None,
                   timeout: float = 60.0, progress: bool = True, credentialed: str | bool = "auto") -> DescribeResult:
    """Write one description per pair with `backend`; see the module docstring.

    The data-use guard runs before any client exists, on what the rows say (`data_origin`; `credentialed`
    is the profile's data_credentialed), and again on every request the client sends. Booleans must be
    real booleans. Pairs with no report text at all fail without a call, unless no pair of the table has any
    (a cohort without reports): then each gets NO_REPORT_DESCRIPTION, the no-change hypothesis, without a call.
    Successful answers are cached
    (JSONL, keyed by backend, model, prompt version and the two reports), so a rerun sends only the
    pairs that failed.
    """
    t0 = time.perf_counter()
    data_use_override = llm.require_bool("llm_data_use_override", data_use_override)
    progress = llm.require_bool("progress", progress)
    llm.refuse_secrets(llm_allow_hosts=allow_hosts)
    endpoint = llm.Endpoint.from_profile(backend, model, base_url, azure_endpoint, api_version, key_env)
    missing = [c for c in ["pair_id"] + TEXT_COLUMNS if c not in pairs.columns]
    if missing:
        raise ValueError(f"pair table lacks the columns {missing} (expected schema.PAIR_COLUMNS)")
    dup = pairs["pair_id"][pairs["pair_id"].duplicated()].unique()
    if len(dup):
        raise ValueError(f"pair table has {len(dup)} duplicated pair_id values, e.g. {list(dup[:3])}")
    source, cred = data_origin(pairs, source, credentialed)
    hosts = llm.parse_hosts(allow_hosts)
    decision = llm.check_data_use(source, backend, endpoint.url, hosts, data_use_override, cred)

    def check_url(url: str) -> str:  # the same rules for every request the client sends
        return llm.check_data_use(source, backend, url, hosts, data_use_override, cred, quiet=True)

    rows = pairs.to_dict("records")
    reports = {r["pair_id"]: (compose_report(r["prior_findings"], r["prior_impression"]),
                              compose_report(r["followup_findings"], r["followup_impression"])) for r in rows}
    outcomes: dict[str, llm.Outcome] = {}
    if reports and not any(pr or fu for pr, fu in reports.values()):
        # A cohort without any report (e.g. images and dates only): nothing says what changed, so every pair gets
        # the no-change hypothesis, the one sentence whose right answer is known without a report (the output
        # should keep the prior); the counterfactual then asks "this patient at follow-up, nothing changed".
        print(f"no pair has report text: every pair's description is the no-change hypothesis {NO_REPORT_DESCRIPTION!r}")
        outcomes = {pid: llm.Outcome(True, text=NO_REPORT_DESCRIPTION) for pid in reports}
    for pid, (pr, fu) in reports.items():
        if pid in outcomes:
            continue
        if not fu:
            outcomes[pid] = llm.Outcome(False, reason="follow-up report has neither FINDINGS nor IMPRESSION")
        elif not pr:
            outcomes[pid] = llm.Outcome(False, reason="prior report has neither FINDINGS nor IMPRESSION")
    todo = [pid for pid in reports if pid not in outcomes]
    calls = cached = 0
    if backend == "offline":
        for pid in todo:
            outcomes[pid] = llm.Outcome(True, text=synthesise(*reports[pid]))
    else:
        version = PROMPT_VERSION
        cache = llm.AnswerCache(cache_path)
        requests = []
        for pid in todo:
            msgs = build_messages(*reports[pid])
            key = llm.cache_key(backend, model, version, msgs)
            if backend == "replay":  # an answer from whichever server backend produced it with this model
                keys = [llm.cache_key(b, model, version, msgs) for b in llm.NETWORK_BACKENDS]
                key = next((k for k in keys if cache.get(k) is not None), key)
            requests.append(llm.Request(pid, key, msgs))
        if backend == "replay":
            call = llm.replay_call
        else:
            call = llm.make_api_call(endpoint, retry, timeout, check_url=check_url)
        meta = {"backend": backend, "model": model, "prompt_version": version}
        got = llm.run_requests(requests, call, cache, concurrency, meta, progress)
        outcomes.update(got)
        cached = sum(o.cached for o in got.values())
        calls = sum(o.attempts for o in got.values() if not o.cached)

    ok_rows, fail_rows = [], []
    for r in rows:
        o = outcomes[r["pair_id"]]
        if o.ok:
            ok_rows.append({**r, "description": o.text, "instruction_impression": instruction_impression(r)})
        else:
            fail_rows.append({"pair_id": r["pair_id"], "reason": o.reason, "attempts": o.attempts,
                              "backend": backend, "model": model})
    out = pd.DataFrame(ok_rows, columns=list(pairs.columns) + ["description", "instruction_impression"])
    failures = pd.DataFrame(fail_rows, columns=["pair_id", "reason", "attempts", "backend", "model"])
    return DescribeResult(out, failures, decision, calls, cached, time.perf_counter() - t0)


def run_step(run_dir, backend: str = "offline", model: str = "", base_url: str = "", azure_endpoint: str = "",
             api_version: str = "", key_env: str = "", source: str = "phantom", allow_hosts: str = "",
             data_use_override: bool = False, concurrency: int = 4, cache_file: str = "",
             progress: bool = True, retry: llm.RetryPolicy | None = None, timeout: float = 60.0,
             credentialed: str | bool = "auto") -> DescribeResult:
    """Notebook 03: 02_registration/pairs.csv -> 03_descriptions/{pairs,failures}.csv + run.json.

    A rerun with the same inputs and no failures is a no-op (io.Manifest); with failures, only the
    failed pairs are sent again (the cache answers the rest). Every column of 02's table, `credentialed`
    included, is kept in 03's.
    """
    data_use_override = llm.require_bool("llm_data_use_override", data_use_override)
    credentialed = llm.declared_credentialed(credentialed)
    llm.refuse_secrets(llm_allow_hosts=allow_hosts, llm_cache_file=cache_file)
    src = resolve(run_dir) / "02_registration" / "pairs.csv"
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist: run step 02 (registration) first")
    out = step_dir(run_dir, "03_descriptions")
    cache_path = resolve(cache_file) if cache_file else out / "llm_cache.jsonl"
    host = llm.Endpoint.from_profile(backend, model, base_url, azure_endpoint, api_version, key_env).url
    # The table is keyed on this module's code (the synthesiser, the report reader): a change to it rewrites the
    # table; network answers come back from their cache, keyed on PROMPT_VERSION, so no paid call is repeated.
    key = fingerprint(sha256_file(src), backend, model, host, PROMPT_VERSION, code_fingerprint_of(__name__), source,
                      credentialed, llm.parse_hosts(allow_hosts), data_use_override)
    manifest = Manifest(out / "manifest.json", root=out)
    if all(manifest.is_current(f, key) for f in ("pairs.csv", "failures.csv")):
        done = pd.read_csv(out / "failures.csv", dtype=str, keep_default_na=False)
        if done.empty:
            meta = json.loads((out / "run.json").read_text())
            return DescribeResult(pd.read_csv(out / "pairs.csv", dtype={"subject_id": str}), done,
                                  meta["decision"], 0, 0, 0.0)
    try:
        pairs = pd.read_csv(src, dtype={"subject_id": str, "prior_study_id": str, "followup_study_id": str,
                                        "prior_dicom_id": str, "followup_dicom_id": str})
    except pd.errors.EmptyDataError:
        raise NoPairsError(f"{src}: empty file (no header, no rows): rerun step 02 (registration)") from None
    if pairs.empty:
        raise NoPairsError(f"{src}: 0 pairs: every pair failed or was rejected in step 02 (its registration.csv "
                           f"says why)")
    res = describe_pairs(pairs, backend, model, base_url, azure_endpoint, api_version, key_env, source, allow_hosts,
                         data_use_override, concurrency, cache_path, retry, timeout, progress, credentialed)
    atomic_write_csv(out / "pairs.csv", res.pairs)
    atomic_write_csv(out / "failures.csv", res.failures)
    for f in ("pairs.csv", "failures.csv"):
        manifest.record(f, key)
    manifest.save()
    atomic_write_json(out / "run.json", {
        "backend": backend, "model": model, "host": llm.host_of(host) if host else "", "source": source,
        "data_credentialed": credentialed, "decision": res.decision, "data_use_override": data_use_override,
        "prompt_version": PROMPT_VERSION, "pairs_in": len(pairs), "described": len(res.pairs),
        "failed": len(res.failures), "calls": res.calls, "cached": res.cached})
    if res.pairs.empty:
        first = res.failures.iloc[0]
        raise NoPairsError(f"{out / 'failures.csv'}: none of the {len(pairs)} pairs got a description (first: "
                           f"{first['pair_id']}: {first['reason']}); a rerun retries them")
    return res


# --------------------------------------------------------------------------- length statistics and Fig. 2

def length_table(pairs: pd.DataFrame, label: str = "description (ours)") -> pd.DataFrame:
    """Characters per instruction: our descriptions and impressions beside the paper's averages."""
    rows = []
    for name, col in ((label, "description"), ("impression (ours)", "instruction_impression")):
        n = pairs[col].fillna("").str.len()
        n = n[n > 0]
        rows.append({"instruction": name, "n": int(len(n)), "mean_chars": round(float(n.mean()), 1) if len(n) else math.nan,
                     "median_chars": float(n.median()) if len(n) else math.nan,
                     "p10": float(n.quantile(0.1)) if len(n) else math.nan,
                     "p90": float(n.quantile(0.9)) if len(n) else math.nan})
    for name, v in PAPER_LENGTHS.items():
        rows.append({"instruction": name, "n": math.nan, "mean_chars": float(v), "median_chars": math.nan,
                     "p10": math.nan, "p90": math.nan})
    return pd.DataFrame(rows)


def pick_example(pairs: pd.DataFrame) -> dict:
    """A pair for the Fig. 2 analogue: the richest description (most changes stated, then longest)."""
    d = pairs["description"].fillna("")
    changed = pairs[~d.str.startswith("No ")]
    if changed.empty:
        return pairs.iloc[0].to_dict()
    score = changed["description"].str.count(",| and ") * 1000 + changed["description"].str.len()
    return changed.loc[score.idxmax()].to_dict()


def figure2(row: dict, fig_dir, stem: str = "fig2_progression"):
    """The Fig. 2 analogue for one pair: both images and reports, the prompt, the description."""
    def wrap(report: str, width: int) -> str:
        return "\n\n".join(textwrap.fill(part, width) for part in report.split("\n"))

    prior = compose_report(row.get("prior_findings"), row.get("prior_impression"))
    follow = compose_report(row.get("followup_findings"), row.get("followup_impression"))
    fig = plt.figure(figsize=(13, 7.5))
    grid = fig.add_gridspec(2, 4, height_ratios=[1, 1], width_ratios=[1, 1.4, 1, 1.4])
    for j, (key, title, report) in enumerate((("prior_path", "Prior study", prior),
                                              ("followup_path", "Follow-up study", follow))):
        ax = fig.add_subplot(grid[0, 2 * j])
        try:
            ax.imshow(read_image(row[key]), cmap="gray", vmin=0, vmax=1)
        except (ImageError, KeyError, TypeError, OSError):
            ax.text(0.5, 0.5, "(image not available)", ha="center", va="center")
        ax.set_title(title)
        ax.axis("off")
        ax = fig.add_subplot(grid[0, 2 * j + 1])
        ax.text(0, 1, wrap(report, 52), va="top", family="monospace", fontsize=7.5)
        ax.set_title(f"{title}: report", fontsize=9, loc="left")
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :2])
    prompt = USER_PROMPT.split("\n\nPRIOR REPORT")[0].format(target=TARGET_CHARS)
    ax.text(0, 1, "\n".join(textwrap.fill(line, 82) for line in prompt.splitlines())
            + "\n\nPRIOR REPORT: <<< ... >>>   FOLLOW-UP REPORT: <<< ... >>>", va="top", family="monospace",
            fontsize=7.5)
    ax.set_title("Prompt (user message; the system message asks for no PHI)", fontsize=9, loc="left")
    ax.axis("off")
    ax = fig.add_subplot(grid[1, 2:])
    ax.text(0, 1, "Progression description:\n" + textwrap.fill(str(row.get("description", "")), 60)
            + "\n\nFollow-up IMPRESSION (Table 2's 'Impression' arm):\n"
            + textwrap.fill(str(row.get("instruction_impression", "")), 60), va="top", fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    save_figure(fig, fig_dir, stem, dpi=120, bbox_inches=None)
    return fig


# --------------------------------------------------------------------------- speed

_BENCH_SENTENCES = [
    "Small left pleural effusion is unchanged.", "No pneumothorax.", "Cannot exclude early edema.",
    "Mild cardiomegaly.", "Bibasilar atelectasis.", "Right apical pneumothorax has resolved.",
    "Moderate right pleural effusion has increased.", "The heart size is normal.",
    "No pleural effusion, pneumothorax or focal consolidation.", "Moderate pulmonary edema, improved.",
    "Large left pleural effusion with adjacent atelectasis.", "New small right pneumothorax.",
    "Severe cardiomegaly is stable.", "Possible small left effusion.", "Lines and tubes are in standard position.",
    "Endotracheal tube has been removed.", "Lungs are clear.", "Mild interstitial edema has resolved.",
]


def bench_reports(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct (prior, follow-up) report pairs in MIMIC style, for timing only."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        pair = []
        for _ in range(2):
            s = rng.sample(_BENCH_SENTENCES, rng.randint(2, 5))
            pair.append(f"FINDINGS: {' '.join(s[:-1])} Study {i}.\nIMPRESSION: {s[-1]}")
        out.append(tuple(pair))
    return out


def benchmark(n_offline: int = 20000, n_api: int = 200, concurrency: int = 8, latency: float = 0.02,
              log=print) -> dict:
    """Print pairs/s of the offline synthesiser and of the API path against a loopback server.

    The offline figure uses distinct reports built from a bank of real-style sentences, with the
    extractor's memo cleared first; sentences repeat across reports, as they do in MIMIC-CXR, so the
    per-clause memo does part of the work. It is printed as wall-clock and as CPU-time rate (the latter
    is what a shared machine cannot distort).
    The API figure goes through the real `openai` client, the retry wrapper and the thread pool to a
    local chat-completions server that answers after `latency` seconds (an LLM's time to answer, here
    simulated), at `concurrency` requests in flight, after one untimed warm-up request.
    """
    pairs = bench_reports(n_offline)
    clear_memo()
    t0, c0 = time.perf_counter(), time.process_time()
    for pr, fu in pairs:
        synthesise(pr, fu)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    offline, offline_cpu = n_offline / dt, n_offline / max(cpu, 1e-9)
    log(f"offline synthesiser: {n_offline} distinct report pairs (sentences from an {len(_BENCH_SENTENCES)}-sentence "
        f"bank, memo cleared first) in {dt:.2f} s wall = {offline:,.0f} pairs/s; {offline_cpu:,.0f} pairs/s of "
        f"CPU time on one core (goal >= 5,000)")

    api_pairs = bench_reports(n_api, seed=1)
    reqs = [llm.Request(str(i), str(i), build_messages(*p)) for i, p in enumerate(api_pairs)]
    with ChatServer(loopback_model, latency=latency) as srv:
        ep = llm.Endpoint.from_profile("compatible", "loopback-model", srv.base_url)
        call = llm.make_api_call(ep, llm.RetryPolicy(retries=2, backoff=0.05), timeout=10)
        call(reqs[0])  # warm-up: the openai client imports its resources lazily on the first request
        t0 = time.perf_counter()
        got = llm.run_requests(reqs, call, llm.AnswerCache(None), concurrency, progress=False)
        dt = time.perf_counter() - t0
    n_ok = sum(o.ok for o in got.values())
    api = n_api / dt
    log(f"API path (openai client -> loopback server, {latency * 1000:.0f} ms per answer): {n_api} pairs "
        f"in {dt:.2f} s = {api:,.1f} pairs/s at concurrency {concurrency} ({n_ok} ok; "
        f"serial bound {1 / latency if latency else float('inf'):,.0f} pairs/s)")
    return {"offline_pairs_per_s": offline, "offline_pairs_per_cpu_s": offline_cpu, "api_pairs_per_s": api, "api_concurrency": concurrency,
            "api_latency_s": latency, "api_ok": n_ok, "api_pairs": n_api}


# Sentences in the style the model was trained on (the offline progression synthesiser's wording).
SUGGESTIONS = [
    "New small left pleural effusion.",
    "New large right pleural effusion.",
    "Left pleural effusion increased to moderate.",
    "Resolved right pleural effusion.",
    "New moderate right pneumothorax.",
    "Resolved left pneumothorax.",
    "New moderate cardiomegaly.",
    "New moderate pulmonary edema.",
    "Pulmonary edema improved to mild.",
    "New moderate bibasilar atelectasis.",
    "No significant interval change.",
]
