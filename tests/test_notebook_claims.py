"""Markdown may only quote numbers that a re-run checks (issue 20).

Every number in a converted notebook's markdown must appear in one of that notebook's saved outputs or code cells
(a setting, a shape), so prose cannot copy one run's result that a re-run would contradict: results belong in
tables, figures and the ``assert`` next to them. Exempt:
- numbers from a source outside the run: list them in an HTML comment in the same cell,
  ``<!-- sources: 188 (BLIP-2 paper, Table 1); 400 (CLIP paper) -->`` (every number in the comment is exempt);
- structure: integers up to 12 (section numbers, "3 masks", "2 directions"), years (1900-2099), headings,
  inline code, code blocks, LaTeX and links.
A markdown number matches an output number when the output, rounded to the markdown's decimals, equals it
("46.1" quotes 46.14; "82M" quotes 81,564,221 or a table's 81.56 in millions). Notebooks join CONVERTED once their
claims are assertions; all seven have.
"""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CONVERTED = ["01_vit_patches", "02_clip_contrastive", "03_qformer_masks", "04_stage1_losses", "05_stage2_soft_prompts",
             "06_lora_captioning", "07_attention_maps", "08_beyond_blip2", "99_wrap_up"]

NUMBER = re.compile(r"(?<![\w.\-/^])\d+(?:,\d{3})+(?:\.\d+)?(?![\w])|(?<![\w.\-/^])\d+(?:\.\d+)?")
SOURCES = re.compile(r"<!--\s*sources:(.*?)-->", re.S)
SKIP = [re.compile(p) for p in (r"(?s)```.*?```", r"(?s)<!--.*?-->", r"(?s)\$\$.*?\$\$", r"\$[^$\n]+\$", r"`[^`\n]*`",
                                  r"\]\([^)]*\)", r"https?://\S+", r"(?m)^#+ [^\n]*$")]


def numbers(text: str) -> list[str]:
    return [m.replace(",", "") for m in NUMBER.findall(text)]


def quoted_numbers(text: str) -> list[tuple[str, float]]:
    """(number, scale): "188M" and "26 M" are 188 and 26 millions."""
    return [(m.group().replace(",", ""), 1e6 if re.match(r" ?M(?![A-Za-z])", text[m.end():]) else 1.0)
            for m in NUMBER.finditer(text)]


def prose_numbers(markdown: str) -> tuple[list[tuple[str, float]], set[str]]:
    """The numbers the prose quotes, and those its sources comment exempts."""
    exempt = {n for comment in SOURCES.findall(markdown) for n in numbers(comment)}
    for pattern in SKIP:
        markdown = pattern.sub(" ", markdown)
    return quoted_numbers(markdown), exempt


def output_text(cell: dict) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append("".join(output.get("text", "")))
        for mime, data in output.get("data", {}).items():
            if mime.startswith("text/"):
                parts.append("".join(data))
    return "\n".join(parts)


def unsupported(notebook: dict) -> list[tuple[int, str]]:
    """(cell index, number) for each markdown number that no output or code cell of the notebook holds."""
    known = set()
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            known.update(float(n) for n in numbers(output_text(cell) + "\n" + "".join(cell["source"])))
    missing = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        quoted, exempt = prose_numbers("".join(cell["source"]))
        for n, scale in quoted:
            value = float(n)
            decimals = len(n.split(".")[1]) if "." in n else 0
            if (n in exempt or (decimals == 0 and scale == 1 and (value <= 12 or 1900 <= value <= 2099))
                    or any(value in (round(k / scale, decimals), round(k, decimals)) for k in known)):
                continue
            missing.append((index, n))
    return missing


def test_scanner_on_a_small_notebook():
    def md(text):
        return {"cell_type": "markdown", "source": [text]}

    code = {"cell_type": "code", "source": ["x = 224"],
            "outputs": [{"output_type": "stream", "text": ["recall 46.14 %, 3,371,008 parameters\n"]}]}
    nb = {"cells": [code, md("Recall 46.1 % of 224 px; 3,371,008 weights; 3 masks; in 2023."),
                    md("Recall 47 % (one run)."), md("The paper's 188M <!-- sources: 188 (BLIP-2 paper) -->"),
                    md("3.4M parameters, about 3 M of them frozen; 46M; 4M"),
                    md("## 13 · heading\n`x = 999` and $e^{99}$, ViT-B/16, BLIP-2, [a](https://x.org/777)")]}
    assert unsupported(nb) == [(2, "47"), (4, "4")]  # 46M: a table in millions may hold 46.14


@pytest.mark.parametrize("name", CONVERTED)
def test_markdown_numbers_come_from_outputs(name):
    notebook = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))
    missing = unsupported(notebook)
    assert not missing, (
        f"{name}.ipynb: markdown quotes numbers that no output or code cell of the notebook holds "
        f"(cite the table or figure instead, assert the claim in code, or list a source in "
        f"<!-- sources: ... -->): " + ", ".join(f"cell {i}: {n}" for i, n in missing))
