"""How a prompt is built from instruction + context: the chat template, or a plain template.

Saved as ``prompt_format.json`` beside every adapter, so whatever loads it formats prompts exactly
as training did.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from llama_sft.errors import DataError, UsageError

PROMPT_FORMAT_FILE = "prompt_format.json"
STYLES = ("chat_template", "instruction", "llama2")
PROMPT_STYLES = ("auto",) + STYLES       # what a user may ask for; auto picks one of STYLES
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_CONTEXT_TEMPLATE = ("### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n"
                                "### Response:\n")
# Meta's Llama 2 chat format: the prompt ends at [/INST]; the answer follows after one space
# (``response_prefix``), so SentencePiece tokenizes its first word as "▁word" in training and in
# generation alike.
LLAMA2_TEMPLATE = "[INST] {user} [/INST]"
LLAMA2_SYSTEM_TEMPLATE = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
_SENTINEL = "\ue000"                     # a private-use character no template mentions
_TEMPLATE_PROBES = ("x", "  padded both ends \n", "line one\n\nline two\n\n",
                    "{{ braces }} {% tag %} [INST] <|im_end|> </s> <s>", "naïve — 日本語 ✓")


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt is built from instruction + context; saved as ``prompt_format.json``."""

    style: str                          # chat_template | instruction | llama2
    chat_template: str | None = None    # the Jinja template, for style chat_template
    system_prompt: str | None = None    # optional system message

    def __post_init__(self):
        if self.style not in STYLES:
            raise UsageError(f"unknown prompt style {self.style!r}")
        if self.style == "chat_template" and not self.chat_template:
            raise UsageError("prompt style chat_template needs a chat template")

    @property
    def adds_special_tokens(self) -> bool:
        """Whether the tokenizer should add BOS itself (the chat template writes its own)."""
        return self.style != "chat_template"

    @classmethod
    def for_tokenizer(cls, tokenizer, style: str = "auto", system_prompt: str | None = None):
        """The chat template when the tokenizer has one, else the instruction template."""
        template = getattr(tokenizer, "chat_template", None)
        if style == "auto":
            style = "chat_template" if template else "instruction"
        return cls(style=style, chat_template=template if style == "chat_template" else None,
                   system_prompt=system_prompt)

    @property
    def response_prefix(self) -> str:
        """The text between the prompt and the response in a training example."""
        return " " if self.style == "llama2" else ""

    def terminator_id(self, tokenizer) -> int:
        """The token that ends an answer: the chat template's end-of-turn token where the template
        writes a special token right after the assistant's message (``<|eot_id|>`` in Llama 3's,
        ``<|im_end|>`` in ChatML), else EOS.

        A Llama 3 base model's EOS is ``<|end_of_text|>`` while its instruct template ends every
        turn with ``<|eot_id|>``: supervising EOS there would teach the model to stop off-template.
        """
        cached = self.__dict__.get("_terminator")
        if cached is not None and cached[0] is tokenizer:
            return cached[1]
        terminator = tokenizer.eos_token_id
        if self.style == "chat_template":
            terminator = self._template_terminator(tokenizer) or terminator
        self.__dict__["_terminator"] = (tokenizer, terminator)   # a cache, not a field
        return terminator

    def stop_ids(self, tokenizer) -> tuple[int, ...]:
        """The tokens that end generation: the terminator, and EOS where it differs."""
        ids = (self.terminator_id(tokenizer), tokenizer.eos_token_id)
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def _template_terminator(self, tokenizer) -> int | None:
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            rendered = tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                     tokenize=False)
        except Exception:             # a template that renders no assistant turns: EOS then
            return None
        if rendered.count(_SENTINEL) != 1:
            return None
        after = rendered.split(_SENTINEL)[1]
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        special |= set(tokenizer.all_special_ids)
        for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
            if token in special:
                return token
            if tokenizer.decode([token]).strip():
                return None           # text before any special token: no end-of-turn token
        return None

    def user_message(self, instruction: str, context: str = "") -> str:
        return f"{instruction}\n\n{context}" if context else instruction

    def render(self, tokenizer, instruction: str, context: str = "") -> str:
        """The prompt text up to where the response starts."""
        if self.style == "instruction":
            template = INSTRUCTION_CONTEXT_TEMPLATE if context else INSTRUCTION_TEMPLATE
            return template.format(instruction=instruction, context=context)
        user = self.user_message(instruction, context)
        if self.style == "llama2":
            if self.system_prompt:
                return LLAMA2_SYSTEM_TEMPLATE.format(system=self.system_prompt, user=user)
            return LLAMA2_TEMPLATE.format(user=user)
        split = self._template_split(tokenizer)
        return split[0] + user + split[1] if split else self._apply_template(tokenizer, user)

    def _apply_template(self, tokenizer, user: str) -> str:
        return self.apply_messages(tokenizer, [{"role": "user", "content": user}],
                                   add_generation_prompt=True)

    def apply_messages(self, tokenizer, messages: list[dict[str, str]],
                       add_generation_prompt: bool = False) -> str:
        """The chat template rendered on ``messages`` (the system prompt first, when one is set
        and the messages have none)."""
        if self.system_prompt and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                             tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    def render_record(self, tokenizer, record: dict) -> str:
        """The prompt text of a record: for a conversation, its history before the last answer."""
        if record.get("messages"):
            from llama_sft.data.conversation import history_prompt

            return history_prompt(tokenizer, self, record["messages"])
        return self.render(tokenizer, record["instruction"], record.get("context") or "")

    def encode_record_prompt(self, tokenizer, record: dict) -> list[int]:
        """The prompt ids generation gets for a record (``render_record``, tokenized)."""
        if record.get("messages"):
            text = self.render_record(tokenizer, record)
            return list(tokenizer(text, add_special_tokens=self.adds_special_tokens)
                        ["input_ids"])
        return self.encode_prompt(tokenizer, record["instruction"], record.get("context") or "")

    def _template_split(self, tokenizer) -> tuple[str, str] | None:
        """(text before, text after) the user message, when the chat template inserts the message
        verbatim; None when it edits or inspects it (then every prompt is rendered in full).

        Rendering the Jinja template for every record was a third of prep's tokenize phase; the
        split is checked on probe messages (whitespace at the ends, blank lines, template syntax,
        special-token text, non-ASCII) before it is trusted.
        """
        cached = self.__dict__.get("_split")
        if cached is not None and cached[0] is tokenizer:
            return cached[1]
        rendered = self._apply_template(tokenizer, _SENTINEL)
        split = None
        if rendered.count(_SENTINEL) == 1:
            before, after = rendered.split(_SENTINEL)
            if all(self._apply_template(tokenizer, probe) == before + probe + after
                   for probe in _TEMPLATE_PROBES):
                split = (before, after)
        self.__dict__["_split"] = (tokenizer, split)      # a cache, not a field: not saved
        return split

    def encode_prompt(self, tokenizer, instruction: str, context: str = "") -> list[int]:
        text = self.render(tokenizer, instruction, context)
        return list(tokenizer(text, add_special_tokens=self.adds_special_tokens)["input_ids"])

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / PROMPT_FORMAT_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PromptFormat":
        path = Path(directory) / PROMPT_FORMAT_FILE
        if not path.exists():
            raise UsageError(f"{directory} has no {PROMPT_FORMAT_FILE}; it is not a directory "
                             f"written by llama_train.py")
        data = json.loads(path.read_text(encoding="utf-8"))
        unknown = set(data) - {"style", "chat_template", "system_prompt"}
        if unknown:
            raise DataError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**data)
