"""Answer checks for the notebooks' exercises: ``from vlmcourse.exercises import nb03``."""
import torch


def _not_attempted(how: str) -> None:
    print(f"✎ Not attempted yet. {how}")


def _as_float(answer):
    """A number from a float, int or one-element tensor; None if it is not one."""
    if isinstance(answer, torch.Tensor):
        if answer.numel() != 1:
            return None
        answer = answer.item()
    try:
        return float(answer)
    except (TypeError, ValueError):
        return None
