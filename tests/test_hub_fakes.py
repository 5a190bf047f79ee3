"""The hub and Colab paths, run offline with the Hub replaced by local fakes (tests/hub_fakes.py).

Data: the one way in (load_flickr8k) for local and hub data, the subset downloaded when no folder is found, the
offline error. Notebooks: the CLIP zero-shot cell of 02 and the real-BLIP-2 cells of 07, extracted from the .ipynb and
run under the fakes; a fresh clone playing Colab (google.colab faked) through 01's data cells.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import hub_fakes  # noqa: E402
from vlmcourse import data, metrics  # noqa: E402
from vlmcourse.data import DataNotFoundError, HubFlickr8k, find_data_root, load_flickr8k  # noqa: E402
from vlmcourse.profiles import get_profile  # noqa: E402
from vlmcourse.utils import cache_dir  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
NOTEBOOKS = PROJECT / "notebooks"


@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
    """No Flickr8k folder anywhere data.find_data_root looks, and an empty cache (the LLM cache linked in)."""
    if not (hub_fakes.SHARED / "captions.txt").is_file():
        pytest.skip(f"the shared Flickr8k subset is not at {hub_fakes.SHARED}")
    llm = cache_dir("llm")
    monkeypatch.delenv("VLMCOURSE_DATA", raising=False)
    monkeypatch.setattr(data, "PROJECT_ROOT", tmp_path / "clone")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "llm").symlink_to(llm)
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def code_cell(notebook: str, starts: str) -> str:
    """The source of the notebook's code cell that starts with ``starts``, IPython syntax turned into Python."""
    from IPython.core.inputtransformer2 import TransformerManager

    cells = ["".join(c["source"]) for c in json.loads((NOTEBOOKS / notebook).read_text())["cells"]
             if c["cell_type"] == "code"]
    found = [c for c in cells if c.lstrip().startswith(starts)]
    assert len(found) == 1, f"{notebook}: {len(found)} code cells start with {starts!r}"
    return TransformerManager().transform_cell(found[0])


# ------------------------------------------------------------------ data
def test_subset_rule_is_fixed_and_spread_over_the_split():
    assert data.subset_rows(6000, 646) == data.subset_rows(6000, 646)
    rows = data.subset_rows(6000, 646)
    assert len(set(rows)) == 646 and rows[0] == 0 and rows[-1] > 5900 and rows == sorted(rows)
    assert data.subset_rows(10, 20) == list(range(10))


def test_no_local_data_downloads_a_subset_once_then_reads_it_from_the_cache(no_local_data, monkeypatch):
    calls = []
    hub_fakes.install(monkeypatch, dataset_calls=calls)
    monkeypatch.setattr(data, "HUB_SUBSET_SIZES", {"train": 12, "dev": 4, "test": 3})    # the rule, at a small size
    ds = load_flickr8k("dev", "cpu")
    assert type(ds) is data.Flickr8k and len(ds) == 4 and all(len(c) == 5 for c in ds.captions)
    assert [len(load_flickr8k(s, "cpu")) for s in ("train", "test")] == [12, 3]
    assert ds.image_ids == [f"dev_{r:05d}.jpg" for r in data.subset_rows(78, 4)]   # named by their Hub row
    assert max(ds.load_image(0).size) <= data.HUB_SUBSET_MAX_SIDE
    assert ds.image_file(0).is_file() and ds.image_file(0) == ds.image_paths[0]
    assert find_data_root() == data.hub_subset_root() and len(calls) == 3     # each split downloaded once


def test_default_subset_has_the_shared_split_sizes(no_local_data, monkeypatch):
    hub_fakes.install(monkeypatch, limit=None)
    root = data.fetch_hub_subset(out=no_local_data / "subset")
    index = data.read_annotations(root)
    assert {s: len(index.splits[s]) for s in data.SPLITS} == {"train": 646, "dev": 78, "test": 76}
    assert sum(map(len, index.captions.values())) == 4000


def test_offline_without_data_keeps_the_error_that_lists_where_it_looked(no_local_data, monkeypatch):
    from vlmcourse import profiles

    monkeypatch.setattr(profiles, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataNotFoundError) as error:
        load_flickr8k("train", "cpu")
    message = str(error.value)
    assert "Looked in" in message and str(data.hub_subset_root()) in message and "not reachable" in message


def test_hub_dataset_has_the_local_interface_but_no_paths(no_local_data, monkeypatch):
    hub_fakes.install(monkeypatch)
    ds = load_flickr8k("test", get_profile("hub", device="cpu"))
    assert isinstance(ds, HubFlickr8k) and len(ds) == 76 and len(ds.captions[0]) == 5
    assert ds[0]["pixel_values"].shape == (3, 224, 224)
    assert ds.image_file(3).is_file() and ds.image_file(3).name == "test_00003.jpg"
    with pytest.raises(AttributeError, match="image_file"):
        ds.image_paths


# ------------------------------------------------------------------ notebook cells under the fakes
def test_notebook02_zero_shot_clip_cell_runs_under_the_fakes(no_local_data, monkeypatch):
    from vlmcourse import backbones

    fakes = hub_fakes.install(monkeypatch)
    profile = get_profile("hub", device="cpu")
    test_ds = load_flickr8k("test", profile)
    shown = []
    results = {"chance": metrics.chance_recall(len(test_ds), captions_per_image=5)}
    namespace = {"profile": profile, "backbones": backbones, "metrics": metrics, "test_ds": test_ds,
                 "flat_captions": [c for caps in test_ds.captions for c in caps], "results": results,
                 "display": shown.append}
    exec(code_cell("02_clip_contrastive.ipynb", 'if profile.name == "hub":'), namespace)
    assert ("CLIPModel", hub_fakes.CLIP_ID) in fakes.calls
    assert "CLIP ViT-B/16 zero-shot" in results and len(shown) == 1
    assert list(shown[0].index) == ["chance", "CLIP ViT-B/16 zero-shot"]


class _GPU:
    """torch as the notebook sees it on a GPU runtime: only ``torch.cuda``'s answers change (the model stays on the
    CPU, as profile.device says)."""

    class cuda:
        is_available = staticmethod(lambda: True)
        max_memory_allocated = staticmethod(lambda *args: 0)

    def __getattr__(self, name):
        return getattr(torch, name)


def test_notebook07_real_blip2_cells_run_under_the_fakes_in_fp16_eager(no_local_data, monkeypatch):
    import math

    from vlmcourse import show_table, viz

    fakes = hub_fakes.install(monkeypatch)
    profile = get_profile("hub", device="cpu")
    dataset = load_flickr8k("test", profile)
    P, h, w = 3, 7, 7
    ours = torch.softmax(torch.randn(P, 32, h * w), -1).view(P, 32, h, w)      # stands in for our stage-1 maps
    figures = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: figures.append(plt.gcf()))
    namespace = {"profile": profile, "torch": _GPU(), "dataset": dataset, "photo_index": [0, 5, 9], "P": P,
                 "SHOW": [1, 0, 2], "captions": [dataset.captions[i][0] for i in (0, 5, 9)], "h": h, "w": w,
                 "entropy": viz.attention_entropy(ours), "consistency": viz.query_region_consistency(ours),
                 "math": math, "plt": plt, "show_table": show_table, "display": lambda x: None,
                 **{n: getattr(viz, n) for n in ("attention_entropy", "query_region_consistency",
                                                 "plot_region_consistency", "query_grid")}}
    exec(code_cell("07_attention_maps.ipynb", "RUN_BLIP2 = "), namespace)
    assert namespace["RUN_BLIP2"] and ("Blip2ForConditionalGeneration", hub_fakes.BLIP2_ID) in fakes.calls
    blip2 = namespace["blip2"]
    assert blip2.dtype == torch.float16 and blip2.config.qformer_config._attn_implementation == "eager"
    assert namespace["blip2_maps"].shape[1:] == (P, 2, 32, 16, 16)      # (layers, photos, heads, Q, 16, 16)
    for starts in ("if RUN_BLIP2:\n    fig = query_grid", "if RUN_BLIP2:\n    blip2_entropy"):
        exec(code_cell("07_attention_maps.ipynb", starts), namespace)
    assert len(figures) == 2
    plt.close("all")


# ------------------------------------------------------------------ a fresh clone, the way Colab runs it
COLAB_DRIVER = r'''
import os, shutil, subprocess, sys, types
from pathlib import Path
from IPython.core.inputtransformer2 import TransformerManager

SOURCE, CONTENT, NOTEBOOK = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
import importlib.machinery
colab = sys.modules["google.colab"] = types.ModuleType("google.colab")       # what Colab has
colab.__spec__ = importlib.machinery.ModuleSpec("google.colab", None)
# not installed yet: without the editable install of the working tree
sys.meta_path = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "")).lower()]
try:
    import vlmcourse
    raise SystemExit(f"vlmcourse importable before the setup cell: {vlmcourse.__file__}")
except ImportError:
    pass
commands = []

class Shell:
    """get_ipython(): `!git clone` copies the working tree (a fresh clone of it), `!bash setup.sh` is recorded."""
    def system(self, command):
        command = command.format(**namespace)
        commands.append(command)
        if command.startswith("git clone"):
            dest = Path(command.split()[-1])
            files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=SOURCE, check=True,
                                   capture_output=True, text=True).stdout.split("\n")
            for name in filter(None, files):
                if (SOURCE / name).is_file():
                    (dest / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(SOURCE / name, dest / name)

import json
cells = [c for c in json.loads((SOURCE / "notebooks" / NOTEBOOK).read_text())["cells"] if c["cell_type"] == "code"]
source = lambda i: TransformerManager().transform_cell("".join(cells[i]["source"]))
namespace = {"get_ipython": Shell}
setup = source(0)
assert "# Colab only" in setup
exec(setup.replace("/content/vlmcourse", str(CONTENT / "vlmcourse")), namespace)
import vlmcourse
assert Path(vlmcourse.__file__).is_relative_to(CONTENT), vlmcourse.__file__
print("commands:", commands)
print("profile env:", os.environ["VLMCOURSE_PROFILE"])
sys.path.insert(0, str(CONTENT / "vlmcourse" / "tests"))
import hub_fakes
hub_fakes.SHARED = SOURCE.parent / "shared" / "flickr8k-subset"   # the Hub's stand-in
fakes = hub_fakes.install_globally()
from vlmcourse import data
data.HUB_SUBSET_SIZES = {"train": 8, "dev": 2, "test": 2}            # the rule, at a small size
for i in range(1, len(cells)):
    text = "".join(cells[i]["source"])
    exec(source(i), namespace)
    if "load_flickr8k(" in text:
        break
ds = namespace["dataset"]
print("dataset:", type(ds).__name__, len(ds), ds.root)
print("caption:", ds.captions[2][0])
'''


@pytest.mark.parametrize("gpu", [False, True], ids=["no GPU: cpu profile, subset", "GPU: hub profile"])
def test_fresh_clone_as_colab_gets_through_notebook01_data_cells(no_local_data, gpu):
    driver = no_local_data / "colab_driver.py"
    prelude = "import torch\ntorch.cuda.is_available = lambda: True\n" if gpu else ""
    driver.write_text(prelude + COLAB_DRIVER)
    content = no_local_data / "content"
    content.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VLMCOURSE_PROFILE", "VLMCOURSE_DATA", "PYTHONPATH")}
    env.update(MPLBACKEND="Agg", VLMCOURSE_CACHE=str(no_local_data / "cache"))
    run = subprocess.run([sys.executable, str(driver), str(PROJECT), str(content), "01_vit_patches.ipynb"],
                         cwd=content, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "git clone -q --depth 1 https://github.com/vlmcourse/vlmcourse" in out and "scripts/setup.sh" in out
    if gpu:
        assert "profile env: hub" in out and "dataset: HubFlickr8k 646 jxie/flickr8k" in out
    else:
        assert "profile env: cpu" in out and "dataset: Flickr8k 8 " in out and "jxie--flickr8k-subset" in out
    assert "vlmcourse profile:" in out and "to change" in out


# ------------------------------------------------------------------ the repository written in one place
def test_choose_profile_keeps_the_learners_choice_and_says_how_to_change(capsys):
    from vlmcourse.colab import choose_profile

    env = {}
    assert choose_profile(env, cuda=True) == "hub" and env["VLMCOURSE_PROFILE"] == "hub"
    assert "%env VLMCOURSE_PROFILE=cpu" in capsys.readouterr().out
    assert choose_profile({"VLMCOURSE_PROFILE": "cpu"}, cuda=True) == "cpu"
    assert choose_profile({}, cuda=False) == "cpu"
    with pytest.raises(ValueError, match="choose one of"):
        choose_profile({"VLMCOURSE_PROFILE": "gpu"}, cuda=True)


@pytest.mark.parametrize("notebook", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_setup_cell_and_badge_come_from_the_one_repository_constant(notebook):
    from vlmcourse.colab import SETUP_CELL, colab_url

    cells = json.loads((NOTEBOOKS / notebook).read_text())["cells"]
    assert "".join(cells[1]["source"]) == SETUP_CELL, "run: python scripts/sync_colab.py " + notebook
    assert colab_url(notebook) in "".join(cells[0]["source"])


def test_no_notebook_touches_local_only_dataset_attributes():
    for path in NOTEBOOKS.glob("*.ipynb"):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        for local_only in (".image_paths", ".image_dir", "Flickr8k(", "find_data_root("):
            assert local_only not in code, f"{path.name} uses {local_only}: go through load_flickr8k / image_file"
