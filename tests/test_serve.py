"""Serving: a package's f16 GGUF behind llama-cpp-python's OpenAI-compatible server on 127.0.0.1,
asked through the official ``openai`` client, answers as llama.cpp in-process and the transformers
fine-tuned model do, with the training prompt's exact tokens; ``llama_chat.py --server`` is its
client; ``--verify`` checks the adapter layout vLLM loads.

The tiny model is the ``llama3`` family (chat template style, like ``smollm2``): the ``smollm2``
tiny model's logits are nearly flat (initializer range 0.02, tied embeddings), so every prompt
answers the same byte-fragment token, which a server drops as incomplete UTF-8, and an empty
answer proves nothing. The ``llama3`` one has clear top-2 gaps, a template that writes BOS itself
and an end-of-turn token that is not EOS.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import llama_package
from helpers import ROOT, hf_greedy, make_records, random_adapter, write_jsonl
from llama_chat import main as chat_main
from llama_sft import serve
from llama_sft.adapter.archive import verify_package
from llama_sft.data.prompt_format import PromptFormat
from llama_sft.errors import EXIT_DATA, DataError, UsageError
from llama_sft.files import read_json, write_manifest
from llama_sft.package import gguf

FAMILY = "llama3"
FOLDER = "llama-sft-135m-0.1.0"
MAX_TOKENS = 16
CLEAR_MARGIN = 0.02      # top-2 logit gap above f16 rounding (as in test_exports.py)


@pytest.fixture(scope="module")
def package(family_dirs, tmp_path_factory) -> SimpleNamespace:
    """A random adapter on the tiny llama3 model, packaged with --gguf f16."""
    from llama_sft.model.loading import load_tokenizer

    wd = tmp_path_factory.mktemp("serve")
    adapter = random_adapter(family_dirs[FAMILY], wd / "final_model", style="chat_template",
                             target_modules=("q_proj", "v_proj", "down_proj"))
    assert llama_package.main(["--adapter-path", str(adapter), "--output-dir",
                               str(wd / "packages"), "--gguf", "f16"]) == 0
    packages = wd / "packages"
    return SimpleNamespace(adapter=adapter, archive=packages / f"{FOLDER}.tar.gz",
                           gguf=packages / f"{FOLDER}.f16.gguf",
                           tokenizer=load_tokenizer(str(adapter)),
                           fmt=PromptFormat.load(adapter))


@pytest.fixture(scope="module")
def llm(package):
    return gguf.load(package.gguf, n_ctx=512)


@pytest.fixture(scope="module")
def server(package):
    with serve.start_server(package.gguf, n_ctx=512) as url:
        yield url


def cpp_answer(llm, tokenizer, fmt: PromptFormat, instruction: str, context: str = "") -> str:
    """llama.cpp's greedy answer in-process, decoded as llama.cpp decodes (invalid UTF-8 bytes
    dropped, where transformers' decode shows U+FFFD), without the format's response prefix."""
    ids = fmt.encode_prompt(tokenizer, instruction, context)
    tokens = gguf.greedy(llm, ids, MAX_TOKENS, fmt.stop_ids(tokenizer))
    text = llm.detokenize(tokens).decode("utf-8", errors="ignore")
    return text.removeprefix(fmt.response_prefix)


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now (as servers do, past TIME_WAIT)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((serve.HOST, port))
            sock.listen()
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The server

def test_server_prompt_is_the_training_prompt(package, llm):
    """The server's chat prompt (``--chat_format chat_template.default``: the GGUF's Jinja
    template through llama-cpp-python's formatter, tokenized as its chat handler does) is
    token for token ``PromptFormat.encode_prompt``, with and without a system prompt."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata["tokenizer.chat_template"]
    assert template == package.fmt.chat_template
    command = serve.server_command(package.gguf, 1, 512, None)
    assert command[command.index("--chat_format") + 1] == "chat_template.default"
    formatter = Jinja2ChatFormatter(template=template,
                                    eos_token=llm._model.token_get_text(llm.token_eos()),
                                    bos_token=llm._model.token_get_text(llm.token_bos()))
    records = make_records(6) + [{"instruction": "  padded \n", "context": "naïve — 日本語 ✓\n"}]
    for system in (None, "Answer in one word."):
        fmt = PromptFormat("chat_template", package.fmt.chat_template, system)
        for r in records:
            rendered = formatter(messages=serve.chat_messages(fmt, r["instruction"], r["context"]))
            ids = llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special,
                               special=True)
            assert ids == fmt.encode_prompt(package.tokenizer, r["instruction"], r["context"])


def test_server_answers_as_llama_cpp_and_transformers(package, llm, server):
    """5 prompts through the openai client (temperature 0, 16 tokens): the server's answers are
    llama.cpp's greedy answers in-process on the training prompt's tokens, and those are the
    transformers fine-tuned model's greedy tokens up to any step whose top-2 gap is within
    rounding (random weights make near-ties common), and all of them on most prompts."""
    from llama_sft.model.loading import load_for_inference

    assert server.startswith("http://127.0.0.1:")
    tok, fmt = package.tokenizer, package.fmt
    tuned = load_for_inference(package.adapter, dtype="float32", device_map=None).model
    identical = 0
    for r in make_records(5):
        prompt = fmt.encode_prompt(tok, r["instruction"], r["context"])
        reply = serve.chat_completion(server, serve.chat_messages(fmt, r["instruction"],
                                                                  r["context"]),
                                      max_tokens=MAX_TOKENS, temperature=0)
        assert reply.prompt_tokens == len(prompt)
        cpp = gguf.greedy(llm, prompt, MAX_TOKENS, fmt.stop_ids(tok))
        assert reply.text == llm.detokenize(cpp).decode("utf-8", errors="ignore")
        assert reply.finish_reason == ("length" if len(cpp) == MAX_TOKENS else "stop")
        tokens, gaps = hf_greedy(tuned, prompt, len(cpp))
        clear = next((i for i, g in enumerate(gaps) if g < CLEAR_MARGIN), len(gaps))
        assert cpp[:clear] == tokens[:clear]
        identical += cpp == tokens
    assert identical >= 3, f"transformers gave llama.cpp's answer on {identical} of 5 prompts"


def test_server_stops_and_frees_its_port_even_when_the_body_fails(package):
    port = serve.free_port()
    with pytest.raises(RuntimeError, match="body failed"):
        with serve.start_server(package.gguf, port=port, n_ctx=256) as url:
            assert url == f"http://127.0.0.1:{port}"
            assert serve.served_model(url) == str(package.gguf)
            raise RuntimeError("body failed")
    with pytest.raises(ConnectionRefusedError), socket.create_connection((serve.HOST, port), 2):
        pass
    assert port_is_free(port)


def test_server_that_does_not_come_up_is_a_data_error_in_bounded_time(package, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(64))
    start = time.monotonic()
    with pytest.raises(DataError, match="exited with code"):
        with serve.start_server(broken):
            pass
    port = serve.free_port()
    with pytest.raises(DataError, match="did not answer within 0 s"):
        with serve.start_server(package.gguf, port=port, startup_timeout=0.01):
            pass
    assert time.monotonic() - start < 60 and port_is_free(port)


def test_base_url_takes_both_spellings():
    assert serve.base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert serve.base_url(" http://127.0.0.1:8000 ") == "http://127.0.0.1:8000"
    with pytest.raises(UsageError, match="http"):
        serve.base_url("127.0.0.1:8000")


# ---------------------------------------------------------------------------------------------
# llama_chat.py --server

def test_chat_cli_asks_the_server_with_the_package_prompt_format(package, llm, server, capsys):
    """One question; the prompt format comes from the package archive (verified, extracted)."""
    question, context = "Summarize the review.", "Great battery, dim screen."
    rc = chat_main(["--server", server + "/v1", "--adapter-path", str(package.archive),
                    question, "--context", context, "--temperature", "0",
                    "--max-new-tokens", str(MAX_TOKENS)])
    captured = capsys.readouterr()
    assert rc == 0
    assert f"at {server} (prompt style chat_template)" in captured.err
    want = cpp_answer(llm, package.tokenizer, package.fmt, question, context)
    assert want.strip() and captured.out == want + "\n"


def test_chat_cli_demo_and_stdin_through_the_server(package, llm, server, tmp_path, capsys,
                                                    monkeypatch):
    records = make_records(3, "golden")
    data = write_jsonl(tmp_path / "golden_set.jsonl", records)
    greedy = ["--server", server, "--adapter-path", str(package.adapter), "--temperature", "0",
              "--max-new-tokens", str(MAX_TOKENS)]
    assert chat_main([*greedy, "--demo", "--dataset", str(data), "--num-demo", "2"]) == 0
    out = capsys.readouterr().out
    for r in records[:2]:
        want = cpp_answer(llm, package.tokenizer, package.fmt, r["instruction"], r["context"])
        assert f"answer: {want}\nreference: {r['response']}\n" in out
    assert "[3/" not in out

    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n\nsecond question\n"))
    assert chat_main(greedy) == 0
    out = capsys.readouterr().out
    for q in ("first question", "second question"):
        assert f"> {q}\n{cpp_answer(llm, package.tokenizer, package.fmt, q)}\n" in out


@pytest.mark.parametrize("style, system", [("llama2", None), ("instruction", None),
                                           ("chat_template", "Answer in one word.")])
def test_chat_cli_keeps_every_prompt_style(package, llm, server, tmp_path, capsys, style,
                                           system):
    """instruction and llama2 prompts go to the completions endpoint as the rendered text, a
    system prompt goes first among the chat messages: the server answers what llama.cpp answers
    in-process on the training prompt's tokens (only prompt_format.json is read from the
    adapter, so any style can be put to the one served model)."""
    adapter = tmp_path / "final_model"
    shutil.copytree(package.adapter, adapter)
    template = package.fmt.chat_template if style == "chat_template" else None
    fmt = PromptFormat(style, template, system)
    fmt.save(adapter)
    write_manifest(adapter, stage="train", config=read_json(adapter / "training_config.json"))
    rc = chat_main(["--server", server, "--adapter-path", str(adapter), "What is 2 plus 2?",
                    "--context", "Answer briefly.", "--temperature", "0",
                    "--max-new-tokens", str(MAX_TOKENS)])
    captured = capsys.readouterr()
    assert rc == 0 and f"(prompt style {style})" in captured.err
    want = cpp_answer(llm, package.tokenizer, fmt, "What is 2 plus 2?", "Answer briefly.")
    assert want.strip() and captured.out == want + "\n"


# ---------------------------------------------------------------------------------------------
# --verify: the adapter layout vLLM loads

@pytest.fixture(scope="module")
def small_package(tiny_adapter_dir, tmp_path_factory) -> Path:
    from llama_sft.package.build import build_package

    return build_package(tiny_adapter_dir, tmp_path_factory.mktemp("layout"))


def _retar(package: Path, out: Path, replace: dict[str, bytes] | None = None) -> Path:
    """``package`` with members replaced and SHA256SUMS recomputed, so that only the layout
    check can find what is wrong."""
    with tarfile.open(package) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    members.update({f"{FOLDER}/{name}": data for name, data in (replace or {}).items()})
    sums = [f"{hashlib.sha256(data).hexdigest()}  {name.split('/', 1)[1]}"
            for name, data in sorted(members.items()) if not name.endswith("/SHA256SUMS")]
    members[f"{FOLDER}/SHA256SUMS"] = ("\n".join(sums) + "\n").encode()
    with tarfile.open(out, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def _member(package: Path, name: str) -> bytes:
    with tarfile.open(package) as tar:
        return tar.extractfile(f"{FOLDER}/{name}").read()


def _config(package: Path, **changes) -> dict[str, bytes]:
    """adapter_config.json with keys changed (None: removed)."""
    cfg = {**json.loads(_member(package, "adapter_config.json")), **changes}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    return {"adapter_config.json": json.dumps(cfg).encode()}


def _weights(package: Path, rename) -> dict[str, bytes]:
    """adapter_model.safetensors with every tensor renamed by ``rename`` (None: left out)."""
    from safetensors.numpy import load, save

    tensors = load(_member(package, "adapter_model.safetensors"))
    renamed = {rename(k): v for k, v in tensors.items()}
    return {"adapter_model.safetensors": save({k: v for k, v in renamed.items() if k})}


LAYOUT_CASES = {
    "no_target_modules": (lambda p: _config(p, target_modules=None), "lacks target_modules"),
    "no_r_and_alpha": (lambda p: _config(p, r=None, lora_alpha=None), "lacks r, lora_alpha"),
    "not_lora": (lambda p: _config(p, peft_type="LOHA"), "peft_type 'LOHA'"),
    "adapter_name_in_keys": (lambda p: _weights(p, lambda k: k.replace(
        ".lora_A.weight", ".lora_A.default.weight")), "outside peft's naming"),
    "default_in_path": (lambda p: _weights(p, lambda k: k.replace(
        "base_model.model.", "base_model.model.default.")), "outside peft's naming"),
    "unpaired": (lambda p: _weights(p, lambda k: None if ".0.self_attn.q_proj.lora_B" in k
                                    else k), "lora_A without lora_B"),
    "not_safetensors": (lambda p: {"adapter_model.safetensors": b"\xff" * 16},
                        "not safetensors"),
}


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_verify_refuses_a_layout_vllm_cannot_load(small_package, tmp_path, capsys, case):
    make, expected = LAYOUT_CASES[case]
    archive = _retar(small_package, tmp_path / "tampered.tar.gz", make(small_package))
    with pytest.raises(DataError) as excinfo:
        verify_package(archive)
    assert expected in str(excinfo.value)
    assert llama_package.main(["--verify", str(archive)]) == EXIT_DATA
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_verify_accepts_the_layout_peft_writes(small_package, tmp_path):
    """The package as built, re-archived the way the tampered ones are, passes the check."""
    assert verify_package(_retar(small_package, tmp_path / "same.tar.gz"))["folder"] == FOLDER


# ---------------------------------------------------------------------------------------------
# The main job's package (make demo)

def check_demo_server(workdir: str | Path, count: int = 5, max_new_tokens: int = 64) -> None:
    """The main job's ``packages/*.f16.gguf`` behind the server answers the golden prompts as
    trained: of the golden prompts (single turn) that the transformers fine-tuned model answers
    exactly like the reference (greedy), the first ``count`` go to the server through the
    openai client, and each answer must be that reference, exactly.

    For tests/test_end_to_end.py's main-job test, which has the work directory."""
    from llama_sft.data.records import read_sft_jsonl
    from llama_sft.model.generation.batch import generate_batch
    from llama_sft.model.loading import load_for_inference

    wd = Path(workdir)
    loaded = load_for_inference(wd / "training_output" / "final_model", dtype="float32",
                                device_map=None)
    tok, fmt = loaded.tokenizer, loaded.prompt_format
    golden = [r for r in read_sft_jsonl(str(wd / "sft_output" / "golden_set.jsonl"), None)
              if not r.get("messages")][:48]
    prompts = [fmt.encode_prompt(tok, r["instruction"], r.get("context") or "") for r in golden]
    answers = generate_batch(loaded.model, tok, prompts, max_new_tokens=max_new_tokens,
                             stop_ids=fmt.stop_ids(tok))
    right = [r for r, a in zip(golden, answers)
             if a.text.strip() == r["response"].strip()][:count]
    assert right, "the fine-tuned model answers no golden prompt exactly; nothing to compare"
    f16 = next((wd / "packages").glob("*.f16.gguf"))
    with serve.start_server(f16) as url:
        for r in right:
            reply = serve.ask(url, fmt, r["instruction"], r.get("context") or "",
                              max_tokens=max_new_tokens, temperature=0)
            assert reply.text.strip() == r["response"].strip(), (r["id"], reply.text)
    print(f"demo server: {len(right)} golden answers came back exactly through "
          f"llama_cpp.server")


@pytest.mark.slow
def test_demo_package_answers_through_the_server():
    """On the main job's output (``make demo``: ./demo_output), when it is there."""
    workdir = ROOT / "demo_output"
    if not any((workdir / "packages").glob("*.f16.gguf")):
        pytest.skip("no demo package: run `make demo` first")
    check_demo_server(workdir)
