"""The pinned llama.cpp source: Llama 2 / 3 vocabularies, a chat template, the GGUF converter.

    python3 -m llama_sft.model.llamacpp_source            # materialize (once) and print where
    python3 -m llama_sft.model.llamacpp_source --status   # its state

The PyPI source distribution of llama-cpp-python carries llama.cpp itself. From it (downloaded by
pip, checked against a pinned sha256) a few members are extracted once into
``$LLAMA_SFT_CACHE/llama.cpp-<version>`` (default ``~/.cache/llama_sft``):
- the real Llama 2 (SentencePiece, 32,000 tokens) and Llama 3 (BPE, 128,256 tokens) vocabularies
  as GGUF files, with llama.cpp's tokenization test vectors (``*.gguf.inp`` / ``*.gguf.out``);
- Meta's Llama 3.1 instruct chat template;
- ``convert_hf_to_gguf.py`` with the ``gguf-py/`` and ``conversion/`` folders it imports, the
  converter that llama.cpp itself maintains for every architecture and tokenizer it loads.
From the two vocabularies, Hugging Face tokenizers are built as Meta publishes them
(``tokenizers/llama2`` with its SentencePiece ``tokenizer.model``, ``tokenizers/llama3``) and
checked against the test vectors, which llama.cpp generated with Meta's own tokenizers.
As with the embedded model, the copy is written into a temporary directory with a hash list, then
renamed into place, so a killed extraction leaves nothing a later run would trust.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from llama_sft.config.presets import cache_dir
from llama_sft.errors import DataError, StorageError, run_main
from llama_sft.files import hash_list_problem, sha256_file

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_ROOT = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
MEMBERS = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/",
           "models/ggml-vocab-llama-spm.gguf", "models/ggml-vocab-llama-bpe.gguf",
           "models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja", "LICENSE")
HASHES_FILE = "source_hashes.json"
VOCABS = {"llama2": "ggml-vocab-llama-spm.gguf", "llama3": "ggml-vocab-llama-bpe.gguf"}
LLAMA3_TEMPLATE = "models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja"


def source_dir() -> Path:
    return cache_dir() / f"llama.cpp-{VERSION}"


def vocab_file(family: str) -> Path:
    """The GGUF vocabulary of ``family`` (llama2 | llama3), materialized if needed."""
    return ensure_source(verbose=False) / "models" / VOCABS[family]


def tokenizer_dir(family: str) -> Path:
    """A saved Hugging Face tokenizer with ``family``'s vocabulary (llama2 | llama3)."""
    return ensure_source(verbose=False) / "tokenizers" / family


def converter() -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py``, materialized if needed."""
    return ensure_source(verbose=False) / "convert_hf_to_gguf.py"


def _wanted(name: str) -> str | None:
    """The path under the target directory of an sdist member we keep, else None."""
    if not name.startswith(_ROOT):
        return None
    rel = name[len(_ROOT):]
    keep = any(rel == m or (m.endswith("/") and rel.startswith(m)) or
               (m.endswith(".gguf") and rel.startswith(m)) for m in MEMBERS)
    return rel if keep and "__pycache__" not in rel else None


def source_status() -> str:
    directory = source_dir()
    if not directory.exists():
        return "not materialized"
    problem = hash_list_problem(directory, HASHES_FILE)
    return f"ready at {directory}" if problem is None else f"damaged ({problem})"


def _download_sdist(into: Path) -> Path:
    """The pinned sdist, through pip (its HTTP cache makes repeats free), checked by sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
           ":all:", f"{PACKAGE}=={VERSION}", "-d", str(into)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    path = into / SDIST
    if done.returncode != 0 or not path.exists():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise StorageError(f"cannot download the {PACKAGE}=={VERSION} source from the "
                                 f"package index: {last}")
    if sha256_file(path) != SDIST_SHA256:
        raise DataError(f"{path.name} does not match its pinned sha256; refusing to use it")
    return path


def ensure_source(verbose: bool = True) -> Path:
    """The materialized llama.cpp members (see the module docstring), extracted if needed."""
    target = source_dir()
    if target.exists():
        problem = hash_list_problem(target, HASHES_FILE)
        if problem is None:
            return target
        if verbose:
            print(f"{target} is damaged ({problem}); extracting again", file=sys.stderr)
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        if verbose:
            print(f"extracting llama.cpp {VERSION} members from the {PACKAGE} source (once) ...",
                  file=sys.stderr)
        sdist = _download_sdist(tmp / "download")
        files = {}
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                rel = _wanted(member.name)
                if rel is None or not member.isfile():
                    continue
                member.name = rel
                tar.extract(member, tmp / "tree", filter="data")
                files[rel] = sha256_file(tmp / "tree" / rel)
        for family in VOCABS:
            rel = f"tokenizers/{family}"
            build_tokenizer(tmp / "tree", family, tmp / "tree" / rel)
            files.update({f"{rel}/{p.name}": sha256_file(p)
                          for p in sorted((tmp / "tree" / rel).iterdir())})
        (tmp / "tree" / HASHES_FILE).write_text(json.dumps(
            {"source": SDIST, "source_sha256": SDIST_SHA256, "files": dict(sorted(files.items()))},
            indent=2) + "\n")
        with contextlib.suppress(FileExistsError, OSError):
            os.rename(tmp / "tree", target)   # a concurrent process may have won; as good
        if hash_list_problem(target, HASHES_FILE) is not None:
            raise DataError(f"{target} failed verification after extraction")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_test_vectors(vocab: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenization test vectors of a vocabulary: (text, token ids without BOS)."""
    texts = vocab.with_name(vocab.name + ".inp").read_text(encoding="utf-8")
    texts = texts.removesuffix("\n__ggml_vocab_test__\n").split("\n__ggml_vocab_test__\n")
    ids = vocab.with_name(vocab.name + ".out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in i.split()]) for t, i in zip(texts, ids)]


def build_tokenizer(tree: Path, family: str, out: Path) -> Path:
    """Save ``family``'s tokenizer, built from its GGUF vocabulary, into ``out``.

    transformers' GGUF reader gets three things differently from Meta's published tokenizers,
    which are put right here: Llama 2 prepends "▁" to every text (a leading space stays a token
    of its own); Llama 3 looks a whole pre-token up in the vocabulary before merging
    (``ignore_merges``), starts every text with ``<|begin_of_text|>``, and has no
    ``<|endoftext|>``. Llama 3 gets Meta's Llama 3.1 instruct chat template while its EOS stays
    the base model's ``<|end_of_text|>``: the combination where the end-of-turn token differs.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    vocab = tree / "models" / VOCABS[family]
    tokenizer = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    if family == "llama3":
        tokenizer.chat_template = (tree / LLAMA3_TEMPLATE).read_text(encoding="utf-8")
    tokenizer.save_pretrained(out)
    spec_path = out / "tokenizer.json"
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    if family == "llama2":
        write_sentencepiece_model(vocab, out / "tokenizer.model")
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        spec["pre_tokenizer"] = None
    else:
        bos = tokenizer.bos_token
        size = _gguf_vocab_size(vocab)
        spec["model"]["ignore_merges"] = True
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < size]
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_token_id],
                                     "tokens": [bos]}}}
    spec_path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    rebuilt = AutoTokenizer.from_pretrained(out)
    wrong = [t for t, ids in read_test_vectors(vocab)
             if rebuilt(t, add_special_tokens=False)["input_ids"] != ids]
    if family == "llama2":
        import sentencepiece

        piece_model = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        wrong += [t for t, ids in read_test_vectors(vocab) if piece_model.encode(t) != ids]
    if wrong:
        raise DataError(f"the {family} tokenizer disagrees with llama.cpp's test vectors on "
                        f"{len(wrong)} texts, e.g. {wrong[0]!r}")
    return out


def write_sentencepiece_model(vocab: Path, out: Path) -> Path:
    """Llama 2's ``tokenizer.model`` (a SentencePiece BPE model: pieces, scores and types, byte
    fallback, a "▁" prepended) from its GGUF vocabulary, as Meta ships it beside tokenizer.json;
    llama.cpp's converter reads the scores from it."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as spm

    fields = gguf.GGUFReader(vocab).fields

    def values(name):
        field = fields[name]
        return [field.parts[i] for i in field.data]

    model = spm.ModelProto()
    for token, score, kind in zip(values("tokenizer.ggml.tokens"), values("tokenizer.ggml.scores"),
                                  values("tokenizer.ggml.token_type")):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = bytes(token).decode("utf-8"), float(score[0]), \
            int(kind[0])
    trainer = model.trainer_spec
    trainer.model_type, trainer.vocab_size, trainer.byte_fallback = \
        spm.TrainerSpec.BPE, len(model.pieces), True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    normalizer = model.normalizer_spec
    normalizer.name, normalizer.add_dummy_prefix = "identity", True
    normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, True
    out.write_bytes(model.SerializeToString())
    return out


def _gguf_vocab_size(vocab: Path) -> int:
    import gguf

    return len(gguf.GGUFReader(vocab).fields["tokenizer.ggml.tokens"].data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--status", action="store_true", help="print the copy's state")
    return parser


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        args = build_parser().parse_args(argv)
        print(source_status() if args.status else ensure_source())
        return 0

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
