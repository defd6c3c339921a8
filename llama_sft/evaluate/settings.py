"""The evaluation's settings and the checks on them, made before anything is loaded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llama_sft.cli import decoding_problems
from llama_sft.data.records import SPLITS
from llama_sft.errors import UsageError
from llama_sft.evaluate.gates import parse_gates

DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated (one setting per flag)."""

    max_new_tokens: int = 128        # generation limit per answer
    temperature: float = 0.0         # 0 = greedy
    top_p: float = 1.0               # nucleus sampling mass (sampling only)
    num_return_sequences: int = 1    # answers per prompt (sampling only when > 1)
    batch_size: int = 8              # most prompts decoding at once / per loss forward pass
    seed: int = 42                   # torch seed set before each model's pass

    def problems(self) -> list[str]:
        found = decoding_problems(self.max_new_tokens, self.temperature, self.top_p)
        for name in ("num_return_sequences", "batch_size"):
            if getattr(self, name) <= 0:
                found.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.num_return_sequences > 1 and self.temperature == 0:
            found.append("--num-return-sequences > 1 needs sampling: give --temperature > 0")
        return found


def validate_args(args) -> tuple[GenerationSettings, dict[str, float]]:
    """Check every flag before anything is loaded; report all problems in one line."""
    gen = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p,
                             args.num_return_sequences, args.batch_size, args.seed)
    problems = gen.problems()
    gates, gate_problems = parse_gates(args.fail_under)
    problems += gate_problems
    if args.num_samples < 0:
        problems.append(f"--num-samples must be >= 0 (0 = all), got {args.num_samples}")
    if args.max_length is not None and args.max_length <= 0:
        problems.append(f"--max-length must be > 0, got {args.max_length}")
    if args.split is not None and args.split not in SPLITS:
        problems.append(f"--split must be one of {', '.join(SPLITS)}; got {args.split!r}")
    if not Path(args.adapter_path).exists():
        problems.append(f"adapter path {args.adapter_path} does not exist (expected "
                        f"training_output/final_model or a package .tar.gz)")
    if not Path(args.dataset).is_file():
        problems.append(f"dataset file not found: {args.dataset}")
    if Path(args.output).is_dir():
        problems.append(f"--output {args.output} is a directory; give a .json file path")
    if problems:
        raise UsageError("; ".join(problems))
    return gen, gates
