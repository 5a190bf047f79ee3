"""Answer checks for notebook 06 (LoRA captioning, metrics, the "only EOS" failure).

Each check prints a ✓ or a ✗ with a hint, never raises on a wrong answer, and
tells you how to start when your answer is still ``None``; all return None.
"""
from __future__ import annotations

from vlmcourse.exercises import _as_float, _not_attempted

__all__ = ["check_lora_params", "check_failure_mode", "check_lora_scale"]


# ----------------------------------------------------------------------------- exercise 1
def lora_params(d_in: int, d_out: int, r: int) -> int:
    """LoRA on a Linear(d_in, d_out): A is (r, d_in), B is (d_out, r); no bias."""
    return r * d_in + d_out * r


def check_lora_params(answer, d_in: int = 576, d_out: int = 192, r: int = 16) -> None:
    """Exercise 1: trainable LoRA weights on one ``k_proj`` of SmolLM2 (Linear(576, 192)) at rank 16."""
    if answer is None:
        _not_attempted(f"Replace None with a number: LoRA adds B @ A to a Linear({d_in}, {d_out}), with A of shape "
                       f"(r, {d_in}) and B of shape ({d_out}, r), r = {r}.")
        return
    value, want = _as_float(answer), lora_params(d_in, d_out, r)
    if value is None:
        print("✗ Answer with a number.")
        return
    if value == want:
        print(f"✓ Correct! {r}·{d_in} + {d_out}·{r} = {want:,}, against {d_in * d_out:,} weights in the layer itself "
              f"({100 * want / (d_in * d_out):.0f}%): the saving grows with the layer's size.")
        return
    hints = {d_in * d_out: "that is the layer's own weight count; LoRA trains two thin matrices instead.",
             2 * r * d_in: f"B has shape ({d_out}, r), not ({d_in}, r): k_proj's output is {d_out}-d (3 KV heads).",
             2 * r * d_out: f"A has shape (r, {d_in}): it reads the {d_in}-d input.",
             r * (d_in + d_out) + d_out: "LoRA's A and B have no bias."}
    print(f"✗ {answer!r} is not right. Hint: {hints.get(int(value), 'count the entries of A and of B and add them.')}")


# ----------------------------------------------------------------------------- exercise 2
FAILURES = {
    "a": "labels set to -100 wherever the input id is the pad id (pad = EOS), padding on the right",
    "b": "padding on the left, and the pad positions keep their labels",
    "c": "padding on the right, masked by position, exactly one EOS labelled per caption",
}
SYMPTOMS = {"empty": "almost every caption is empty: P(EOS) at the first step is close to 1",
            "never stops": "captions run on to the length limit: the model never says EOS"}


def check_failure_mode(answer) -> None:
    """Exercise 2: which recipe gives which symptom? A dict {"empty": letter, "never stops": letter}."""
    options = "\n".join(f"  {k}) {v}" for k, v in FAILURES.items())
    if answer is None:
        _not_attempted(f'Replace None with a dict {{"empty": letter, "never stops": letter}} choosing among:\n{options}')
        return
    if not isinstance(answer, dict) or set(answer) != set(SYMPTOMS):
        print('✗ Answer with a dict with exactly the keys "empty" and "never stops", e.g. {"empty": "a", ...}.')
        return
    got = {k: str(v).strip().lower().rstrip(")") for k, v in answer.items()}
    want = {"empty": "b", "never stops": "a"}
    if got == want:
        print("✓ Correct! Masking by pad id deletes the real EOS too, so no caption ever ends in training; "
              "labelled left padding puts EOS right after the prompt in every row, so the model learns to end at once.")
        return
    if "c" in got.values():
        print("✗ (c) is the fix: it gives neither symptom.")
        return
    print("✗ Not quite. Hint: ask, for each recipe, where EOS appears among the *labels*: nowhere, or right "
          "after the prompt?")


# ----------------------------------------------------------------------------- exercise 3
def check_lora_scale(answer, lora_alpha: int = 32, r: int = 64) -> None:
    """Exercise 3: the factor LoRA multiplies B @ A by, with ``lora_alpha`` = 32 and rank ``r`` = 64."""
    if answer is None:
        _not_attempted(f"Replace None with a number: peft scales the update B @ A by lora_alpha / r "
                       f"(here {lora_alpha} and {r}).")
        return
    value = _as_float(answer)
    if value is None:
        print("✗ Answer with a number.")
        return
    want = lora_alpha / r
    if abs(value - want) < 1e-9:
        print(f"✓ Correct! {lora_alpha} / {r} = {want}. Raising r without raising alpha shrinks each direction's "
              f"update; that is why alpha is usually set relative to r (here the course uses alpha = 2r).")
        return
    hint = "it is alpha divided by r, not r divided by alpha." if abs(value - r / lora_alpha) < 1e-9 else \
        "the scale is lora_alpha / r."
    print(f"✗ {answer!r} is not right. Hint: {hint}")
