"""llama_chat.py on the tiny adapter: single question, demo, stdin lines, interactive, errors."""
from __future__ import annotations

import io
import subprocess
import sys

import llama_package
import llama_sft.chat
from helpers import ROOT, make_records, write_jsonl
from llama_chat import main
from llama_sft.chat import DEMO_PROMPTS

GREEDY = ["--max-new-tokens", "5", "--temperature", "0", "--dtype", "float32"]


class FakeStdin(io.StringIO):
    def __init__(self, text: str, tty: bool):
        super().__init__(text)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_help_exits_0():
    result = subprocess.run([sys.executable, str(ROOT / "llama_chat.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--demo" in result.stdout
    assert "(default: 256)" in result.stdout


def test_single_question_streams_the_greedy_answer(tiny_adapter_dir, capsys):
    from llama_sft.model.generation.batch import generate_batch
    from llama_sft.model.loading import load_for_inference

    rc = main(["--adapter-path", str(tiny_adapter_dir), "What is 2 plus 2?",
               "--context", "Answer briefly.", *GREEDY])
    captured = capsys.readouterr()
    assert rc == 0
    assert "chatting with adapter" in captured.err and "chat_template" in captured.err
    loaded = load_for_inference(tiny_adapter_dir, dtype="float32")
    prompt = loaded.prompt_format.encode_prompt(loaded.tokenizer, "What is 2 plus 2?",
                                                "Answer briefly.")
    expected = generate_batch(loaded.model, loaded.tokenizer, [prompt], max_new_tokens=5)[0]
    assert expected.text and captured.out.strip() == expected.text


def test_demo_builtin_prompts(tiny_adapter_dir, capsys):
    rc = main(["--adapter-path", str(tiny_adapter_dir), "--demo", *GREEDY])
    out = capsys.readouterr().out
    assert rc == 0
    for n, (instruction, context) in enumerate(DEMO_PROMPTS, start=1):
        assert f"[{n}/{len(DEMO_PROMPTS)}] {instruction}" in out
        assert not context or f"input: {context}" in out
    assert out.count("answer: ") == len(DEMO_PROMPTS) and "reference:" not in out


def test_demo_from_dataset_shows_references(tmp_path, tiny_adapter_dir, capsys):
    records = make_records(5, "golden")
    data = write_jsonl(tmp_path / "golden_set.jsonl", records)
    rc = main(["--adapter-path", str(tiny_adapter_dir), "--demo", "--dataset", str(data),
               "--num-demo", "2", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("answer: ") == 2
    assert f"reference: {records[0]['response']}" in out
    assert f"reference: {records[1]['response']}" in out
    assert "[3/" not in out and records[2]["instruction"] not in out


def test_questions_from_piped_stdin(tiny_adapter_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", FakeStdin("first question\n\nsecond question\n", tty=False))
    rc = main(["--adapter-path", str(tiny_adapter_dir), *GREEDY])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("> ") == 2 and "> first question" in out and "> second question" in out


def test_empty_piped_stdin_is_usage_error(tiny_adapter_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", FakeStdin("\n", tty=False))
    rc = main(["--adapter-path", str(tiny_adapter_dir), *GREEDY])
    err = capsys.readouterr().err
    assert rc == 2 and err.splitlines()[-1].startswith("error: no question given")


def test_interactive_session(tiny_adapter_dir, capsys, monkeypatch):
    asked = []

    def fake_answer(loaded, instruction, context, settings):
        asked.append((instruction, context))

    lines = iter(["/context some input", "first?", "", "/context", "second?", "/quit", "never"])
    monkeypatch.setattr(sys, "stdin", FakeStdin("", tty=True))
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(llama_sft.chat, "answer", fake_answer)
    rc = main(["--adapter-path", str(tiny_adapter_dir), *GREEDY])
    assert rc == 0
    assert asked == [("first?", "some input"), ("second?", "")]
    assert next(lines) == "never"  # /quit stopped reading


def test_interactive_ends_on_eof(tiny_adapter_dir, capsys, monkeypatch):
    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr(sys, "stdin", FakeStdin("", tty=True))
    monkeypatch.setattr("builtins.input", eof)
    assert main(["--adapter-path", str(tiny_adapter_dir), *GREEDY]) == 0


def test_base_model_alone(tiny_model_dir, capsys):
    from llama_sft.model.generation.batch import generate_batch
    from llama_sft.model.loading import load_for_inference

    rc = main(["--base-model", str(tiny_model_dir), "Hello", *GREEDY])
    captured = capsys.readouterr()
    assert rc == 0
    assert "chatting with " + str(tiny_model_dir) in captured.err
    loaded = load_for_inference(base_model=str(tiny_model_dir), dtype="float32")
    assert loaded.adapter_dir is None
    prompt = loaded.prompt_format.encode_prompt(loaded.tokenizer, "Hello")
    expected = generate_batch(loaded.model, loaded.tokenizer, [prompt], max_new_tokens=5)[0]
    assert len(expected.token_ids) == 5 or expected.stopped
    assert expected.token_ids
    # the streamed answer is every generated token decoded, then the streamer's closing newline
    # (the random base may answer only whitespace, which strip() would have hidden)
    streamed = loaded.tokenizer.decode(expected.token_ids, skip_special_tokens=True)
    assert captured.out == streamed + "\n"


def test_bad_adapter_path_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["--adapter-path", str(tmp_path / "missing"), "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: adapter path")


def test_mismatched_base_is_exit_2(tiny_adapter_dir, capsys):
    rc = main(["--adapter-path", str(tiny_adapter_dir), "--base-model",
               "meta-llama/Llama-2-7b-hf", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "was trained on" in err


def test_flag_problems_reported_together(capsys):
    rc = main(["question", "--demo", "--num-demo", "0", "--top-p", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    for needle in ("--adapter-path", "not both", "--num-demo", "--top-p"):
        assert needle in err


def test_chat_with_package_archive(tmp_path, tiny_adapter_dir, capsys):
    assert llama_package.main(["--adapter-path", str(tiny_adapter_dir),
                         "--output-dir", str(tmp_path / "packages")]) == 0
    archive = next((tmp_path / "packages").glob("*.tar.gz"))
    capsys.readouterr()
    rc = main(["--adapter-path", str(archive), "Hi there", *GREEDY])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.strip()
    assert f"adapter {archive}" in captured.err


# ---------------------------------------------------------------------------------------------
# --server (answers through a running server: tests/test_serve.py)

def test_help_shows_the_server_flags():
    result = subprocess.run([sys.executable, str(ROOT / "llama_chat.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--server URL" in result.stdout and "--server-model NAME" in result.stdout


def test_server_flag_problems_reported_together(capsys):
    rc = main(["--server", "127.0.0.1:8000", "--base-model", "m", "--use-4bit",
               "--dtype", "float32", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "http(s) URL" in err and "--base-model, --use-4bit, --dtype load a model here" in err
    rc = main(["--adapter-path", "x", "--server-model", "m", "hi"])
    assert rc == 2 and "--server-model is used only with --server" in capsys.readouterr().err


def test_unreachable_server_is_one_line_exit_74(capsys):
    from llama_sft.serve import free_port

    url = f"http://127.0.0.1:{free_port()}"
    assert main(["--server", url, "hi"]) == 74
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: no answer from the server at {url}")
