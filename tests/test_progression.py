"""Progression descriptions: prompt, offline synthesiser, the pipeline over a pair table."""
import json

import pandas as pd
import pytest

from bmjlib.io import write_table
from bmjlib.text import llm
from bmjlib.text import progression
from bmjlib.testing import ChatServer, Reply, ok


def _pair(pid, pf, pi, ff, fi, **extra):
    return {"pair_id": pid, "subject_id": "10000001", "split": "train", "prior_findings": pf,
            "prior_impression": pi, "followup_findings": ff, "followup_impression": fi, **extra}


PAIRS = pd.DataFrame([
    _pair("a", "Small left pleural effusion. No pneumothorax.", "Small left effusion.",
          "Compared to ___, the left pleural effusion has increased and is now moderate.",
          "Moderate left pleural effusion, increased. No pneumothorax."),
    _pair("b", "Right apical pneumothorax. Mild cardiomegaly.", "Small right pneumothorax.",
          "No pneumothorax. Mild cardiomegaly, unchanged.", "Right pneumothorax has resolved."),
    _pair("c", "The lungs are clear. No effusion.", "No acute cardiopulmonary process.",
          "New moderate pulmonary edema.", "Moderate pulmonary edema."),
    _pair("d", "", float("nan"), "Mild cardiomegaly.", "Mild cardiomegaly."),   # prior report empty
])


@pytest.mark.parametrize("prior,followup,expected", [
    ("Small left pleural effusion.", "Moderate left pleural effusion.",
     "Left pleural effusion increased to moderate."),
    ("Moderate left pleural effusion.", "Small left pleural effusion.", "Left pleural effusion decreased to small."),
    ("No effusion.", "New small right pleural effusion.", "New small right pleural effusion."),
    ("Right apical pneumothorax.", "Right pneumothorax has resolved.", "Resolved right pneumothorax."),
    ("Mild cardiomegaly.", "Mild cardiomegaly, unchanged.", "Unchanged mild cardiomegaly."),
    ("Mild pulmonary edema.", "Severe pulmonary edema.", "Pulmonary edema worsened to severe."),
    ("No acute process.", "Bibasilar atelectasis.", "New bibasilar atelectasis."),
    ("Lungs are clear.", "Cannot exclude early edema.", "Possible new pulmonary edema."),
    ("Lungs are clear.", "No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality on either study."),
    ("Mild cardiomegaly.", "Heart size is unchanged.", "No significant interval change."),
    ("Small left effusion.", "Large left effusion. New right pneumothorax. Mild cardiomegaly is stable.",
     "New right pneumothorax, left pleural effusion increased to large and unchanged mild cardiomegaly."),
])
def test_synthesiser_known_answers(prior, followup, expected):
    assert progression.synthesise(prior, followup) == expected


def test_synthesiser_is_deterministic_and_phi_free():
    for pr, fu in progression.bench_reports(300):
        d = progression.synthesise(pr, fu)
        assert d == progression.synthesise(pr, fu)
        assert llm.check_answer(d, "stop").ok, d  # no ___, no date, not empty, not too long


def test_prompt_carries_both_reports_and_the_rules():
    msgs = progression.build_messages("FINDINGS: A.", "IMPRESSION: B.")
    user = msgs[1]["content"]
    for phrase in ("new, worse, better or resolved", "side (left, right, bilateral)", "about 150 characters",
                   "patient-identifying"):
        assert phrase in user
    assert progression.reports_from_messages(msgs) == ("FINDINGS: A.", "IMPRESSION: B.")


def test_describe_pairs_offline():
    res = progression.describe_pairs(PAIRS, progress=False)
    assert res.calls == 0 and res.decision.startswith("allowed")
    got = dict(zip(res.pairs.pair_id, res.pairs.description))
    assert got == {"a": "Left pleural effusion increased to moderate.",
                   "b": "Resolved right pneumothorax and unchanged mild cardiomegaly.",
                   "c": "New moderate pulmonary edema."}
    assert res.pairs.set_index("pair_id").loc["b", "instruction_impression"] == "Right pneumothorax has resolved."
    assert list(res.failures.pair_id) == ["d"]
    assert res.failures.reason.iloc[0] == "prior report has neither FINDINGS nor IMPRESSION"


def test_instruction_impression_falls_back_to_findings():
    df = PAIRS.iloc[[0]].assign(followup_impression="")
    res = progression.describe_pairs(df, progress=False)
    assert res.pairs.instruction_impression.iloc[0].startswith("Compared to ___, the left pleural effusion")


def test_missing_columns_and_duplicates_are_named():
    with pytest.raises(ValueError, match="followup_impression"):
        progression.describe_pairs(PAIRS.drop(columns=["followup_impression"]))
    with pytest.raises(ValueError, match=r"1 duplicated pair_id values, e.g. \['a'\]"):
        progression.describe_pairs(pd.concat([PAIRS, PAIRS.iloc[:1]]))


def test_api_path_failures_listed_and_rerun_sends_only_them(tmp_path):
    """Pair a: 429 then ok; b: content_filter; c: empty. The rerun (server healthy) asks only for b and c."""
    state = {"healthy": False}

    def responder(body, n):
        prior, follow = progression.reports_from_messages(body["messages"])
        if state["healthy"]:
            return progression.loopback_model(body, n)
        if "apical" in prior:
            return Reply(text="", finish_reason="content_filter")
        if "lungs are clear" in prior.lower():
            return Reply(text="")
        return Reply(status=429) if n == 0 else progression.loopback_model(body, n)

    cache = tmp_path / "cache.jsonl"
    kw = dict(backend="compatible", model="local-model", source="mimic", concurrency=1, cache_path=cache,
              retry=llm.RetryPolicy(retries=2, backoff=0.01), timeout=5, progress=False)
    with ChatServer(responder) as srv:
        res = progression.describe_pairs(PAIRS, base_url=srv.base_url, **kw)
        assert srv.calls == 4  # a twice (429, ok), b once, c once; d has no prior report: no call
    assert list(res.pairs.pair_id) == ["a"]
    assert res.pairs.description.iloc[0] == "Left pleural effusion increased to moderate."
    reasons = dict(zip(res.failures.pair_id, res.failures.reason))
    assert reasons == {"b": "blocked: finish_reason=content_filter", "c": "empty answer",
                       "d": "prior report has neither FINDINGS nor IMPRESSION"}
    state["healthy"] = True
    with ChatServer(responder) as srv:
        res2 = progression.describe_pairs(PAIRS, base_url=srv.base_url, **kw)
        asked = sorted(progression.reports_from_messages(b["messages"])[0][:20] for b in srv.bodies)
        assert asked == ["FINDINGS: Right apic", "FINDINGS: The lungs "]  # pairs b and c only
    assert res2.cached == 1 and sorted(res2.pairs.pair_id) == ["a", "b", "c"]
    assert list(res2.failures.pair_id) == ["d"]


def test_replay_backend_answers_from_cache_only(tmp_path):
    cache = tmp_path / "cache.jsonl"
    with ChatServer(progression.loopback_model) as srv:
        first = progression.describe_pairs(PAIRS.iloc[:2], "compatible", "m", srv.base_url, cache_path=cache,
                                           progress=False)
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(lines) == 2 and {x["backend"] for x in lines} == {"compatible"}
    res = progression.describe_pairs(PAIRS.iloc[:3], "replay", "m", cache_path=cache, progress=False)
    assert res.calls == 0 and res.cached == 2
    assert list(res.pairs.description) == list(first.pairs.description)
    assert dict(zip(res.failures.pair_id, res.failures.reason)) == {
        "c": "not in the cache (replay backend makes no calls)"}
    other_model = progression.describe_pairs(PAIRS.iloc[:2], "replay", "another-model", cache_path=cache,
                                             progress=False)
    assert other_model.pairs.empty and len(other_model.failures) == 2


def _run_folder(tmp_path, pairs=PAIRS):
    run = tmp_path / "run"
    (run / "02_registration").mkdir(parents=True)
    pairs.to_csv(run / "02_registration" / "pairs.csv", index=False)
    return run


def test_run_step_writes_outputs_and_rerun_is_a_no_op(tmp_path):
    run = _run_folder(tmp_path, PAIRS.iloc[:3])
    res = progression.run_step(run, progress=False)
    out = run / "03_descriptions"
    written = pd.read_csv(out / "pairs.csv")
    assert list(written.pair_id) == ["a", "b", "c"]
    assert {"description", "instruction_impression", "prior_findings"} <= set(written.columns)
    assert pd.read_csv(out / "failures.csv").empty
    meta = json.loads((out / "run.json").read_text())
    assert (meta["described"], meta["failed"], meta["backend"], meta["calls"]) == (3, 0, "offline", 0)
    assert res.decision == meta["decision"]
    mtime = (out / "pairs.csv").stat().st_mtime_ns
    again = progression.run_step(run, progress=False)
    assert (out / "pairs.csv").stat().st_mtime_ns == mtime and again.seconds == 0.0
    assert list(again.pairs.description) == list(written.description)



def test_a_change_to_the_code_rewrites_the_table_and_repeats_no_call(tmp_path, monkeypatch):
    """The offline synthesiser's table is keyed on its code; a network backend's answers stay in their cache."""
    run = _run_folder(tmp_path, PAIRS.iloc[:3])
    out = run / "03_descriptions"
    with ChatServer(progression.loopback_model) as srv:
        kw = dict(backend="compatible", model="m", base_url=srv.base_url, progress=False)
        first = progression.run_step(run, **kw)
        assert first.calls == 3
        mtime = (out / "pairs.csv").stat().st_mtime_ns
        assert progression.run_step(run, **kw).seconds == 0.0 and (out / "pairs.csv").stat().st_mtime_ns == mtime
        code = progression.code_fingerprint_of
        monkeypatch.setattr(progression, "code_fingerprint_of", lambda *m: code(*m) + "-edited")
        edited = progression.run_step(run, **kw)
        assert srv.calls == 3 and edited.calls == 0 and edited.cached == 3
    assert (out / "pairs.csv").stat().st_mtime_ns != mtime
    assert list(edited.pairs.description) == list(first.pairs.description)
    offline = progression.run_step(run, progress=False)  # another backend: the synthesiser writes the table
    assert offline.seconds > 0 and list(offline.pairs.description) == list(first.pairs.description)


def test_run_step_needs_step_02(tmp_path):
    with pytest.raises(FileNotFoundError, match="02_registration/pairs.csv does not exist"):
        progression.run_step(tmp_path / "empty", progress=False)


def test_length_table_and_figure2(tmp_path):
    res = progression.describe_pairs(PAIRS.iloc[:3], progress=False)
    t = progression.length_table(res.pairs)
    ours = t.set_index("instruction").loc["description (ours)"]
    assert ours["n"] == 3 and ours["mean_chars"] == round(res.pairs.description.str.len().mean(), 1)
    assert t.set_index("instruction").loc["GPT-4 description (paper)", "mean_chars"] == 146
    assert t.set_index("instruction").loc["impression (paper)", "mean_chars"] == 179
    write_table(t, tmp_path, "lengths", floatfmt="{:g}")
    assert (tmp_path / "lengths.md").read_text().startswith("| instruction")
    progression.figure2(res.pairs.iloc[0].to_dict(), tmp_path)
    assert (tmp_path / "fig2_progression.png").stat().st_size > 10_000
    assert (tmp_path / "fig2_progression.pdf").exists()


def test_loopback_model_speaks_like_the_synthesiser():
    body = {"messages": progression.build_messages("Small left effusion.", "Moderate left effusion.")}
    assert progression.loopback_model(body, 0).text == "Left pleural effusion increased to moderate."
