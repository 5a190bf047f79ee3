"""Execute notebooks in place and save them with their outputs, as they are committed.

    python scripts/execute_notebooks.py                                    # all of them, in order
    python scripts/execute_notebooks.py notebooks/04_stage1_losses.ipynb   # some

nbclient's ``coalesce_streams`` keeps only the last state of each text progress bar
(``vlmcourse.utils.progress_bar``) instead of every redraw; nbconvert's command line cannot set it.
"""
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]

for path in [Path(p) for p in sys.argv[1:]] or sorted((ROOT / "notebooks").glob("*.ipynb")):
    start = time.perf_counter()
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=1800, coalesce_streams=True,
                   resources={"metadata": {"path": str(path.resolve().parent)}}).execute()
    nbformat.write(nb, path)
    print(f"{path} executed in {time.perf_counter() - start:.0f} s", flush=True)
