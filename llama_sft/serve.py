"""A package's GGUF behind llama-cpp-python's OpenAI-compatible server on 127.0.0.1, and questions
to any OpenAI-compatible server (that one, vLLM) in the prompt format the adapter was trained with.

    with start_server("packages/llama-sft-135m-0.1.0.f16.gguf") as url:   # http://127.0.0.1:PORT
        reply = chat_completion(url, [{"role": "user", "content": "What is LoRA?"}], 64)
        print(reply.text)

The server runs ``python -m llama_cpp.server --chat_format chat_template.default``: chat prompts
are the GGUF's own Jinja template, the training one that llama.cpp's converter copied from the
tokenizer. Left unset, llama-cpp-python swaps a template that is byte-identical to its built-in
ChatML, Mistral or Llama 3 one for a hand-written formatter, whose tokens can differ from training.
Prompt styles without a chat template (instruction, llama2) go to the completions endpoint as the
rendered prompt text (``ask``).

Greedy means temperature 0 and ``repeat_penalty`` 1.0: llama-cpp-python's server applies a repeat
penalty of 1.1 unless the request says otherwise, which changes greedy answers. vLLM ignores the
field (it calls its own ``repetition_penalty``, 1.0 by default).

Needs the server extras and the client: ``pip install 'llama-cpp-python[server]' openai``
(versions in requirements_training.txt).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from llama_sft.errors import DataError, StorageError, UsageError

HOST = "127.0.0.1"
SERVER_CHAT_FORMAT = "chat_template.default"     # the GGUF's own chat template, never a guess
GREEDY_EXTRAS = {"repeat_penalty": 1.0}          # llama-cpp-python's server default is 1.1
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
REQUEST_TIMEOUT_S = 120.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never via a proxy


@dataclass(frozen=True)
class Reply:
    """One answer: its text, and the server's token counts (None when streamed)."""

    text: str
    finish_reason: str | None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def server_command(gguf_path: Path, port: int, n_ctx: int, n_threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", HOST,
           "--port", str(port), "--n_ctx", str(n_ctx), "--chat_format", SERVER_CHAT_FORMAT]
    return cmd + (["--n_threads", str(n_threads)] if n_threads else [])


@contextlib.contextmanager
def start_server(gguf_path: str | Path, port: int | None = None, n_ctx: int = 2048, *,
                 n_threads: int | None = None, startup_timeout: float = 60.0,
                 stop_timeout: float = 10.0) -> Iterator[str]:
    """Serve ``gguf_path`` on 127.0.0.1 (a free port unless ``port`` is given); yields the base
    URL (``http://127.0.0.1:PORT``) once ``/v1/models`` answers, within ``startup_timeout``
    seconds. On exit the server is stopped (SIGTERM, then SIGKILL after ``stop_timeout``), also
    when the body raised. A server that exits or stays silent is a DataError with its last log
    line. Where llama.cpp's extra CPU buffer types crash on quantized GGUFs (``gguf.load``
    switches them off in-process; the server has no flag for it), serve the f16 file."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise UsageError(f"GGUF file {gguf_path} not found (llama_package.py --gguf f16 writes "
                         f"one beside the package)")
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"llama-cpp-python's server extras are not installed (no "
                         f"{', '.join(missing)}); pip install 'llama-cpp-python[server]'")
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory(prefix="llama-server-") as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(server_command(gguf_path, port, n_ctx, n_threads),
                                       stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT)
        try:
            _wait_until_ready(url, process, log_path, startup_timeout)
            yield url
        finally:
            _stop(process, stop_timeout)


def _wait_until_ready(url: str, process: subprocess.Popen, log_path: Path,
                      timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DataError(f"the llama.cpp server exited with code {process.returncode} before "
                            f"answering: {_last_line(log_path)}")
        try:
            with _DIRECT.open(f"{url}/v1/models", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise DataError(f"the llama.cpp server at {url} did not answer within {timeout:.0f} s; "
                    f"last log line: {_last_line(log_path)}")


def _last_line(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _stop(process: subprocess.Popen, timeout: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def base_url(url: str) -> str:
    """``url`` without a trailing ``/`` or ``/v1`` (both spellings are common); checked."""
    url = url.strip().rstrip("/")
    url = url[: -len("/v1")] if url.endswith("/v1") else url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--server takes an http(s) URL such as http://127.0.0.1:8000, got "
                         f"{url!r}")
    return url


@contextlib.contextmanager
def client(url: str, timeout: float = REQUEST_TIMEOUT_S):
    """The official ``openai`` client on the server at ``url`` (no key, no retries; proxies
    from the environment only for servers on other hosts)."""
    try:
        from openai import OpenAI
    except ImportError:
        raise UsageError("talking to a server needs the openai package; pip install openai") \
            from None
    url = base_url(url)
    direct = {}
    if urlsplit(url).hostname in LOOPBACK:       # a local server: never through a proxy
        from openai import DefaultHttpxClient

        direct = {"http_client": DefaultHttpxClient(trust_env=False)}
    with OpenAI(base_url=url + "/v1", api_key="not-needed", timeout=timeout, max_retries=0,
                **direct) as api, _api_errors(url):
        yield api


@contextlib.contextmanager
def _api_errors(url: str) -> Iterator[None]:
    import openai

    try:
        yield
    except openai.APIConnectionError as exc:        # timeouts included
        raise StorageError(f"no answer from the server at {url} ({exc}); is it running?") \
            from None
    except openai.APIStatusError as exc:
        error = UsageError if 400 <= exc.status_code < 500 else StorageError
        raise error(f"the server at {url} refused the request (HTTP {exc.status_code}: "
                    f"{' '.join(str(exc.message).split())[:300]})") from None


def served_model(url: str) -> str:
    """The first model the server lists (llama.cpp serves one; vLLM lists the base first)."""
    with client(url) as api:
        models = [m.id for m in api.models.list()]
    if not models:
        raise DataError(f"the server at {url} lists no model")
    return models[0]


def chat_completion(url: str, messages: list[dict[str, str]], max_tokens: int,
                    temperature: float = 0.0, *, top_p: float = 1.0, seed: int | None = None,
                    model: str | None = None,
                    on_text: Callable[[str], None] | None = None) -> Reply:
    """The server's chat completion of ``messages`` (its chat template builds the prompt) by
    ``model`` (None: ``served_model``); streamed through ``on_text`` piece by piece when given."""
    request = _request(url, model, max_tokens, temperature, top_p, seed, messages=messages)
    with client(url) as api:
        if on_text is None:
            done = api.chat.completions.create(**request)
            return _reply(done, done.choices[0].message.content)
        return _streamed(api.chat.completions.create(stream=True, **request),
                         lambda choice: choice.delta.content, on_text)


def text_completion(url: str, prompt: str, max_tokens: int, temperature: float = 0.0, *,
                    top_p: float = 1.0, seed: int | None = None, model: str | None = None,
                    on_text: Callable[[str], None] | None = None) -> Reply:
    """The server's completion of the prompt text ``prompt`` (no chat template)."""
    request = _request(url, model, max_tokens, temperature, top_p, seed, prompt=prompt)
    with client(url) as api:
        if on_text is None:
            done = api.completions.create(**request)
            return _reply(done, done.choices[0].text)
        return _streamed(api.completions.create(stream=True, **request),
                         lambda choice: choice.text, on_text)


def _request(url: str, model: str | None, max_tokens: int, temperature: float, top_p: float,
             seed: int | None, **prompt) -> dict:
    request = dict(model=model or served_model(url), max_tokens=max_tokens,
                   temperature=temperature, top_p=top_p, extra_body=GREEDY_EXTRAS, **prompt)
    return request if seed is None else {**request, "seed": seed}


def _reply(done, text: str | None) -> Reply:
    usage = done.usage
    return Reply(text or "", done.choices[0].finish_reason,
                 usage.prompt_tokens if usage else None,
                 usage.completion_tokens if usage else None)


def _streamed(stream, piece_of, on_text: Callable[[str], None]) -> Reply:
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            piece = piece_of(choice)
            if piece:
                pieces.append(piece)
                on_text(piece)
            finish = choice.finish_reason or finish
    return Reply("".join(pieces), finish)


def ask(url: str, prompt_format, instruction: str, context: str = "", *, max_tokens: int,
        **decoding) -> Reply:
    """One question in the training prompt format (``PromptFormat``; None: the server's own chat
    template, no system prompt). A chat template's user message (after the system prompt) goes
    as chat messages, which the server renders with the model's template; the instruction and
    llama2 styles go to the completions endpoint as the rendered prompt text, and the answer
    comes back without the format's ``response_prefix`` (llama2's space after ``[/INST]``)."""
    if prompt_format is not None and prompt_format.style != "chat_template":
        prompt = prompt_format.render(None, instruction, context)
        prefix = prompt_format.response_prefix
        on_text = decoding.pop("on_text", None)
        if on_text is not None:
            on_text = _after_prefix(prefix, on_text)
        reply = text_completion(url, prompt, max_tokens, on_text=on_text, **decoding)
        text = reply.text[len(prefix):] if reply.text.startswith(prefix) else reply.text
        return dataclasses.replace(reply, text=text)
    return chat_completion(url, chat_messages(prompt_format, instruction, context), max_tokens,
                           **decoding)


def chat_messages(prompt_format, instruction: str, context: str = "") -> list[dict[str, str]]:
    """The chat messages of one question: the system prompt (when the format has one), then the
    user message as training built it (``PromptFormat.user_message``)."""
    if prompt_format is None:
        return [{"role": "user", "content": f"{instruction}\n\n{context}" if context
                 else instruction}]
    system = [{"role": "system", "content": prompt_format.system_prompt}] \
        if prompt_format.system_prompt else []
    return system + [{"role": "user", "content": prompt_format.user_message(instruction, context)}]


def _after_prefix(prefix: str, on_text: Callable[[str], None]) -> Callable[[str], None]:
    """``on_text`` for a stream whose first piece starts with ``prefix``, which it drops."""
    started = False

    def emit(piece: str) -> None:
        nonlocal started
        if not started:
            started = True
            piece = piece[len(prefix):] if piece.startswith(prefix) else piece
        if piece:
            on_text(piece)
    return emit
