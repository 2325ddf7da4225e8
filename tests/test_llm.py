"""LLM backends against a real chat-completions server on loopback, driven by the real openai client;
the data-use guard; the answer cache."""
import logging

import pytest

from bmjlib.text import llm
from bmjlib.testing import ChatServer, Reply, ok

FAST = dict(retries=2, backoff=0.01, max_wait=0.05)
MSGS = [{"role": "user", "content": "prior: small left effusion; follow-up: moderate left effusion"}]


def _call(srv, timeout=5.0, **policy):
    ep = llm.Endpoint.from_profile("compatible", "m", srv.base_url)
    return llm.make_api_call(ep, llm.RetryPolicy(**{**FAST, **policy}), timeout)


def _run_one(responder, **kw):
    with ChatServer(responder) as srv:
        out = _call(srv, **kw)(llm.Request("p1", "k1", MSGS))
        return out, srv.calls, srv.bodies


# --------------------------------------------------------------------------- scripted server answers

def test_success():
    out, calls, bodies = _run_one(lambda b, n: ok("Left pleural effusion increased to moderate."))
    assert (out.ok, out.text, out.attempts, calls) == (True, "Left pleural effusion increased to moderate.", 1, 1)
    assert bodies[0]["messages"] == MSGS and bodies[0]["model"] == "m" and bodies[0]["temperature"] == 0


def test_429_then_success_is_retried():
    script = [Reply(status=429, retry_after="0"), ok("New small right pneumothorax.")]
    out, calls, _ = _run_one(lambda b, n: script[n])
    assert out.ok and out.text == "New small right pneumothorax." and out.attempts == 2 and calls == 2


def test_500_is_retried_then_fails_with_reason():
    out, calls, _ = _run_one(lambda b, n: Reply(status=500))
    assert not out.ok and out.reason == "HTTP 500 after 3 attempts" and calls == 3


def test_400_is_not_retried():
    out, calls, _ = _run_one(lambda b, n: Reply(status=400))
    assert not out.ok and out.reason.startswith("HTTP 400") and calls == 1


def test_timeout_then_success():
    script = [Reply(delay=1.0, text="late"), ok("Resolved right pneumothorax.")]
    out, calls, _ = _run_one(lambda b, n: script[n], timeout=0.3)
    assert out.ok and out.text == "Resolved right pneumothorax." and out.attempts == 2 and calls == 2


def test_timeouts_exhaust_retries():
    out, calls, _ = _run_one(lambda b, n: Reply(delay=0.6, text="late"), timeout=0.2, retries=1)
    assert not out.ok and out.reason == "timeout after 2 attempts" and calls == 2


@pytest.mark.parametrize("reply,reason", [
    (Reply(text=""), "empty answer"),
    (Reply(text="   "), "empty answer"),
    (Reply(text=None, refusal="I can't help with medical records."), "refusal: I can't help with medical records."),
    (Reply(text="I'm sorry, but I cannot assist with that request."), "refusal: I'm sorry"),
    (Reply(text="", finish_reason="content_filter"), "blocked: finish_reason=content_filter"),
    (Reply(text="Left effusion has increas", finish_reason="length"), "truncated: finish_reason=length"),
    (Reply(text="Compared to ___, the effusion is larger."), "PHI-like text '___'"),
    (Reply(text="New effusion since 3/14/2150."), "PHI-like text '3/14/2150'"),
])
def test_bad_answers_are_failures_not_descriptions(reply, reason):
    out, calls, _ = _run_one(lambda b, n: reply)
    assert not out.ok and reason in out.reason and out.text == ""
    assert calls == 1  # a deterministic bad answer is not retried within the run


# --------------------------------------------------------------------------- many requests: cache, concurrency

def test_run_requests_caches_successes_and_rerun_retries_only_failures(tmp_path):
    bad = {"p2", "p5"}

    def responder(body, n):
        pid = body["messages"][0]["content"]
        return Reply(status=500) if pid in bad else ok(f"description of {pid}")

    reqs = [llm.Request(f"p{i}", llm.cache_key("compatible", "m", "v1", f"p{i}"),
                        [{"role": "user", "content": f"p{i}"}]) for i in range(8)]
    cache_path = tmp_path / "cache.jsonl"
    with ChatServer(responder) as srv:
        got = llm.run_requests(reqs, _call(srv, retries=1), llm.AnswerCache(cache_path), concurrency=3, progress=False)
        first = srv.calls
    assert {k for k, o in got.items() if not o.ok} == bad
    assert all(got[k].reason == "HTTP 500 after 2 attempts" for k in bad)
    assert first == 6 + 2 * 2
    lines = cache_path.read_text().splitlines()
    assert len(lines) == 6 and not any('"p2"' in line or "description of p5" in line for line in lines)

    bad.clear()  # the server recovers; the rerun sends exactly the two failed pairs
    with ChatServer(responder) as srv:
        got = llm.run_requests(reqs, _call(srv), llm.AnswerCache(cache_path), concurrency=3, progress=False)
        assert srv.calls == 2
        assert sorted(b["messages"][0]["content"] for b in srv.bodies) == ["p2", "p5"]
    assert all(o.ok for o in got.values()) and sum(o.cached for o in got.values()) == 6

    with ChatServer(responder) as srv:  # and a third run makes zero calls
        got = llm.run_requests(reqs, _call(srv), llm.AnswerCache(cache_path), concurrency=3, progress=False)
        assert srv.calls == 0 and all(o.cached for o in got.values())


def test_concurrency_limit_is_respected():
    reqs = [llm.Request(str(i), str(i), MSGS) for i in range(12)]
    with ChatServer(lambda b, n: ok("x"), latency=0.05) as srv:
        llm.run_requests(reqs, _call(srv), llm.AnswerCache(None), concurrency=3, progress=False)
        assert srv.calls == 12 and srv.max_in_flight == 3


def test_cache_skips_a_torn_line(tmp_path):
    p = tmp_path / "c.jsonl"
    c = llm.AnswerCache(p)
    c.put("a", "one", backend="x")
    with open(p, "a") as f:
        f.write('{"key": "b", "te')  # interrupted write
    c2 = llm.AnswerCache(p)
    assert c2.get("a")["text"] == "one" and c2.get("b") is None and c2.bad_lines == 1


def test_cache_key_depends_on_every_part():
    base = llm.cache_key("openai", "gpt-4", "v1", ["a", "b"])
    assert base == llm.cache_key("openai", "gpt-4", "v1", ["a", "b"])
    others = [llm.cache_key("azure", "gpt-4", "v1", ["a", "b"]), llm.cache_key("openai", "gpt-4o", "v1", ["a", "b"]),
              llm.cache_key("openai", "gpt-4", "v2", ["a", "b"]), llm.cache_key("openai", "gpt-4", "v1", ["a", "c"])]
    assert len({base, *others}) == 5 and len(base) == 64


def test_replay_backend_makes_no_call():
    out = llm.replay_call(llm.Request("p", "k", MSGS))
    assert not out.ok and "replay" in out.reason


def test_azure_client_speaks_the_deployment_route(monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "test-azure-key")
    with ChatServer(lambda b, n: ok("Unchanged mild cardiomegaly.")) as srv:
        ep = llm.Endpoint.from_profile("azure", "my-gpt4-deployment", azure_endpoint=srv.root_url,
                                       api_version="2024-10-21")
        assert llm.check_data_use("mimic", "azure", ep.url).startswith("allowed")  # loopback
        out = llm.make_api_call(ep, llm.RetryPolicy(**FAST), 5)(llm.Request("p", "k", MSGS))
        assert out.ok and out.text == "Unchanged mild cardiomegaly."
        assert srv.paths[0] == "/openai/deployments/my-gpt4-deployment/chat/completions?api-version=2024-10-21"


# --------------------------------------------------------------------------- keys and configuration

def test_keys_come_from_the_environment_only(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ep = llm.Endpoint.from_profile("openai", "gpt-4")
    with pytest.raises(llm.BackendConfigError, match="OPENAI_API_KEY, which is not set"):
        ep.api_key()
    monkeypatch.setenv("MY_SERVER_KEY", "abc")
    assert llm.Endpoint.from_profile("compatible", "m", "http://127.0.0.1:1/v1", key_env="MY_SERVER_KEY").api_key() == "abc"


@pytest.mark.parametrize("kw,msg", [
    (dict(backend="compatible", model="m"), "needs llm_base_url"),
    (dict(backend="azure", model="d", api_version="2024-10-21"), "needs llm_azure_endpoint"),
    (dict(backend="azure", model="d", azure_endpoint="https://x.openai.azure.com"), "needs llm_api_version"),
    (dict(backend="openai"), "needs llm_model"),
    (dict(backend="gpt4all"), "is not one of"),
])
def test_backend_configuration_errors(kw, msg, monkeypatch):
    monkeypatch.delenv("AZURE_OPENAI_ENDPOINT", raising=False)
    monkeypatch.delenv("OPENAI_API_VERSION", raising=False)
    with pytest.raises(llm.BackendConfigError, match=msg):
        llm.Endpoint.from_profile(**kw)


# --------------------------------------------------------------------------- data-use guard

@pytest.mark.parametrize("source,backend,url,allow,ok_", [
    ("mimic", "openai", None, [], False),                                    # api.openai.com
    ("mimic", "openai", "https://api.openai.com/v1", ["api.openai.com"], False),  # never allow-listable
    ("chexpertplus", "compatible", "https://api.together.xyz/v1", [], False),
    ("icg", "compatible", "http://gpu.hospital.org:8000/v1", [], False),
    ("mimic", "azure", "https://myres.openai.azure.com", [], True),
    ("mimic", "compatible", "https://evil.openai.azure.com.attacker.net/v1", [], False),
    ("mimic", "compatible", "http://127.0.0.1:8000/v1", [], True),
    ("mimic", "compatible", "http://localhost:11434/v1", [], True),
    ("mimic", "compatible", "http://[::1]:8080/v1", [], True),
    ("icg", "compatible", "http://gpu.hospital.org:8000/v1", ["gpu.hospital.org"], True),
    ("icg", "compatible", "http://gpu.hospital.org:8000/v1", ["*.hospital.org"], True),
    ("phantom", "openai", None, [], True),                                   # not credentialed
    ("csv", "compatible", "https://api.together.xyz/v1", [], False),         # credentialed unless the rows say not
    ("my-hospital-export", "openai", None, [], False),                      # an unknown name counts as credentialed
    ("mimic", "offline", "", [], True),                                      # no network
    ("mimic", "replay", "", [], True),
])
def test_data_use_guard(source, backend, url, allow, ok_):
    if ok_:
        assert llm.check_data_use(source, backend, url, allow).startswith("allowed")
    else:
        with pytest.raises(llm.DataUseError, match="PhysioNet credentialed data use agreement"):
            llm.check_data_use(source, backend, url, allow)


def test_guard_refuses_before_any_connection(monkeypatch):
    """With the guard failing, no client is built and the server sees nothing."""
    import pandas as pd

    from bmjlib.text import progression

    pairs = pd.DataFrame([{"pair_id": "a", "prior_findings": "Small left effusion.", "prior_impression": "",
                           "followup_findings": "Moderate left effusion.", "followup_impression": ""}])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with ChatServer(lambda b, n: ok("x")) as srv:
        # a non-loopback name that resolves to the loopback server would be sent to if the guard let it
        url = f"http://not-allowed.example:{srv.port}/v1"
        with pytest.raises(llm.DataUseError, match="nothing was sent"):
            progression.describe_pairs(pairs, "compatible", "m", url, source="mimic", progress=False)
        assert srv.calls == 0


def test_rows_marked_credentialed_are_guarded_whatever_the_profile_says():
    import pandas as pd

    from bmjlib.text import progression

    pairs = pd.DataFrame([{"pair_id": "a", "prior_findings": "Small left effusion.", "prior_impression": "",
                           "followup_findings": "Moderate left effusion.", "followup_impression": "",
                           "source": "icg", "credentialed": True}])
    assert progression.data_source(pairs, "phantom") == "icg"
    assert progression.data_source(pairs.drop(columns="source"), "phantom") == "credentialed"
    assert progression.data_source(pairs.assign(credentialed=False).drop(columns="source"), "phantom") == "phantom"
    assert progression.data_origin(pairs.assign(credentialed=False).drop(columns="source"), "csv") == ("csv", False)
    with pytest.raises(llm.DataUseError, match="icg report text to api.openai.com"):
        progression.describe_pairs(pairs, "openai", "gpt-4", source="phantom", progress=False)


def test_override_is_logged():
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("bmjlib.text.llm").addHandler(handler)
    try:
        decision = llm.check_data_use("mimic", "openai", None, override=True)
    finally:
        logging.getLogger("bmjlib.text.llm").removeHandler(handler)
    assert decision.startswith("DATA-USE OVERRIDE") and "api.openai.com" in decision
    assert any("DATA-USE OVERRIDE" in r.getMessage() for r in records)
