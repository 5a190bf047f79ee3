"""The answer checks of notebook 06 accept right answers (derived from peft and the bridge, not typed in),
explain wrong ones, and tell a learner who has not started what to do."""
import torch

from vlmcourse.exercises import nb06


def out(capsys):
    return capsys.readouterr().out


def test_lora_param_count_matches_peft(capsys):
    from peft import LoraConfig, inject_adapter_in_model

    layer = torch.nn.Sequential()
    layer.add_module("k_proj", torch.nn.Linear(576, 192, bias=False))
    inject_adapter_in_model(LoraConfig(r=16, target_modules=["k_proj"]), layer)
    n = sum(p.numel() for name, p in layer.named_parameters() if "lora_" in name)
    nb06.check_lora_params(n)
    assert out(capsys).startswith("✓")
    nb06.check_lora_params(576 * 192)
    assert "two thin matrices" in out(capsys)
    nb06.check_lora_params(None)
    assert out(capsys).startswith("✎")


def test_failure_modes_match_the_bridge_layouts(capsys):
    """'a' deletes every EOS label and 'b' labels EOS right after the prompt: read off the bridge's own labels."""
    from vlmcourse.backbones import load_llm
    from vlmcourse.stage2 import BridgeConfig, PrecomputedConnector, SoftPromptCaptioner

    llm = load_llm("tiny")
    captions = ["a dog runs", "two dogs run on the wet sand"]
    def labels(padding):
        m = SoftPromptCaptioner(PrecomputedConnector(2, 8), 8, llm, BridgeConfig(padding=padding))
        return m, m.build_inputs(torch.zeros(2, 2, 8), captions)[2]
    m, by_id = labels("mask_by_pad_id")
    assert (by_id == m.eos_id).sum() == 0                                  # 'a': never an EOS to learn
    m, left = labels("left_unmasked")
    first = 2 + len(m.prompt_ids)
    assert left[0, first] == m.eos_id                                     # 'b': EOS right after the prompt
    nb06.check_failure_mode({"empty": "b", "never stops": "a"})
    assert out(capsys).startswith("✓")
    nb06.check_failure_mode({"empty": "a", "never stops": "b"})
    assert out(capsys).startswith("✗")
    nb06.check_failure_mode({"empty": "c", "never stops": "a"})
    assert "fix" in out(capsys)


def test_lora_scale_matches_peft(capsys):
    from peft import LoraConfig, inject_adapter_in_model

    layer = torch.nn.Sequential()
    layer.add_module("q_proj", torch.nn.Linear(8, 8))
    inject_adapter_in_model(LoraConfig(r=64, lora_alpha=32, target_modules=["q_proj"]), layer)
    nb06.check_lora_scale(layer.q_proj.scaling["default"])
    assert out(capsys).startswith("✓")
    nb06.check_lora_scale(2.0)
    assert "divided" in out(capsys)


def make_lora_linear(scale="alpha/r", zero_b=True, freeze=True, add_base=True, bias=False, transpose=False):
    """A learner's MyLoRALinear with switchable mistakes; all defaults = right."""
    class MyLoRALinear(torch.nn.Module):
        def __init__(self, base, r, alpha):
            super().__init__()
            self.base = base.requires_grad_(not freeze)
            d_in, d_out = base.in_features, base.out_features
            self.lora_A = torch.nn.Linear(d_in, r, bias=bias) if not transpose else torch.nn.Linear(r, d_in, bias=False)
            self.lora_B = torch.nn.Linear(r, d_out, bias=bias)
            if zero_b:
                torch.nn.init.zeros_(self.lora_B.weight)
            self.scale = {"alpha/r": alpha / r, "r/alpha": r / alpha, "none": 1.0}[scale]

        def forward(self, x):
            update = self.scale * self.lora_B(self.lora_A(x))
            return self.base(x) + update if add_base else update
    return MyLoRALinear


def test_lora_linear_check_against_peft(capsys):
    nb06.check_lora_linear(make_lora_linear())
    assert out(capsys).startswith("✓")
    cases = [(make_lora_linear(scale="none"), "not scaled"), (make_lora_linear(scale="r/alpha"), "not r / alpha"),
             (make_lora_linear(zero_b=False), "B starts at zero"), (make_lora_linear(freeze=False), "freeze"),
             (make_lora_linear(add_base=False), "output is missing"), (make_lora_linear(bias=True), "no bias"),
             (make_lora_linear(transpose=True), "should be (4, 12)")]
    for cls, phrase in cases:
        nb06.check_lora_linear(cls)
        text = out(capsys)
        assert text.startswith("✗") and phrase in text, (phrase, text)
    nb06.check_lora_linear(None)
    assert out(capsys).startswith("✎")

    class Unfinished(torch.nn.Module):
        def __init__(self, base, r, alpha):
            super().__init__()
            self.base, self.lora_A, self.lora_B = base.requires_grad_(False), torch.nn.Linear(12, r, bias=False), \
                torch.nn.Linear(r, 6, bias=False)

        def forward(self, x):
            return None
    nb06.check_lora_linear(Unfinished)
    assert "returns None" in out(capsys)

    class Broken(torch.nn.Module):
        def __init__(self, base, r, alpha):
            raise NotImplementedError("todo")
    nb06.check_lora_linear(Broken)
    assert "NotImplementedError" in out(capsys)


def test_lora_linear_not_started(capsys):
    """The notebook's starting cell: a class with no lora_A / lora_B yet says how to begin."""
    class MyLoRALinear(torch.nn.Module):
        def __init__(self, base, r, alpha):
            super().__init__()
            self.base = base

        def forward(self, x):
            return None
    nb06.check_lora_linear(MyLoRALinear)
    assert out(capsys).startswith("✎")
