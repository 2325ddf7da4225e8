"""An API key in the environment never reaches an executed notebook, its metadata or the logs; a value that
is a key (or a URL that carries one) is refused with a message that does not show it."""
import ast
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pandas as pd
import pytest

from bmjlib.chain import run_chain
from bmjlib.runtime import PROFILE_DIR, load_profile
from bmjlib.text import llm, progression
from nbutil import make_notebook

KEY = "sk-test-SECRET-0123456789abcdef"


class _Chat(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "Left effusion is new."}}]})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *a):
        pass


def test_api_key_never_written(tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Chat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        nbdir = tmp_path / "notebooks"
        make_notebook(nbdir / "00_llm.ipynb", [
            ("md", "# Calls an OpenAI-compatible server with the key from the environment"),
            ("code", "import os, logging, openai\n"
                     "logging.basicConfig(level=logging.DEBUG)\n"
                     "client = openai.OpenAI(base_url=base_url, api_key=os.environ['OPENAI_API_KEY'])\n"
                     "r = client.chat.completions.create(model='m', messages=[{'role': 'user', 'content': 'hi'}])\n"
                     "print(r.choices[0].message.content)"),
        ], parameters="run_dir = 'x'\nbase_url = ''")
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        out = tmp_path / "run"
        run_chain({"profile": "t", "base_url": f"http://127.0.0.1:{server.server_port}/v1"}, out=out,
                  notebook_dir=nbdir, log=lambda *_: None)
        executed = (out / "notebooks" / "00_llm.ipynb").read_text()
        assert "Left effusion is new." in executed  # the call really happened
        for f in out.rglob("*"):
            if f.is_file():
                assert KEY not in f.read_text(errors="replace"), f"API key leaked into {f}"
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- values that are keys (llm.secret_problem)

AZURE_LIKE = "3f9a0c6be21d4d7a9c5e8b1f0a7d2c64"  # 32 hex characters, the shape of an Azure OpenAI key
SECRETS = {
    "sk": "sk-proj-Zx81QpLm42VbNc07RtYu5Ws9",
    "azure": AZURE_LIKE,
    "bearer": "Bearer eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9",
    "hf": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
}


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_a_key_pasted_into_llm_key_env_is_refused_without_showing_it(kind):
    key = SECRETS[kind]
    problem = llm.secret_problem("llm_key_env", key)
    assert problem and problem.startswith("llm_key_env ") and "\n" not in problem
    assert key not in problem and key[:8] not in problem.replace("llm_key_env", "")
    with pytest.raises(llm.ParameterError) as e:
        llm.Endpoint.from_profile("compatible", "m", "http://127.0.0.1:1/v1", key_env=key)
    assert key not in str(e.value) and str(e.value).startswith("llm_key_env ")


def test_llm_key_env_must_be_an_environment_variable_name():
    assert llm.secret_problem("llm_key_env", "MY_LLM_KEY") is None
    assert llm.secret_problem("llm_key_env", "") is None
    for bad in ("my key", "hunter2", "export KEY=x"):
        problem = llm.secret_problem("llm_key_env", bad)
        assert problem.startswith("llm_key_env must be the NAME of an environment variable") and bad not in problem


def test_a_url_with_user_and_key_is_refused_without_showing_them(tmp_path):
    url = "http://alice:s3cr3t-passw0rd@127.0.0.1:8000/v1"
    problem = llm.secret_problem("llm_base_url", url)
    assert problem.startswith("llm_base_url is a URL with a user name or password") and "s3cr3t" not in problem
    assert "alice" not in problem
    with pytest.raises(llm.ParameterError, match="^llm_base_url is a URL with a user name") as e:
        llm.Endpoint.from_profile("compatible", "m", url)
    assert "s3cr3t" not in str(e.value)
    with pytest.raises(llm.ParameterError) as e:
        progression.describe_pairs(pd.DataFrame(columns=["pair_id"]), "compatible", "m", url, progress=False)
    assert "s3cr3t" not in str(e.value)
    assert llm.secret_problem("llm_azure_endpoint", "https://x.openai.azure.com/?api-key=abc123").startswith(
        "llm_azure_endpoint is a URL with a key in its query")


@pytest.mark.parametrize("name", ["llm_model", "llm_base_url", "llm_azure_endpoint", "llm_api_version",
                                  "llm_allow_hosts"])
def test_an_sk_value_in_any_llm_parameter_is_refused(name):
    key = SECRETS["sk"]
    kw = {"llm_model": dict(model=key), "llm_base_url": dict(base_url=key),
          "llm_azure_endpoint": dict(azure_endpoint=key), "llm_api_version": dict(api_version=key),
          "llm_allow_hosts": dict(allow_hosts=key)}[name]
    problem = llm.secret_problem(name, key)
    assert problem.startswith(f"{name} looks like an API key") and key not in problem
    with pytest.raises(llm.ParameterError) as e:
        progression.describe_pairs(pd.DataFrame(columns=["pair_id"]), **{"backend": "compatible", "model": "m",
                                   "base_url": "http://127.0.0.1:1/v1", **kw}, progress=False)
    assert str(e.value).startswith(name) and key not in str(e.value)
    assert llm.secret_problem("hosts", ["ok.example.org", key]).startswith("hosts looks like an API key")


def test_redact_masks_keys_userinfo_and_headers_and_keeps_the_rest():
    text = (f"HTTP 401 from http://bob:pw-123456@api.example.org/v1?api-key=zzz9 with Authorization: "
            f"{SECRETS['bearer']} key {SECRETS['sk']} azure {AZURE_LIKE} model gpt-4o-2024-08-06")
    out = llm.redact(text)
    for secret in ("pw-123456", "zzz9", "eyJ0eXAi", SECRETS["sk"], AZURE_LIKE):
        assert secret not in out
    assert "http://[redacted]@api.example.org/v1?api-key=[redacted]" in out and "gpt-4o-2024-08-06" in out
    assert "Bearer [redacted]" in out


def _notebook_defaults():
    for nb in sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb")):
        cells = [c for c in json.loads(nb.read_text())["cells"] if "parameters" in c["metadata"].get("tags", [])]
        for node in ast.parse("".join(cells[0]["source"])).body if cells else []:
            yield f"{nb.name}:{node.targets[0].id}", node.targets[0].id, ast.literal_eval(node.value)


def test_no_packaged_value_or_notebook_default_looks_like_a_secret():
    """The check runs on every profile value, so the shipped ones must all pass it."""
    values = [(f"{p.stem}:{k}", k, v) for p in PROFILE_DIR.glob("*.yaml") for k, v in load_profile(p.stem).items()]
    values += list(_notebook_defaults())
    values += [("typical", n, v) for n, v in (
        ("text_encoder", "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"),
        ("llm_azure_endpoint", "https://myres.openai.azure.com"), ("llm_base_url", "http://localhost:11434/v1"),
        ("llm_model", "gpt-4o-2024-08-06"), ("llm_model", "meta-llama/Llama-3.1-8B-Instruct"),
        ("llm_allow_hosts", "gpu.hospital.org, *.hospital.org"), ("data_root", "/data/physionet.org/files/mimic-cxr-jpg/2.1.0"))]
    assert len(values) > 100
    flagged = [(where, llm.secret_problem(name, value)) for where, name, value in values
               if llm.secret_problem(name, value)]
    assert flagged == []
