"""Answer checks for notebook 06 (LoRA captioning, metrics, the "only EOS" failure).

Each check prints a ✓ or a ✗ with a hint, never raises on a wrong answer, and
tells you how to start when your answer is still ``None``; all return None.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from vlmcourse.exercises import _as_float, _not_attempted, _run_learner

__all__ = ["check_lora_params", "check_failure_mode", "check_lora_scale", "check_lora_linear"]


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


# ----------------------------------------------------------------------------- exercise 3 (code)
def _peft_reference(base: nn.Linear, r: int, alpha: float, lora_A: torch.Tensor, lora_B: torch.Tensor) -> nn.Module:
    """peft's own LoRA layer around a copy of ``base``, with the given A and B."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Sequential()
    holder.add_module("proj", copy.deepcopy(base))
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"]), holder)
    with torch.no_grad():
        holder.proj.lora_A["default"].weight.copy_(lora_A)
        holder.proj.lora_B["default"].weight.copy_(lora_B)
    return holder.proj


def check_lora_linear(cls, d_in: int = 12, d_out: int = 6, r: int = 4, alpha: float = 8.0) -> None:
    """Exercise 3 (code): the learner's ``MyLoRALinear(base, r, alpha)`` against peft's LoRA layer.

    Checked: ``lora_A`` (d_in -> r) and ``lora_B`` (r -> d_out) are bias-free ``nn.Linear`` layers, only they
    train, the layer starts as an exact copy of ``base`` (B = 0), and with any A and B its output equals peft's.
    """
    how = ("Fill in MyLoRALinear: in __init__ freeze base (requires_grad_(False)), make self.lora_A = "
           "nn.Linear(d_in, r, bias=False) and self.lora_B = nn.Linear(r, d_out, bias=False) with lora_B's weight "
           "set to zero, and keep the scale alpha / r; forward(x) returns base(x) + scale * lora_B(lora_A(x)).")
    if cls is None:
        _not_attempted(how)
        return
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    layer = _run_learner(lambda: cls(copy.deepcopy(base), r, alpha), "MyLoRALinear(base, r, alpha)", how)
    if layer is None:
        return
    A, B = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if A is None and B is None:
        _not_attempted(how + " Your layer has no lora_A and lora_B yet.")
        return
    if not isinstance(A, nn.Linear) or not isinstance(B, nn.Linear):
        print(f"✗ Expected self.lora_A and self.lora_B to be nn.Linear layers (peft's names), got "
              f"{type(A).__name__} and {type(B).__name__}.\n  Hint: {how}")
        return
    if A.bias is not None or B.bias is not None:
        print("✗ LoRA's A and B have no bias: nn.Linear(..., bias=False). The frozen layer keeps its own bias.")
        return
    if tuple(A.weight.shape) != (r, d_in) or tuple(B.weight.shape) != (d_out, r):
        print(f"✗ lora_A.weight is {tuple(A.weight.shape)} and lora_B.weight {tuple(B.weight.shape)}; on a "
              f"Linear({d_in}, {d_out}) at r = {r} they should be ({r}, {d_in}) and ({d_out}, {r}). Hint: A reads "
              f"the {d_in}-d input down to r numbers, B writes them back up to {d_out}.")
        return
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    if trainable != {"lora_A.weight", "lora_B.weight"}:
        print(f"✗ The trainable parameters are {sorted(trainable)}; LoRA trains only lora_A.weight and "
              f"lora_B.weight. Hint: freeze the base layer (base.requires_grad_(False)).")
        return
    x = torch.randn(2, 3, d_in)                  # (batch, tokens, features), as the LLM calls it
    at_init = _run_learner(lambda: layer(x), "MyLoRALinear.forward", how)
    if at_init is None:
        return
    if not isinstance(at_init, torch.Tensor) or at_init.shape != (2, 3, d_out):
        print(f"✗ forward on a (2, 3, {d_in}) input should return a (2, 3, {d_out}) tensor, got "
              f"{tuple(at_init.shape) if isinstance(at_init, torch.Tensor) else type(at_init).__name__}.")
        return
    with torch.no_grad():
        if torch.allclose(at_init, torch.zeros_like(at_init), atol=1e-6):
            print("✗ Before training your layer returns zeros: the frozen layer's output is missing. LoRA *adds* "
                  "its update to base(x).")
            return
        if not torch.allclose(at_init, base(x), atol=1e-6):
            print("✗ Before training the layer should compute exactly what the frozen one does. Hint: B starts at "
                  "zero (nn.init.zeros_(self.lora_B.weight)), so B @ A = 0; A stays random.")
            return
        A.weight.copy_(torch.randn(r, d_in))     # as if trained: now B @ A is not zero
        B.weight.copy_(torch.randn(d_out, r))
        got = layer(x)
        want = _peft_reference(base, r, alpha, A.weight, B.weight)(x)
        if torch.allclose(got, want, atol=1e-5):
            print(f"✓ MyLoRALinear matches peft's LoRA layer: base(x) + (alpha / r)·B(A(x)), {r * (d_in + d_out)} "
                  f"trainable weights beside the {d_in * d_out + d_out} frozen ones, and an exact copy of the "
                  f"frozen layer before training. peft wraps every q_proj, k_proj, v_proj and o_proj of the LLM "
                  f"in exactly this.")
            return
        update = B(A(x))
        for scale, hint in ((1.0, "the update is not scaled: multiply B(A(x)) by alpha / r."),
                            (r / alpha, "the scale is alpha / r, not r / alpha."),
                            (alpha, "the scale is alpha / r, not alpha.")):
            if torch.allclose(got, base(x) + scale * update, atol=1e-5):
                print(f"✗ {hint}")
                return
    print(f"✗ With A and B set to random values your layer differs from peft's (largest difference "
          f"{(got - want).abs().max().item():.3g}).\n  Hint: {how}")
