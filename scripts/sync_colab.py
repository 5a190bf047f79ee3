"""Write the repository of vlmcourse/colab.py (REPO) into notebooks: each one's setup cell (the cell that starts
with "# Colab only") becomes colab.SETUP_CELL and its "Open in Colab" badge points at REPO. Only those cells'
source changes; outputs and every other cell stay as they are.

    python scripts/sync_colab.py                       # every notebook in notebooks/
    python scripts/sync_colab.py notebooks/01_vit_patches.ipynb ...
    python scripts/sync_colab.py --check               # exit 1 and list the notebooks that differ
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmcourse.colab import COLAB_BADGE_PREFIX, SETUP_CELL, colab_url  # noqa: E402

SETUP_MARK = "# Colab only"
BADGE = re.compile(re.escape(COLAB_BADGE_PREFIX) + r"[^)\s]*?/notebooks/[^)\s]+\.ipynb")


def as_source(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def synced(nb: dict, name: str) -> dict:
    for cell in nb["cells"]:
        text = "".join(cell["source"])
        if cell["cell_type"] == "code" and text.startswith(SETUP_MARK):
            cell["source"] = as_source(SETUP_CELL)
        elif cell["cell_type"] == "markdown" and BADGE.search(text):
            cell["source"] = as_source(BADGE.sub(colab_url(name), text))
    return nb


def main(argv: list[str]) -> int:
    check = "--check" in argv
    root = Path(__file__).resolve().parents[1]
    paths = [Path(a) for a in argv if a != "--check"] or sorted(root.glob("notebooks/*.ipynb"))
    stale = []
    for path in paths:
        raw = path.read_text(encoding="utf-8")
        nb = json.loads(raw)
        before = json.dumps(nb, sort_keys=True)
        nb = synced(nb, path.name)
        if json.dumps(nb, sort_keys=True) == before:
            continue
        stale.append(path)
        if not check:
            indent = 1 if raw.startswith('{\n "') else 2
            path.write_text(json.dumps(nb, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    for path in stale:
        print(f"{'differs' if check else 'synced'}: {path}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
