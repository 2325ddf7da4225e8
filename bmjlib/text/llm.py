"""LLM backends for the progression descriptions: the data-use guard, the answer cache, retries (paper §3, Fig. 2).

The paper sends two MIMIC-CXR reports per pair to GPT-4. Here every server backend goes through the
`openai` client: OpenAI itself, Azure OpenAI (`openai.AzureOpenAI`), or any OpenAI-compatible server by
`base_url` (vLLM, Ollama, llama.cpp). The offline synthesiser lives in `progression`; the replay backend
answers from the cache only and never opens a connection.

Data-use rule (DESIGN "Progression descriptions"): the PhysioNet credentialed data use agreement forbids
sharing MIMIC data with third parties, and PhysioNet's guidance names online services such as the
OpenAI API; it allows Azure OpenAI with human review opted out and recommends local models.
`check_data_use` therefore refuses credentialed text to any host that is not Azure OpenAI
(*.openai.azure.com), loopback, or allow-listed (never api.openai.com), before any connection is made.
Text is credentialed unless the data say otherwise: only the phantom, or rows a reader marked
`credentialed = False`, are open (`bmjlib.text.progression.data_origin` decides per row). The client
follows no redirect and re-runs the guard on the host of every request it sends, so a server cannot
forward the text elsewhere. An explicit override exists, is off by default, must be a real boolean, and
is logged loudly.

Keys are read from environment variables only (OPENAI_API_KEY, AZURE_OPENAI_API_KEY, or the variable a
profile names in `llm_key_env`); they never pass through notebook parameters. `secret_problem` tells
whether a parameter value looks like a key (or a URL carries one), and `redact` masks key-shaped text in
every message this module and `progression` raise or record.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

from tqdm.auto import tqdm

from bmjlib.io import fingerprint

log = logging.getLogger("bmjlib.text.llm")

BACKENDS = ("offline", "openai", "azure", "compatible", "replay")
NETWORK_BACKENDS = ("openai", "azure", "compatible")
CREDENTIALED_SOURCES = ("mimic", "chexpertplus", "icg", "credentialed")  # "credentialed": a row marked so
# Sources whose text is not credentialed by name; any other name (csv included) counts as credentialed.
OPEN_SOURCES = ("phantom",)
OPENAI_URL = "https://api.openai.com/v1"
AZURE_SUFFIX = ".openai.azure.com"
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "azure": "AZURE_OPENAI_API_KEY", "compatible": "OPENAI_API_KEY"}
PHYSIONET_GUIDANCE = "https://physionet.org/news/post/gpt-responsible-use"


class DataUseError(PermissionError):
    """Credentialed report text would leave for a host the data use agreement does not allow."""


class ParameterError(ValueError):
    """A parameter of the wrong type, or one that holds a secret (the message names it, never the secret)."""


class BackendConfigError(ParameterError):
    """A backend cannot be built from the profile and environment (the message says what is missing)."""


# --------------------------------------------------------------------------- secrets in parameters

# Key shapes of the common providers (OpenAI / Anthropic sk-, GitHub, Hugging Face, Slack, AWS, Google, JWT).
_KEY_RE = re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}|\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}|\bgithub_pat_\w{30,}"
                     r"|\bhf_[A-Za-z0-9]{30,}|\bxox[abprs]-[A-Za-z0-9\-]{10,}|\bAKIA[0-9A-Z]{16}\b"
                     r"|\bAIza[0-9A-Za-z_\-]{35}|\beyJ[\w\-]{10,}\.[\w\-]{10,}\.[\w\-]{10,}")
# an authorization header's credential: 8+ characters with a digit, or 20+ ("Token limits" is no header)
_AUTH_RE = re.compile(r"\b(Bearer|Basic|Token)\s+(?=\S*\d|\S{20})[A-Za-z0-9._~+/\-]{8,}=*", re.I)
_USERINFO_RE = re.compile(r"(?<=//)[^/@\s?#]+@")
_QUERY_KEY_RE = re.compile(r"([?&](?:api[-_]?key|key|token|access_token|secret|password|sig)=)[^&#\s]+", re.I)
_TOKEN_RE = re.compile(r"[A-Za-z0-9+=]{24,}")
ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def _random_token(tok: str) -> bool:
    """A run of 24+ letters and digits that reads as random: both classes present, and the class (digit /
    lower / upper) changes at >= 30 % of positions (random base62 ~62 %, hex ~47 %; identifiers such as
    BiomedCLIPPubMedBERT256 stay near 20 %)."""
    digits = sum(c.isdigit() for c in tok)
    if digits < 2 or sum(c.isalpha() for c in tok) < 2:
        return False
    cls = [0 if c.isdigit() else 1 if c.islower() else 2 for c in tok]
    return sum(a != b for a, b in zip(cls, cls[1:])) >= 0.3 * (len(tok) - 1)


def secret_problem(name: str, value) -> str | None:
    """One line saying why the parameter `name` = `value` must not be passed on, or None if it may.

    Contract (the chain's check_no_secrets calls this for every profile value before a notebook runs):
    the line names the parameter and the kind of problem and never contains the value or any part of it;
    strings are checked, lists / tuples / dicts element by element, other types (numbers, booleans, None)
    are never a problem. Problems: a key-shaped value (sk-..., ghp_..., hf_..., AKIA..., a JWT, a
    "Bearer ..." header, or a long random-looking token of letters and digits), a URL with user
    information (scheme://user:key@host) or a key in its query (?api-key=...), and an `llm_key_env` (any
    name ending in key_env) that is not an environment variable name (^[A-Z_][A-Z0-9_]*$).
    """
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return next((p for p in (secret_problem(name, v) for v in value) if p), None)
    if not isinstance(value, str) or not value:
        return None
    keep_out = "keys go in an environment variable that llm_key_env names, never in a profile (value not shown)"
    if _KEY_RE.search(value) or _AUTH_RE.search(value):
        return f"{name} looks like an API key or an authorization header; {keep_out}"
    if _USERINFO_RE.search(value):
        return f"{name} is a URL with a user name or password in it (user:key@host); {keep_out}"
    if _QUERY_KEY_RE.search(value):
        return f"{name} is a URL with a key in its query string; {keep_out}"
    if any(_random_token(t) for t in _TOKEN_RE.findall(value)):
        return f"{name} holds a long random-looking token, probably a key; {keep_out}"
    if name.endswith("key_env") and not ENV_NAME_RE.match(value):
        return (f"{name} must be the NAME of an environment variable (capitals, digits and _, e.g. MY_LLM_KEY), "
                f"and this value is not one (value not shown)")
    return None


def redact(text) -> str:
    """`text` with key-shaped substrings, authorization headers, URL user information and key query
    values masked, for error messages and recorded reasons."""
    text = str(text)
    text = _KEY_RE.sub("[redacted]", text)
    text = _AUTH_RE.sub(lambda m: f"{m.group(1)} [redacted]", text)
    text = _USERINFO_RE.sub("[redacted]@", text)
    text = _QUERY_KEY_RE.sub(lambda m: f"{m.group(1)}[redacted]", text)
    return _TOKEN_RE.sub(lambda m: "[redacted]" if _random_token(m.group(0)) else m.group(0), text)


def refuse_secrets(**params) -> None:
    """Raise ParameterError with `secret_problem`'s line for the first parameter that looks like a key."""
    for name, value in params.items():
        problem = secret_problem(name, value)
        if problem:
            raise ParameterError(problem)


# --------------------------------------------------------------------------- parameter types

def require_bool(name: str, value) -> bool:
    """`value` if it is a real boolean; else ParameterError naming the parameter ("false" in quotes is
    a string, and a non-empty string is true in Python: it must never switch anything on)."""
    if isinstance(value, bool):
        return value
    shown = redact(repr(value))
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise ParameterError(f"{name} must be true or false (a YAML boolean, without quotes); got the "
                         f"{type(value).__name__} {shown}")


def declared_credentialed(value) -> str | bool:
    """The profile's `data_credentialed`: "auto", True or False (real booleans); anything else is an error."""
    if isinstance(value, bool) or value == "auto":
        return value
    shown = redact(repr(value))[:40]
    raise ParameterError(f"data_credentialed must be auto, true or false (booleans without quotes); got the "
                         f"{type(value).__name__} {shown}")


# --------------------------------------------------------------------------- data-use guard

def host_of(url: str) -> str:
    try:
        host = urlparse(url if "//" in url else f"//{url}").hostname
    except ValueError:
        host = None
    if not host:
        raise BackendConfigError(f"cannot read a host name from the URL {redact(url)!r}")
    return host.lower().rstrip(".")


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _allowed(host: str, allow_hosts: Iterable[str]) -> bool:
    for a in allow_hosts:
        a = a.strip().lower()
        if a and (host == a or (a.startswith("*.") and host.endswith(a[1:]))):
            return True
    return False


def parse_hosts(value: str | Iterable[str] | None) -> list[str]:
    """Profile value 'a.example.org, *.hospital.org' (or a list) -> list of host patterns."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [h.strip() for h in items if h.strip()]


def check_data_use(source: str, backend: str, url: str | None, allow_hosts: Iterable[str] = (),
                   override: bool = False, credentialed: bool | None = None, quiet: bool = False) -> str:
    """Decide whether report text from `source` may go to `url`; raise DataUseError if not.

    Called before any client is built or any connection opened, and again (`quiet`) on the host of every
    request the client sends. `credentialed` is the data's own answer (`progression.data_origin`); None
    decides from the name: only OPEN_SOURCES are open. `override` must be a real boolean. Returns a
    one-line decision that the step records (e.g. "allowed: phantom text is not credentialed; ...").
    """
    override = require_bool("llm_data_use_override", override)
    source = (source or "").lower()
    if credentialed is None:
        credentialed = source not in OPEN_SOURCES
    credentialed = require_bool("credentialed", credentialed)
    if backend not in NETWORK_BACKENDS:
        return f"allowed: the {backend} backend makes no network call"
    host = host_of(url or OPENAI_URL)
    if not credentialed:
        return f"allowed: {source or 'this'} text is not credentialed (the data say so); host {host}"
    if host != "api.openai.com":
        if host.endswith(AZURE_SUFFIX):
            return f"allowed: {source} text to Azure OpenAI ({host}); human review must be opted out"
        if is_loopback(host):
            return f"allowed: {source} text to a server on this machine ({host})"
        if _allowed(host, allow_hosts):
            return f"allowed: {source} text to allow-listed host {host}"
    if override:
        msg = (f"DATA-USE OVERRIDE: sending {source} report text to {host} although the PhysioNet credentialed "
               f"data use agreement does not allow it (llm_data_use_override is true)")
        if not quiet:
            log.warning(msg)
        return msg
    if source == "credentialed":
        why = "the rows are marked credentialed data"
    elif source in CREDENTIALED_SOURCES:
        why = f"{source} is credentialed data"
    else:
        why = (f"{source} text counts as credentialed data unless its rows are marked otherwise "
               f"(data_credentialed: false for a cohort of your own)")
    raise DataUseError(
        f"refusing to send {source} report text to {host} ({backend} backend); nothing was sent. "
        f"{why}: the PhysioNet credentialed data use agreement forbids sharing it with "
        f"third parties, and PhysioNet's guidance ({PHYSIONET_GUIDANCE}) rules out online services such as the "
        f"OpenAI API. Allowed: Azure OpenAI (*{AZURE_SUFFIX}) with human review opted out, a server on this "
        f"machine (loopback), an institutional server you add to llm_allow_hosts, or llm_backend: offline. "
        f"If you hold a separate agreement, set llm_data_use_override: true (off by default; it is logged).")


# --------------------------------------------------------------------------- endpoints and clients

@dataclass
class Endpoint:
    """Where a network backend sends requests. `url` is what the guard checks (the client uses it as is)."""
    backend: str
    model: str
    url: str
    api_version: str = ""
    key_env: str = ""

    @classmethod
    def from_profile(cls, backend: str, model: str = "", base_url: str = "", azure_endpoint: str = "",
                     api_version: str = "", key_env: str = "") -> "Endpoint":
        refuse_secrets(llm_backend=backend, llm_model=model, llm_base_url=base_url,
                       llm_azure_endpoint=azure_endpoint, llm_api_version=api_version, llm_key_env=key_env)
        if backend not in BACKENDS:
            raise BackendConfigError(f"llm_backend {redact(backend)!r} is not one of {', '.join(BACKENDS)}")
        key_env = key_env or DEFAULT_KEY_ENV.get(backend, "")
        if backend == "openai":
            url = base_url or OPENAI_URL
        elif backend == "azure":
            url = azure_endpoint or base_url or os.environ.get("AZURE_OPENAI_ENDPOINT", "")
            if not url:
                raise BackendConfigError("llm_backend azure needs llm_azure_endpoint (https://NAME.openai.azure.com) "
                                         "or the AZURE_OPENAI_ENDPOINT environment variable")
            api_version = api_version or os.environ.get("OPENAI_API_VERSION", "")
            if not api_version:
                raise BackendConfigError("llm_backend azure needs llm_api_version (e.g. 2024-10-21) or OPENAI_API_VERSION")
        elif backend == "compatible":
            if not base_url:
                raise BackendConfigError("llm_backend compatible needs llm_base_url, e.g. http://127.0.0.1:8000/v1 "
                                         "(vLLM), http://localhost:11434/v1 (Ollama), http://localhost:8080/v1 (llama.cpp)")
            url = base_url
        else:
            url = ""
        if backend in NETWORK_BACKENDS and not model:
            raise BackendConfigError(f"llm_backend {backend} needs llm_model (the model or Azure deployment name)")
        return cls(backend, model, url, api_version, key_env)

    def api_key(self) -> str:
        key = os.environ.get(self.key_env, "")
        if key:
            return key
        if self.backend == "compatible":
            return "not-needed"  # local servers (Ollama, llama.cpp) accept any key
        raise BackendConfigError(f"llm_backend {self.backend} reads its key from the environment variable "
                                 f"{self.key_env}, which is not set (keys never go in a profile)")

    def client(self, timeout: float, check_url: Callable[[str], object] | None = None):
        """The openai client, on an httpx client that follows no redirect and, before every request it
        sends, checks that the request goes to this endpoint's host and passes `check_url` (the data-use
        guard); a refused request raises DataUseError there and is never sent."""
        import openai  # deferred: only the API backends need the client

        pinned = host_of(self.url)

        def before_request(request) -> None:
            url = str(request.url)
            host = host_of(url)
            if host != pinned:
                raise DataUseError(f"refusing a request to {host}: this client sends only to {pinned} "
                                   f"(llm_base_url / llm_azure_endpoint); nothing was sent")
            if check_url is not None:
                check_url(url)

        http = openai.DefaultHttpxClient(follow_redirects=False, event_hooks={"request": [before_request]})
        if self.backend == "azure":
            return openai.AzureOpenAI(azure_endpoint=self.url, api_version=self.api_version, api_key=self.api_key(),
                                      timeout=timeout, max_retries=0, http_client=http)
        return openai.OpenAI(base_url=self.url, api_key=self.api_key(), timeout=timeout, max_retries=0,
                             http_client=http)


# --------------------------------------------------------------------------- answers

@dataclass
class Outcome:
    """One request's result: ok with text, or a failure with its reason (never saved as a description)."""
    ok: bool
    text: str = ""
    reason: str = ""
    attempts: int = 0
    cached: bool = False
    finish_reason: str = ""


_REFUSAL_RE = re.compile(r"^\s*(?:I'?m sorry|I am sorry|I apologi[sz]e|I can(?:'|no)t (?:help|assist|comply|provide)"
                         r"|I cannot (?:help|assist|comply|provide)|I am unable|I'm unable|As an AI)", re.I)
_PHI_RE = re.compile(r"___|\b\d{1,2}/\d{1,2}(?:/\d{2,4})?\b|\b(?:19|20)\d\d-\d\d-\d\d\b|\b(?:Dr|Mr|Mrs|Ms)\.\s+[A-Z]")
MAX_CHARS = 500


def check_answer(text: str | None, finish_reason: str | None, refusal: str | None = None) -> Outcome:
    """Turn one choice into an Outcome: finish_reason length/content_filter, a refusal, an empty or
    over-long answer, or PHI-like text (a `___` placeholder, a date, a title and name) are failures."""
    finish_reason = finish_reason or ""
    if finish_reason == "length":
        return Outcome(False, reason="truncated: finish_reason=length", finish_reason=finish_reason)
    if finish_reason == "content_filter":
        return Outcome(False, reason="blocked: finish_reason=content_filter", finish_reason=finish_reason)
    if refusal:
        return Outcome(False, reason=f"refusal: {refusal.strip()[:120]}", finish_reason=finish_reason)
    text = (text or "").strip().strip('"').strip()
    if not text:
        return Outcome(False, reason="empty answer", finish_reason=finish_reason)
    if _REFUSAL_RE.match(text):
        return Outcome(False, reason=f"refusal: {text[:120]}", finish_reason=finish_reason)
    if len(text) > MAX_CHARS:
        return Outcome(False, reason=f"answer too long ({len(text)} chars > {MAX_CHARS})", finish_reason=finish_reason)
    m = _PHI_RE.search(text)
    if m:
        return Outcome(False, reason=f"answer contains PHI-like text {m.group(0)!r}", finish_reason=finish_reason)
    return Outcome(True, text=" ".join(text.split()), finish_reason=finish_reason)


@dataclass
class RetryPolicy:
    """Bounded retries with exponential backoff on 408/409/429/5xx, timeouts and dropped connections."""
    retries: int = 3
    backoff: float = 1.0          # first wait in seconds; doubles per attempt
    max_wait: float = 30.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def wait(self, attempt: int, retry_after: str | None = None) -> float:
        w = self.backoff * 2 ** (attempt - 1)
        if retry_after:
            try:
                w = max(w, float(retry_after))
            except ValueError:
                pass
        return min(w, self.max_wait)


RETRY_STATUS = (408, 409, 429)


def chat_once(client, model: str, messages: list[dict], policy: RetryPolicy, max_tokens: int = 200) -> Outcome:
    """One chat completion with bounded retries; returns an Outcome (never raises for server trouble)."""
    import openai  # deferred: only the API backends need the client

    last = ""
    for attempt in range(1, policy.retries + 2):
        retry_after = None
        try:
            r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
        except openai.APITimeoutError:
            last = "timeout"
        except openai.APIConnectionError as e:
            if isinstance(e.__cause__, DataUseError):  # the guard refused this request: never retried
                return Outcome(False, reason=f"refused: {redact(e.__cause__)}", attempts=attempt)
            last = f"connection error ({redact(e.__cause__ or e)})"
        except openai.APIStatusError as e:
            code = e.status_code
            if 300 <= code < 400:
                where = e.response.headers.get("location", "") if e.response is not None else ""
                return Outcome(False, reason=f"HTTP {code}: redirect to {redact(where)[:120] or 'another URL'} not "
                                             f"followed (requests go only where the data-use guard checked)",
                               attempts=attempt)
            if code in RETRY_STATUS or code >= 500:
                last = f"HTTP {code}"
                retry_after = e.response.headers.get("retry-after") if e.response is not None else None
            else:
                return Outcome(False, reason=f"HTTP {code}: {redact(e.message)[:160]}", attempts=attempt)
        else:
            if not r.choices:
                out = Outcome(False, reason="no choices in the answer")
            else:
                c = r.choices[0]
                out = check_answer(c.message.content, c.finish_reason, getattr(c.message, "refusal", None))
            out.attempts = attempt
            return out
        if attempt <= policy.retries:
            policy.sleep(policy.wait(attempt, retry_after))
    return Outcome(False, reason=f"{last} after {policy.retries + 1} attempts", attempts=policy.retries + 1)


# --------------------------------------------------------------------------- cache

def cache_key(backend: str, model: str, prompt_version: str, inputs) -> str:
    """sha256 of (backend, model, prompt version, inputs): the identity of one answer."""
    return fingerprint(backend, model, prompt_version, inputs)


class AnswerCache:
    """Successful answers, one JSON object per line: {"key", "text", "backend", "model", "prompt_version"}.

    Appends are flushed line by line under a lock, so an interrupted run keeps every answer it got; a
    torn last line is skipped on load (and counted in `bad_lines`). Failures are never stored, which is
    what makes a rerun retry exactly them.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        self.bad_lines = 0
        self._lock = threading.Lock()
        if self.path and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.entries[rec["key"]] = rec
                except (ValueError, KeyError, TypeError):
                    self.bad_lines += 1

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, text: str, **meta) -> None:
        rec = {"key": key, "text": text, **meta}
        with self._lock:
            self.entries[key] = rec
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
                    f.flush()
                    os.fsync(f.fileno())

    def __len__(self) -> int:
        return len(self.entries)


# --------------------------------------------------------------------------- running many requests

@dataclass
class Request:
    id: str
    key: str
    messages: list[dict]


def run_requests(requests: list[Request], call: Callable[[Request], Outcome], cache: AnswerCache,
                 concurrency: int = 4, meta: dict | None = None, progress: bool = True) -> dict[str, Outcome]:
    """Answer every request: from the cache when present (no call), else `call` with at most
    `concurrency` in flight. Successes are cached as they arrive; failures are returned, not cached."""
    results: dict[str, Outcome] = {}
    todo = []
    for rq in requests:
        hit = cache.get(rq.key)
        if hit is not None:
            results[rq.id] = Outcome(True, text=hit["text"], cached=True)
        else:
            todo.append(rq)
    if not todo:
        return results
    bar = None
    if progress:
        bar = tqdm(total=len(todo), desc="descriptions", unit="pair")
    with ThreadPoolExecutor(max_workers=max(1, int(concurrency))) as pool:
        futures = {pool.submit(call, rq): rq for rq in todo}
        for fut in as_completed(futures):
            rq = futures[fut]
            try:
                out = fut.result()
            except Exception as e:  # a bug or a config error in one request must not lose the others
                out = Outcome(False, reason=f"{type(e).__name__}: {redact(e)}")
            if out.ok:
                cache.put(rq.key, out.text, **(meta or {}))
            results[rq.id] = out
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return results


def make_api_call(endpoint: Endpoint, policy: RetryPolicy | None = None, timeout: float = 60.0, max_tokens: int = 200,
                  check_url: Callable[[str], object] | None = None) -> Callable[[Request], Outcome]:
    """A thread-safe `call` for run_requests that sends each request's messages to `endpoint`; `check_url`
    (the data-use guard) runs on the URL of every request before it is sent (Endpoint.client)."""
    client = endpoint.client(timeout, check_url)
    policy = policy or RetryPolicy()
    return lambda rq: chat_once(client, endpoint.model, rq.messages, policy, max_tokens)


def replay_call(rq: Request) -> Outcome:
    """The replay-only backend: anything not already in the cache is a failure, and no call is made."""
    return Outcome(False, reason="not in the cache (replay backend makes no calls)")
