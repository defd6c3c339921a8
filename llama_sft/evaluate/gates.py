"""``--fail-under`` gates: which metrics can gate a run, and how they are checked."""
from __future__ import annotations

from typing import Any, Sequence

# Metrics --fail-under accepts: higher is better for all of them.
GATE_METRICS = ("exact_match", "exact_match_strict", "token_f1", "rouge_l", "bleu", "chrf",
                "json_valid", "json_field_accuracy", "stop_rate")


def parse_gates(specs: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """``["exact_match=0.5", ...]`` -> ({metric: threshold}, problems)."""
    gates, problems = {}, []
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not sep or name not in GATE_METRICS:
            problems.append(f"--fail-under {spec!r}: expected METRIC=VALUE with METRIC one of "
                            f"{', '.join(GATE_METRICS)}")
            continue
        try:
            gates[name] = float(value)
        except ValueError:
            problems.append(f"--fail-under {spec!r}: {value!r} is not a number")
    return gates, problems


def check_gates(gates: dict[str, float], finetuned: dict, base: dict | None) -> dict[str, Any]:
    """Each gated metric must reach its threshold and, with a base result, not be under it."""
    checks = []
    for metric, threshold in gates.items():
        value = finetuned.get(metric)
        base_value = base.get(metric) if base is not None else None
        reasons = []
        if value is None:
            reasons.append(f"{metric} was not computed (no JSON references in the evaluated set)")
        else:
            if value < threshold:
                reasons.append(f"{metric} {value:.4g} < {threshold:g}")
            if base_value is not None and value < base_value:
                reasons.append(f"{metric} {value:.4g} is under the base model's {base_value:.4g}")
        checks.append({"metric": metric, "threshold": threshold, "value": value,
                       "base": base_value, "passed": not reasons, "reasons": reasons})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}
