"""Small helpers the whole package uses: seeding, the cache folder, tables, memory, batches, eval mode, and
writing a folder all at once (``atomic_dir``). This file imports nothing else from the package."""
from __future__ import annotations

import functools
import os
import resource
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and every accelerator) so a run can be repeated: transformers' set_seed."""
    from transformers import set_seed       # here: the package imports fast without transformers

    set_seed(seed)


def cache_dir(*parts: str) -> Path:
    """The user cache folder ($VLMCOURSE_CACHE, default ~/.cache/vlmcourse), created on use."""
    root = Path(os.environ.get("VLMCOURSE_CACHE") or Path.home() / ".cache" / "vlmcourse")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 ** 2 if sys.platform == "darwin" else peak / 1024


def show_table(rows, columns=None, digits: int = 3, index: str | None = None):
    """Rows (list of dicts or lists) as a pandas DataFrame with rounded floats: notebooks render it
    as a table, and its text form is stable enough for a checked (NBVAL_CHECK_OUTPUT) cell. ``index``: the
    column that labels the rows; without one the rows are shown without pandas' 0, 1, 2, ... labels."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=columns).round(digits)
    return frame.set_index(index) if index else _unlabelled_class()(frame)


@functools.cache
def _unlabelled_class():
    import pandas as pd     # here, not at the top: the package imports fast without pandas

    class Unlabelled(pd.DataFrame):
        """A DataFrame shown without its row numbers; anything computed from it is a plain DataFrame."""

        @property
        def _constructor(self):
            return pd.DataFrame

        def __repr__(self) -> str:
            return self.to_string(index=False)

        def _repr_html_(self) -> str:
            return self.to_html(index=False, notebook=True)

    return Unlabelled


def release_memory(collect: bool = True) -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, and a notebook that
    trains a few models in a row would show the peak of all of them). ``collect=False`` skips the garbage
    collection, which takes about 0.2 s once transformers is imported: a training loop frees its tensors by
    reference counting and only needs the heap trimmed."""
    import ctypes
    import gc

    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc (macOS, Windows, musl): nothing to do
        pass


def notebook_figures(dpi: int = 80) -> None:
    """The notebooks' figure style: readable fonts on a projector, and inline figures as JPEG, because most of
    them show photos, which PNG stores at ten times the size (and notebooks are committed with their outputs)."""
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 13, "axes.titlesize": 14, "figure.dpi": dpi})
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:          # not in Jupyter: nothing to set
        return
    shell = get_ipython()
    if shell is not None and "matplotlib_inline" not in plt.get_backend():
        # e.g. MPLBACKEND=Agg in CI would leave plt.show() silent and the saved notebook without figures
        shell.run_line_magic("matplotlib", "inline")
    set_matplotlib_formats("jpeg")


def in_jupyter_kernel() -> bool:
    """True inside a Jupyter kernel (notebook, Colab, nbconvert, nbval); False in plain Python and a terminal."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def progress_bar(iterable=None, **kwargs):
    """A text progress bar (tqdm's plain one, not its Jupyter widget). In a notebook it goes to stdout, updates in
    place, and a notebook saved after execution keeps its last line, where a widget bar would be stored as an
    empty "0/100" (execute with ``coalesce_streams``: scripts/execute_notebooks.py). Elsewhere it goes to stderr,
    so that a command's printed results stay clean."""
    from tqdm.std import tqdm

    if in_jupyter_kernel():
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("ncols", 90)     # a kernel has no terminal to measure
    kwargs.setdefault("mininterval", 1.0)
    return tqdm(iterable, **kwargs)


def in_batches(fn, *inputs, batch_size: int, progress: bool = False, desc: str | None = None):
    """``fn`` applied to consecutive chunks of ``batch_size`` rows of every input (tensors or lists, all as long as
    the first), and the results put back together: ``torch.cat`` for tensors, one list for lists."""
    starts = range(0, len(inputs[0]), batch_size)
    if progress:
        starts = progress_bar(starts, desc=desc, leave=False)
    outs = [fn(*(x[i:i + batch_size] for x in inputs)) for i in starts]
    return torch.cat(outs) if outs and isinstance(outs[0], torch.Tensor) else [y for out in outs for y in out]


@contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Put ``modules`` in eval mode (no dropout) for a ``with`` block, then back in the mode each had."""
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)


@contextmanager
def atomic_dir(path):
    """Write a folder all at once: the ``with`` block fills the sibling folder it yields, which then takes
    ``path``'s place by a rename. A folder already at ``path`` is moved aside first and deleted only once the new
    one is in place, so an interrupted run never leaves half a folder and never loses the old one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    for leftover in (tmp, old):            # from an earlier run of this process id that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        had_folder = path.exists()
        if had_folder:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if had_folder:
                os.replace(old, path)      # the new one did not make it: put the old one back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
