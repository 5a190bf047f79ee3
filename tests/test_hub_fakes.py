"""The hub and Colab paths, run offline with the Hub replaced by local fakes (tests/hub_fakes.py).

Data: the one way in (load_flickr8k) for local and hub data, the subset downloaded when no folder is found, the
offline error. Notebooks: the CLIP zero-shot cell of 02 and the real-BLIP-2 cells of 07, extracted from the .ipynb and
run under the fakes; a fresh clone playing Colab (google.colab faked) through 01's data cells, and through 06's setup,
imports and save-and-caption cells.
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
# COLAB_DRIVER plays a Colab runtime in a subprocess: google.colab in sys.modules, vlmcourse not importable, `!`
# commands handled by a fake shell (`!git clone` copies this working tree), the notebook's setup cell run as it is,
# then the Hub fakes installed for the rest of the process. A stage (NOTEBOOK01_CELLS, NOTEBOOK06_CELLS) follows it
# and runs the notebook's cells in the driver's ``namespace``.
# argv: working tree, /content, notebook, "gpu" | "cpu" (what the setup cell sees), rows per Hub split (0: all).
COLAB_DRIVER = r'''
import os, shutil, subprocess, sys, types
from pathlib import Path
from IPython.core.inputtransformer2 import TransformerManager

SOURCE, CONTENT, NOTEBOOK = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
GPU, HUB_ROWS = sys.argv[4] == "gpu", int(sys.argv[5]) or None
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
import torch
cuda_available = torch.cuda.is_available
if GPU:
    torch.cuda.is_available = lambda: True          # a GPU runtime, as the setup cell sees it
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
text = lambda i: "".join(cells[i]["source"])
source = lambda i: TransformerManager().transform_cell(text(i))

def cell(starts):
    """The source of the one code cell that starts with ``starts`` (as the tests' code_cell)."""
    found = [i for i in range(len(cells)) if text(i).lstrip().startswith(starts)]
    assert len(found) == 1, f"{NOTEBOOK}: {len(found)} code cells start with {starts!r}"
    return source(found[0])

namespace = {"get_ipython": Shell}
setup = source(0)
assert "# Colab only" in setup
exec(setup.replace("/content/vlmcourse", str(CONTENT / "vlmcourse")), namespace)
torch.cuda.is_available = cuda_available           # the cells after it run here, on the CPU (profile.device)
import vlmcourse
assert Path(vlmcourse.__file__).is_relative_to(CONTENT), vlmcourse.__file__
print("commands:", commands)
print("profile env:", os.environ["VLMCOURSE_PROFILE"])
sys.path.insert(0, str(CONTENT / "vlmcourse" / "tests"))
import hub_fakes
hub_fakes.SHARED = SOURCE.parent / "shared" / "flickr8k-subset"   # the Hub's stand-in
fakes = hub_fakes.install_globally(limit=HUB_ROWS)
from vlmcourse import data
data.HUB_SUBSET_SIZES = {"train": 8, "dev": 2, "test": 4}            # the rule, at a small size
'''

NOTEBOOK01_CELLS = r'''
for i in range(1, len(cells)):
    exec(source(i), namespace)
    if "load_flickr8k(" in text(i):
        break
ds = namespace["dataset"]
print("dataset:", type(ds).__name__, len(ds), ds.root)
print("caption:", ds.captions[2][0])
'''

# Notebook 06: its imports cell; then what sections 1-6 leave for section 7 (model, test_ds, test_ids, picks), built
# cheaply: the notebook's own data path (split_features under the profile the setup cell chose), its own lines for
# test_ds, test_ids and picks, and, in place of the long runs of notebooks 05 and 06, a mean-pool + LoRA captioner
# trained 10 steps at a high learning rate (enough for the hub fakes' random LLM to write words, not only newlines,
# which caption() strips to ""); then section 7's save-and-caption cell as it is, vlmcourse.caption watched, not replaced.
NOTEBOOK06_CELLS = r"""
import contextlib, io
imports = source(1)
assert "import vlmcourse" in imports and "split_features" in imports, imports
exec(imports, namespace)
exec('''
vision, llm = load_vision_encoder(profile), load_llm(profile)
data = {split: split_features(profile, split, vision) for split in ("train", "test")}
quick = ablation_recipe("meanpool", lora=True)
quick = replace(quick, stage2=replace(quick.stage2, steps=10, lr=3e-2, warmup_steps=0))
model, _ = load_or_train_captioner(profile, quick, llm=llm, eval_split=None)
''', namespace)
lines = [line for i in range(len(cells)) for line in text(i).splitlines()]
for starts in ("test_ds, test_ids = ", "picks = "):
    found = [line for line in lines if line.startswith(starts)]
    assert len(found) == 1, (starts, found)
    exec(found[0], namespace)

calls = []
def watched(images, model_dir, *args, _real=vlmcourse.caption, **kwargs):
    captions = _real(images, model_dir, *args, **kwargs)
    calls.append({"images": [str(i) for i in images], "model_dir": str(model_dir), "captions": captions,
                  "from": sys.modules[_real.__module__].__file__})
    return captions
vlmcourse.caption = watched
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    exec(cell('out = tempfile.mkdtemp(prefix="captioner-")'), namespace)
del vlmcourse.caption
print(printed.getvalue(), end="")
test_ds, out = namespace["test_ds"], Path(namespace["out"])
print("RESULT", json.dumps({
    "profile": namespace["profile"].name, "dataset": type(test_ds).__name__, "photos": len(test_ds),
    "printed": printed.getvalue(), "paths": [str(p) for p in namespace["paths"]], "calls": calls,
    "out": str(out), "files": sorted(p.name for p in out.iterdir()),
    "config": json.loads((out / "config.json").read_text()), "fakes": fakes.calls}))
"""


def run_as_colab(workdir: Path, notebook: str, stage: str, gpu: bool, hub_rows: int = 0) -> str:
    """COLAB_DRIVER, then ``stage``, on ``notebook`` in a subprocess (cwd ``workdir/content``); its stdout, after
    checking that the setup cell cloned, ran setup.sh and chose the profile a runtime with(out) a GPU gets."""
    driver = workdir / "colab_driver.py"
    driver.write_text(COLAB_DRIVER + stage)
    content = workdir / "content"
    content.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VLMCOURSE_PROFILE", "VLMCOURSE_DATA", "PYTHONPATH")}
    env.update(MPLBACKEND="Agg", VLMCOURSE_CACHE=str(workdir / "cache"))
    run = subprocess.run([sys.executable, str(driver), str(PROJECT), str(content), notebook,
                          "gpu" if gpu else "cpu", str(hub_rows)],
                         cwd=content, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "git clone -q --depth 1 https://github.com/vlmcourse/vlmcourse" in out and "scripts/setup.sh" in out
    assert "vlmcourse profile:" in out and "to change" in out
    assert f"profile env: {'hub' if gpu else 'cpu'}" in out
    return out


@pytest.mark.parametrize("gpu", [False, True], ids=["no GPU: cpu profile, subset", "GPU: hub profile"])
def test_fresh_clone_as_colab_gets_through_notebook01_data_cells(no_local_data, gpu):
    out = run_as_colab(no_local_data, "01_vit_patches.ipynb", NOTEBOOK01_CELLS, gpu)
    if gpu:
        assert "dataset: HubFlickr8k 646 jxie/flickr8k" in out
    else:
        assert "dataset: Flickr8k 8 " in out and "jxie--flickr8k-subset" in out


def test_fresh_clone_as_colab_on_a_gpu_saves_and_captions_in_notebook06(no_local_data):
    """A GPU runtime (hub profile, HubFlickr8k: its photos have no files until image_file writes them to the cache).
    The cpu profile's data path is 01's test's; its SmolLM2-135M would take over 2 minutes here (30 tokens a photo)."""
    stdout = run_as_colab(no_local_data, "06_lora_captioning.ipynb", NOTEBOOK06_CELLS, gpu=True, hub_rows=8)
    result = json.loads(stdout.split("RESULT ", 1)[1])
    cache, content = no_local_data / "cache", no_local_data / "content"
    # the data: notebook 06's own path, the profile the setup cell chose on the faked Hub, and that profile's parts
    assert (result["profile"], result["dataset"], result["photos"]) == ("hub", "HubFlickr8k", 8)
    assert {("CLIPVisionModel", hub_fakes.CLIP_ID), ("AutoModelForCausalLM", hub_fakes.LLM_ID)} <= {
        tuple(c) for c in result["fakes"]}
    # the folder the cell saved, and the one call that captioned its three photo files from it (the clone's code)
    assert {"model.safetensors", "config.json", "adapter_model.safetensors"} <= set(result["files"])
    assert result["config"]["profile"] == result["profile"] and result["config"]["lora"]
    [call] = result["calls"]
    assert call["images"] == result["paths"] and call["model_dir"] == result["out"]
    assert Path(call["from"]).is_relative_to(content / "vlmcourse")
    paths = [Path(p) for p in result["paths"]]
    assert len(paths) == 3 and len(set(paths)) == 3
    for path in paths:      # photo files written under the cache, not read from a local data folder
        assert path.is_file() and path.suffix == ".jpg" and path.name.startswith("test_")
        assert path.is_relative_to(cache / "data") and not path.is_relative_to(content)
    # the cell printed one line per photo: its file name, a tab, its caption
    captions = call["captions"]
    assert len(captions) == 3 and all(isinstance(c, str) and c.strip() for c in captions), captions
    assert result["printed"] == "".join(f"{p.name}\t{c}\n" for p, c in zip(paths, captions))


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
