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


def _run_learner(fn, name: str, how: str, *args):
    """The learner's fn(*args); None after saying what to do when fn is None, raises or returns None."""
    if fn is None:
        _not_attempted(how)
        return None
    try:
        got = fn(*args)
    except Exception as error:  # the learner's code: report, don't crash the notebook
        print(f"✗ {name} raised {type(error).__name__}: {error}\n  Hint: {how}")
        return None
    if got is None:
        _not_attempted(how + " Your function returns None so far.")
    return got
