"""A hostile user's inputs, each refused or handled with one line naming the thing and the problem, with
real components: the loopback chat server and the real openai client, real files, the real readers and
registration. Cases: booleans that are strings, a server that redirects the report text elsewhere,
credentialed text read under a harmless name, readers left with nothing usable or with repeated rows,
and pairs that registration must not pass in a cohort too small for the relative threshold."""
from __future__ import annotations

import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import openai
import pandas as pd
import pytest

from bmjlib.data import registration as R
from bmjlib.data.cohort import CohortError, build_cohort, counts_table, write_cohort
from bmjlib.data.registration_eval import phantom_pairs
from bmjlib.data.sources import SourceError, load_source, mimic_report_path
from bmjlib.io import atomic_write_png, read_image, to_uint8
from bmjlib.phantom import cohort as phantom
from bmjlib.testing import ChatServer, ok
from bmjlib.text import llm, progression
from test_cohort_fixture import SUBJECTS, make_mimic

HANNOVER = Path(__file__).resolve().parent.parent.parent / "shared" / "real_cxr" / "hannover"
FAST = llm.RetryPolicy(retries=2, backoff=0.01, max_wait=0.05)
MSGS = [{"role": "user", "content": "prior: small left effusion; follow-up: moderate left effusion"}]
PAIRS = pd.DataFrame([{"pair_id": "a", "prior_findings": "Small left effusion.", "prior_impression": "",
                       "followup_findings": "Moderate left effusion.", "followup_impression": ""}])


# --------------------------------------------------------------------------- 1. the guard: types

@pytest.mark.parametrize("value", ["false", "False", "no", 0, 1, None, "true"])
def test_override_must_be_a_real_boolean(value):
    with pytest.raises(llm.ParameterError, match=r"^llm_data_use_override must be true or false"):
        llm.check_data_use("mimic", "openai", None, override=value)
    with pytest.raises(llm.ParameterError, match=r"^llm_data_use_override must be true or false"):
        progression.describe_pairs(PAIRS, "openai", "gpt-4", source="mimic", data_use_override=value, progress=False)


def test_other_booleans_and_the_declaration_are_typed(tmp_path):
    with pytest.raises(llm.ParameterError, match="^progress must be true or false"):
        progression.describe_pairs(PAIRS, progress="False")
    with pytest.raises(llm.ParameterError, match="^data_credentialed must be auto, true or false"):
        progression.describe_pairs(PAIRS, credentialed="no", progress=False)
    with pytest.raises(llm.ParameterError, match="^llm_data_use_override must be"):
        progression.run_step(tmp_path, data_use_override="false", progress=False)
    root = make_mimic(tmp_path / "m")
    with pytest.raises(llm.ParameterError, match="^data_credentialed must be"):
        load_source("mimic", root, credentialed="false")
    with pytest.raises(llm.ParameterError, match="^verify_images must be"):
        load_source("mimic", root, verify_images="false")
    with pytest.raises(llm.ParameterError, match="^require_positive must be"):
        build_cohort(load_source("mimic", root), require_positive="false")


# --------------------------------------------------------------------------- 1. the guard: redirects

class _Redirect(BaseHTTPRequestHandler):
    """Answers every POST with 307 to `target` (a class attribute set per test)."""
    target = ""
    seen: list[str] = []

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).seen.append(self.path)
        self.send_response(307)
        self.send_header("location", type(self).target + self.path.replace("/v1", "", 1))
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def outside_host(monkeypatch):
    """'outside.example' made reachable: it resolves to this machine, where a second server listens. The
    guard judges it by its name (not loopback, not allow-listed), as it would a real outside host."""
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda host, *a, **k: real("127.0.0.1" if host == "outside.example" else host, *a, **k))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with ChatServer(lambda b, n: ok("Left effusion increased.")) as outside:
        yield outside


@pytest.fixture
def redirecting(outside_host):
    _Redirect.target, _Redirect.seen = f"http://outside.example:{outside_host.port}/v1", []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", outside_host
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_redirect_to_another_host_is_not_followed(redirecting):
    url, outside = redirecting
    # the hazard is real: a plain openai client follows the 307 and the text reaches the outside host
    plain = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=5)
    plain.chat.completions.create(model="m", messages=MSGS)
    assert outside.calls == 1 and outside.bodies[0]["messages"] == MSGS
    # ours: the guard allows loopback, the server redirects, nothing goes further
    res = progression.describe_pairs(PAIRS, "compatible", "m", url, source="mimic", progress=False,
                                     retry=FAST, timeout=5)
    assert res.decision.startswith("allowed: mimic text to a server on this machine")
    assert res.pairs.empty and outside.calls == 1 and len(_Redirect.seen) == 2
    reason = res.failures.set_index("pair_id").loc["a", "reason"]
    assert reason.startswith("HTTP 307: redirect to http://outside.example:") and "not followed" in reason


def test_every_request_is_checked_against_the_pinned_host_and_the_guard(outside_host):
    seen = []

    def check_url(u):
        seen.append(u)
        return llm.check_data_use("mimic", "compatible", u, (), False, True, quiet=True)

    with ChatServer(lambda b, n: ok("Unchanged.")) as local:
        client = llm.Endpoint.from_profile("compatible", "m", local.base_url).client(5, check_url)
        out = llm.chat_once(client, "m", MSGS, FAST)
        assert out.ok and seen == [f"{local.base_url}/chat/completions"]
        # the same client pointed elsewhere (as a redirect or a per-request option would): refused, not sent
        moved = client.with_options(base_url=f"http://outside.example:{outside_host.port}/v1")
        out = llm.chat_once(moved, "m", MSGS, FAST)
    assert not out.ok and out.attempts == 1 and out.reason.startswith("refused: refusing a request to outside.example")
    assert outside_host.calls == 0


# --------------------------------------------------------------------------- 1. the guard: the data decide

def _mimic_as_csv(root: Path, csv: Path, flat: bool = False) -> Path:
    """The MIMIC fixture listed as a bring-your-own CSV (paths as MIMIC-CXR-JPG has them, or copied flat)."""
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv", dtype=str)
    rows = []
    for r in meta.itertuples():
        src = root / "files" / f"p{r.subject_id[:2]}" / f"p{r.subject_id}" / f"s{r.study_id}" / f"{r.dicom_id}.jpg"
        path = src
        if flat:
            path = csv.parent / "flat" / f"{r.dicom_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(src.read_bytes())
        rows.append({"patient": r.subject_id, "image": str(path), "study_id": r.study_id, "date": r.StudyDate,
                     "view": r.ViewPosition,
                     "report": mimic_report_path(root, r.subject_id, r.study_id).read_text()})
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def test_mimic_read_as_csv_stays_credentialed_through_every_table(tmp_path, caplog):
    root = make_mimic(tmp_path / "mimic")
    csv = _mimic_as_csv(root, tmp_path / "cohort.csv")
    with caplog.at_level(logging.WARNING):
        data = load_source("csv", csv, credentialed=False)  # the profile even says "not credentialed"
    assert data.records["credentialed"].all()
    assert any("MIMIC-CXR-JPG image paths and stay credentialed" in r.getMessage() for r in caplog.records)
    c = build_cohort(data, require_positive=False)
    assert c.pairs["credentialed"].all() and set(c.pairs["source"]) == {"csv"}
    files = write_cohort(c, tmp_path / "01")
    pairs = pd.read_csv(files["pairs.csv"], dtype={"subject_id": str})  # 01 -> 02 -> 03 as the notebooks read it
    assert pairs["credentialed"].dtype == bool and pairs["credentialed"].all()
    with ChatServer(lambda b, n: ok("x")) as srv:
        url = f"http://not-allowed.example:{srv.port}/v1"
        with pytest.raises(llm.DataUseError, match="refusing to send credentialed report text to not-allowed.example"):
            progression.describe_pairs(pairs, "compatible", "m", url, source="csv", credentialed=False, progress=False)
        assert srv.calls == 0
    described = progression.describe_pairs(pairs, progress=False)  # offline: every column goes on
    assert described.pairs["credentialed"].all()


def test_a_csv_of_ones_own_is_open_only_when_declared(tmp_path):
    root = make_mimic(tmp_path / "mimic")
    csv = _mimic_as_csv(root, tmp_path / "own.csv", flat=True)
    assert load_source("csv", csv).records["credentialed"].all()                # auto: csv counts as credentialed
    assert not load_source("csv", csv, credentialed=False).records["credentialed"].any()
    assert load_source("mimic", root, credentialed=False).records["credentialed"].all()  # a reader that knows


def test_a_table_without_the_column_is_credentialed_unless_declared():
    assert progression.data_origin(PAIRS, "phantom") == ("credentialed", True)
    assert progression.data_origin(PAIRS, "csv") == ("csv", True)
    assert progression.data_origin(PAIRS, "csv", False) == ("csv", False)
    assert progression.data_origin(PAIRS.assign(credentialed=[""]), "phantom") == ("credentialed", True)
    assert progression.data_origin(PAIRS.assign(credentialed=["False"]), "phantom") == ("phantom", False)
    assert progression.data_origin(PAIRS.assign(credentialed=[False], source=["mimic"]), "phantom") == ("mimic", True)
    with pytest.raises(llm.DataUseError):
        progression.describe_pairs(PAIRS, "openai", "gpt-4", source="phantom", progress=False)


def test_the_phantom_is_open_only_where_step_00_wrote_it(tmp_path):
    root = make_mimic(tmp_path / "00_phantom" / "mimic")
    assert load_source("phantom", root).records["credentialed"].all()      # no generator files beside it
    (tmp_path / "00_phantom" / "summary.json").write_text("{}")
    (tmp_path / "00_phantom" / "truth").mkdir()
    assert not load_source("phantom", root).records["credentialed"].any()
    assert load_source("phantom", root, credentialed=True).records["credentialed"].all()


# --------------------------------------------------------------------------- 3. readers: nothing usable, repeats

@pytest.mark.parametrize("text,problem", [
    ("", r"cohort CSV is empty \(no header, no rows\)"),
    ("patient,image,day,view\n", "cohort CSV has a header but no rows"),
    ("patient,image,day,view\na,gone1.png,0,PA\nb,gone2.png,x,PA\n",
     r"no usable image left: all 2 rows were skipped \(2 problems; first: .*gone2.png: no valid date or day offset\)"),
])
def test_a_csv_with_nothing_usable_names_the_file(tmp_path, text, problem):
    (tmp_path / "c.csv").write_text(text)
    with pytest.raises(SourceError, match=rf"^{re.escape(str(tmp_path / 'c.csv'))}: {problem}$"):
        load_source("csv", tmp_path / "c.csv")


def test_mimic_metadata_with_nothing_usable_names_the_file(tmp_path):
    root = make_mimic(tmp_path)
    meta = root / "mimic-cxr-2.0.0-metadata.csv"
    header = meta.read_text().splitlines()[0]
    meta.write_text(header + "\n")
    with pytest.raises(SourceError, match=rf"^{re.escape(str(meta))}: metadata CSV has a header but no rows$"):
        load_source("mimic", root)
    meta.write_text("")
    with pytest.raises(SourceError, match="metadata CSV is empty"):
        load_source("mimic", root)
    root2 = make_mimic(tmp_path / "b")
    for p in (root2 / "files").rglob("*.jpg"):
        p.unlink()
    with pytest.raises(SourceError, match=r"mimic-cxr-2.0.0-metadata.csv: no usable image left: all 13 images it lists"):
        load_source("mimic", root2)


def test_every_image_unreadable_names_the_source(tmp_path):
    root = make_mimic(tmp_path)
    for p in (root / "files").rglob("*.jpg"):
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(SourceError, match=rf"^{re.escape(str(root))}: no usable image left: none of the 13 images "
                                          r"decodes \(13 problems; first: .*\.jpg: "):
        load_source("mimic", root, verify_images=True)


def test_a_cohort_with_no_pair_says_where_they_ran_out(tmp_path):
    root = make_mimic(tmp_path)
    data = load_source("mimic", root)
    with pytest.raises(CohortError, match=rf"^{re.escape(str(root))}: 0 pairs: none of the 13 images has view LL"):
        build_cohort(data, views=("LL",))
    with pytest.raises(CohortError, match="0 pairs: no patient has two AP studies at different times"):
        build_cohort(data, views=("AP",))
    labels = root / "mimic-cxr-2.0.0-chexpert.csv"
    lab = pd.read_csv(labels)
    lab.loc[:, [c for c in lab.columns if c not in ("subject_id", "study_id")]] = 0.0
    lab.to_csv(labels, index=False)
    with pytest.raises(CohortError, match=r"none of the 6 candidate pairs has a positive CheXpert finding .*"
                                          r"require_positive: false keeps them"):
        build_cohort(load_source("mimic", root))


def test_repeated_rows_are_removed_and_counted(tmp_path):
    root = make_mimic(tmp_path)
    for name in ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-chexpert.csv"):
        df = pd.read_csv(root / name, dtype=str)
        pd.concat([df, df.iloc[:3]]).to_csv(root / name, index=False)
    data = load_source("mimic", root)
    assert data.duplicates == 6 and data.records["dicom_id"].is_unique and len(data.records) == 13
    assert "removed 6 repeated rows" in data.report()
    c = build_cohort(data, require_positive=False)
    assert c.candidates["pair_id"].is_unique and len(c.candidates) == 6
    assert counts_table(c).set_index("item").loc["repeated input rows removed", "ours"] == 6

    csv = _mimic_as_csv(make_mimic(tmp_path / "clean"), tmp_path / "c.csv")
    df = pd.read_csv(csv, dtype=str)
    other = df.iloc[[0]].assign(date="21500102")  # the same image again with another date
    pd.concat([df, df.iloc[:2], other]).to_csv(csv, index=False)
    data = load_source("csv", csv)
    assert data.duplicates == 2 and len(data.records) == 13
    assert data.problems["problem"].tolist() == ["image listed again with other values (first row kept)"]


def test_step_03_with_no_pair_from_step_02_names_the_file(tmp_path):
    src = tmp_path / "02_registration" / "pairs.csv"
    src.parent.mkdir(parents=True)
    src.write_text("")
    with pytest.raises(progression.NoPairsError, match=rf"^{re.escape(str(src))}: empty file"):
        progression.run_step(tmp_path, progress=False)
    src.write_text("pair_id,prior_findings,prior_impression,followup_findings,followup_impression\n")
    with pytest.raises(progression.NoPairsError, match=rf"^{re.escape(str(src))}: 0 pairs: every pair failed"):
        progression.run_step(tmp_path, progress=False)
    PAIRS.assign(followup_findings="").to_csv(src, index=False)
    with pytest.raises(progression.NoPairsError, match=r"failures.csv: none of the 1 pairs got a description "
                                                       r"\(first: a: follow-up report has neither"):
        progression.run_step(tmp_path, progress=False)
    assert (tmp_path / "03_descriptions" / "failures.csv").exists()  # the reasons are kept


def test_a_cohort_without_any_report_gets_the_no_change_hypothesis():
    out = progression.describe_pairs(PAIRS.assign(prior_findings="", followup_findings=""), progress=False)
    assert list(out.pairs["description"]) == [progression.NO_REPORT_DESCRIPTION] and out.failures.empty
    assert out.calls == 0


# --------------------------------------------------------------------------- 4. registration in a tiny cohort

@pytest.fixture(scope="module")
def tiny_phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    phantom.write_cohort(root, n_patients=6, size=128, seed=3, workers=1)
    return root


def test_noise_and_an_upside_down_follow_up_are_flagged_in_a_three_pair_cohort(tiny_phantom, tmp_path):
    tp = phantom_pairs(tiny_phantom).set_index("pair_id")
    good = tp.loc["13315421_50190087_50198006"]
    rng = np.random.default_rng(0)
    for name in ("noise_a", "noise_b"):
        atomic_write_png(tmp_path / f"{name}.png", to_uint8(rng.random((128, 128))))
    atomic_write_png(tmp_path / "turned.png", to_uint8(read_image(good["followup_path"])[::-1]))
    pairs = pd.DataFrame([("good", good["prior_path"], good["followup_path"]),
                          ("noise", str(tmp_path / "noise_a.png"), str(tmp_path / "noise_b.png")),
                          ("upside_down", good["prior_path"], str(tmp_path / "turned.png"))],
                         columns=["pair_id", "prior_path", "followup_path"])
    reg = R.register_pairs(pairs, tmp_path / "reg", R.RegConfig(size=128), progress=False).set_index("pair_id")
    assert reg.attrs["threshold"] == -1.0 and reg.attrs["floor"] == R.SCORE_FLOOR  # too few for "auto"
    assert reg.loc["good", "status"] == "ok" and reg.loc["good", "score_after"] > 0.85
    assert reg.loc["noise", "status"] == "rejected" and reg.loc["noise", "reason"].startswith("score ")
    assert f"< floor {R.SCORE_FLOOR:.3f}" in reg.loc["noise", "reason"]
    assert reg.loc["upside_down", "status"] == "rejected"
    assert reg.loc["upside_down", "reason"].startswith("upside down or not the same view")
    assert list(R.passed_pairs(pairs, reg.reset_index())["pair_id"]) == ["good"]


@pytest.mark.skipif(not HANNOVER.exists(), reason="../shared/real_cxr/hannover not present")
def test_a_real_radiograph_turned_upside_down_is_flagged(tmp_path):
    img = read_image(HANNOVER / "png" / "80b5f00f.png")
    atomic_write_png(tmp_path / "turned.png", to_uint8(img[::-1]))
    pairs = pd.DataFrame([("real", str(HANNOVER / "png" / "4d98e1de.png"), str(HANNOVER / "png" / "80b5f00f.png")),
                          ("turned", str(HANNOVER / "png" / "4d98e1de.png"), str(tmp_path / "turned.png"))],
                         columns=["pair_id", "prior_path", "followup_path"])
    reg = R.register_pairs(pairs, tmp_path / "reg", R.RegConfig(size=128), progress=False).set_index("pair_id")
    assert reg.loc["real", "status"] == "ok"
    assert reg.loc["turned", "status"] == "rejected", reg.loc["turned", "reason"]
    recorded = json.loads((tmp_path / "reg" / "results" / "turned.json").read_text())
    assert recorded["score_flipped"] > recorded["score_after"]  # the evidence is kept with the pair
