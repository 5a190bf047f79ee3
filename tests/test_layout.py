"""The package's layout (CONTRIBUTING.md, "Layout"): imports go down the layers, never up; models draw no figures."""
import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlmcourse"
# Bottom to top, as CONTRIBUTING.md draws it. A module may import modules of its own layer or below, never above.
LAYERS = [
    {"utils", "profiles", "metrics", "distributed", "data", "shapes", "instruct"},
    {"backbones", "features"},
    {"patches", "vit", "clip", "masks", "qformer_inputs", "qformer", "adapter", "reference", "losses", "train", "stage1", "connectors",
     "generation", "stage2", "flamingo", "llava", "instructblip", "vqa", "probe"},
    {"recipes"},
    {"lora"},
    {"evaluate"},
    {"pipeline"},
    {"plots", "viz", "doctor", "colab", "__main__", "__init__"},
]
FIGURES = {"plots", "viz"}
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def imports_of(path: Path, top_level_only: bool = False) -> tuple[set[str], set[str]]:
    """(package modules, outside top-level packages) that a module imports, inside functions too unless
    ``top_level_only``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    ours, outside = set(), set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            ours.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            outside.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            outside.update(a.name.split(".")[0] for a in node.names)
    return ours - {path.stem}, outside


MODULES = sorted(p for p in PACKAGE.glob("*.py"))


def test_every_module_has_a_layer():
    assert {p.stem for p in MODULES} == set(LAYER), "add the new module to LAYERS here and to CONTRIBUTING.md"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_imports_go_down_the_layers(path):
    ours, _ = imports_of(path)
    upward = {m for m in ours if LAYER[m] > LAYER[path.stem]}
    assert not upward, f"{path.name} imports {sorted(upward)} from a layer above its own"


def test_top_level_imports_have_no_cycle():
    graph = {p.stem: imports_of(p, top_level_only=True)[0] for p in MODULES}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle: {error.args[1]}")


@pytest.mark.parametrize("path", [p for p in MODULES if LAYER[p.stem] < LAYER["plots"]], ids=lambda p: p.stem)
def test_models_and_training_draw_no_figures(path):
    _, outside = imports_of(path)
    if path.stem == "utils":        # notebook_figures() and show_table() set up the notebook's display, draw nothing
        outside -= {"matplotlib", "matplotlib_inline", "IPython"}
    assert not outside & {"matplotlib", "ipywidgets", "IPython"}, f"{path.name}: figures go in plots.py or viz.py"


def test_recipes_hold_no_training_code():
    ours, outside = imports_of(PACKAGE / "recipes.py")
    assert not ours & {"pipeline", "features", "backbones"} and "torch" not in outside
