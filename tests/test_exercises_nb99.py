"""The wrap-up's answer check accepts the right prefix and names the usual mistakes."""
import pytest
import torch

from vlmcourse.backbones import load_llm
from vlmcourse.connectors import PrecomputedConnector
from vlmcourse.exercises import nb99
from vlmcourse.stage2 import SoftPromptCaptioner


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SoftPromptCaptioner(PrecomputedConnector(3, 8), 8, load_llm("tiny")).eval()


def right(model, x):
    soft = model.proj(model.connector(x))
    prompt = model.llm_model.get_input_embeddings()(model.prompt_ids).expand(len(x), -1, -1)
    return torch.cat([soft, prompt], dim=1)


@pytest.mark.parametrize("answer, says", [
    (right, "✓ Right"),
    (None, "Not attempted"),
    (lambda m, x: right(m, x).flip(0)[:, :0], "Expected shape"),
    (lambda m, x: m.proj(m.connector(x)), "soft prompts alone"),
    (lambda m, x: torch.cat([m.connector(x), torch.zeros(len(x), len(m.prompt_ids), 8)], 1), "project them"),
    (lambda m, x: torch.cat([right(m, x)[:, 3:], right(m, x)[:, :3]], 1), "wrong order"),
    (lambda m, x: torch.cat([torch.zeros_like(right(m, x)[:, :3]), right(m, x)[:, 3:]], 1), "soft prompts are not"),
    (lambda m, x: 1 / 0, "raised ZeroDivisionError"),
])
def test_check_prefix(model, capsys, answer, says):
    nb99.check_prefix(answer, model, torch.randn(2, 3, 8))
    assert says in capsys.readouterr().out
