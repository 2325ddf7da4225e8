"""An API key in the environment never reaches an executed notebook, its metadata or the logs."""
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from bmjlib.chain import run_chain
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
