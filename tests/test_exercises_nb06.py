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
