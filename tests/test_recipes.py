from pathlib import Path

import pytest
import torch

from vlmcourse import pipeline, recipes
from vlmcourse.pipeline import load_or_train_stage1
from vlmcourse.recipes import Stage1Recipe
from vlmcourse.stage1 import Stage1Config


@pytest.fixture
def benchmarks_importable(monkeypatch):
    """The scripts of benchmarks/ importable as modules (sweep, notebook_suite), for one test."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture
def tiny_world(flickr_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMCOURSE_DATA", str(flickr_dir))
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path / "cache"))


def test_stage1_is_trained_once_then_handed_off(tiny_world, monkeypatch):
    recipe = Stage1Recipe(steps=4, batch_size=4, eval_every=2, model=Stage1Config(num_query_tokens=4))
    seen = []

    def metrics(m):                     # a caller's measure, taken at each evaluation (a learning curve)
        seen.append(m.training)
        return {"queries": m.qformer.query_tokens.shape[1]}

    model, result = load_or_train_stage1("tiny", recipe, metrics=metrics)
    assert len(result.history) == 4 and [e["step"] for e in result.evals] == [1, 3]
    assert [e["queries"] for e in result.evals] == [4, 4] and seen == [False, False]   # in eval mode, kept in history
    assert {"itc", "itm", "itg", "loss"} <= set(result.history[0])
    monkeypatch.setattr(pipeline, "train_stage1", lambda *a, **k: pytest.fail("retrained"))
    again, history = load_or_train_stage1("tiny", recipe)
    assert history.history == result.history and history.evals == result.evals
    x = torch.randn(2, 16, 32)
    assert torch.allclose(model.eval().image_features(x), again.image_features(x), atol=1e-6)
    other = Stage1Recipe(steps=4, batch_size=4, seed=1, model=Stage1Config(num_query_tokens=4))
    assert recipes.stage1_dir(recipes.get_profile("tiny"), other) != recipes.stage1_dir(recipes.get_profile("tiny"), recipe)


def test_recorded_runs_load_and_draw(tmp_path, monkeypatch):
    import json

    import matplotlib

    matplotlib.use("Agg")
    from vlmcourse.plots import plot_recorded_curve

    record = {"seeds": [0], "machine": "x86_64 CPU, 2 threads, float32",
              "runs": {"a": {"points": [{"step": 10, "test": {"r1": 0.2}}, {"step": 20, "test": {"r1": 0.6}}]},
                       "b": {"points": [{"step": 10, "dev_all": 0.1}, {"step": 30, "dev_all": 0.3}]},
                       "c": {"points": [{"step": 5, "cider": 0.2}]}}}
    monkeypatch.setattr(recipes, "RECORDED", tmp_path)
    (tmp_path / "curve.json").write_text(json.dumps(record))
    assert recipes.recorded_run("curve") == record
    with pytest.raises(FileNotFoundError, match="no recorded run 'other'.*other.json"):
        recipes.recorded_run("other")
    fig = plot_recorded_curve(record, {"test": {"R@1": ("a", "r1", 0.9)}}, mark_step=15)
    ax = fig.axes[0]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "R@1"]
    assert list(line.get_xdata()) == [10, 20] and list(line.get_ydata()) == [20.0, 60.0]
    assert any(list(ln.get_ydata()) == [90.0, 90.0] for ln in ax.get_lines())      # the target, dashed
    fig = plot_recorded_curve(record, {"dev": {"all three": ("b", "all", None)}}, split="dev")
    assert [list(ln.get_ydata()) for ln in fig.axes[0].get_lines()] == [[10.0, 30.0]]   # "dev_all": flat keys too
    fig = plot_recorded_curve(record, {"dev": {"CIDEr-D": ("c", "cider", None)}}, split="dev")
    assert [list(ln.get_ydata()) for ln in fig.axes[0].get_lines()] == [[20.0]]          # and the key alone


def test_recorded_curve_title_names_targets_only_when_drawn_and_gate_curve_draws_each_gate():
    import matplotlib

    matplotlib.use("Agg")
    from vlmcourse.plots import plot_gate_curve, plot_recorded_curve

    record = {"seeds": [0], "machine": "x86_64 CPU", "runs": {"a": {"points": [{"step": 5, "dev_acc": 0.4}]}}}
    assert "targets" not in plot_recorded_curve(record, {"p": {"acc": ("a", "acc", None)}}, split="dev")._suptitle.get_text()
    assert "targets" in plot_recorded_curve(record, {"p": {"acc": ("a", "acc", 0.5)}}, split="dev")._suptitle.get_text()
    # one label, a run per seed: both drawn in one colour, the later seed fainter and unlabelled
    record = {"seeds": [0, 1], "machine": "x86_64 CPU", "runs": {"a": {"points": [{"step": 5, "dev_acc": 0.4}]},
                                                                  "a1": {"points": [{"step": 5, "dev_acc": 0.3}]}}}
    fig = plot_recorded_curve(record, {"p": {"acc": (["a", "a1"], "acc", None)}}, split="dev")
    first, second = fig.axes[0].get_lines()
    assert first.get_label() == "acc" and second.get_label().startswith("_") and second.get_alpha() < 1
    assert first.get_color() == second.get_color() and list(second.get_ydata()) == [30.0]
    assert "seeds 0, 1" in fig._suptitle.get_text() and "further seed" in fig._suptitle.get_text()
    gates = [{"step": s, "attn 0": 0.0, "ff 0": 0.01 * s, "attn 10": -0.02 * s, "ff 10": 0.0} for s in (1, 2, 3)]
    ax = plot_gate_curve(gates)
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
    assert lines["before layer 0: feed-forward"] == pytest.approx([0.01, 0.02, 0.03])
    assert lines["before layer 10: attention"] == pytest.approx([-0.02, -0.04, -0.06])
    assert len([k for k in lines if k.startswith("before layer")]) == 4       # two blocks, two gates each


def test_shipped_recorded_runs_name_their_command_and_machine():
    for path in sorted(recipes.RECORDED.glob("*.json")):
        record = recipes.recorded_run(path.stem)
        assert record["command"].startswith("python benchmarks/") and record["machine"] and record["runs"], path
        # a curve (points as it trained), or the figures of its end (an ablation scored once, like notebook 06's)
        assert all(run["points"] or run["final"] for run in record["runs"].values()), path


def test_save_record_keeps_each_runs_machine_when_appending(tmp_path, monkeypatch, benchmarks_importable):
    """A record built over two invocations on two machines names both, and each run its own (benchmarks/sweep.py)."""
    import json
    import sys
    from dataclasses import dataclass

    import sweep
    from vlmcourse.train import TrainResult

    @dataclass
    class Run:
        seed: int
        steps: int = 2

    result = TrainResult(history=[{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}], evals=[{"step": 1, "acc": 0.5}],
                         seconds=4.0)
    monkeypatch.setenv("VLMCOURSE_BF16", "0")
    assert sweep.machine().endswith("threads, float32")       # the precision training will use here
    path = tmp_path / "record.json"
    monkeypatch.setattr(sys, "argv", ["vqa_designs.py", "--seeds", "0"])
    monkeypatch.setattr(sweep, "machine", lambda: "machine A")
    sweep.save_record(path, "what", {"a, seed 0": (Run(0), result, {"acc": 0.5})})
    monkeypatch.setattr(sys, "argv", ["vqa_designs.py", "--seeds", "1"])
    monkeypatch.setattr(sweep, "machine", lambda: "machine B")
    sweep.save_record(path, "what", {"a, seed 1": (Run(1), result, {"acc": 0.6})}, append=True)
    record = json.loads(path.read_text())
    assert record["seeds"] == [0, 1] and record["machine"] == "machine A / machine B"
    assert {name: run["machine"] for name, run in record["runs"].items()} == {"a, seed 0": "machine A",
                                                                                "a, seed 1": "machine B"}
    assert record["command"].splitlines() == ["python benchmarks/vqa_designs.py --seeds 0",
                                              "python benchmarks/vqa_designs.py --seeds 1"]
    second = record["runs"]["a, seed 1"]
    assert second["points"] == [{"step": 2, "acc": 0.5}] and second["seconds_per_step"] == 2.0


def test_notebook_suite_adds_up_each_notebook_and_cell_from_pytest_durations(benchmarks_importable):
    """benchmarks/notebook_suite.py: per notebook and per cell, setup, call and teardown added up; other tests' lines
    and pytest's own lines ignored."""
    from notebook_suite import durations

    out = """============ slowest durations ============
300.50s call     notebooks/04_stage1_losses.ipynb::Cell 12
12.40s call     notebooks/06_lora_captioning.ipynb::Cell 3
1.20s setup    notebooks/04_stage1_losses.ipynb::Cell 0
0.60s call     notebooks/04_stage1_losses.ipynb::Cell 12
9.00s call     tests/test_shapes.py::test_itc_learns
(20 durations < 0.005s hidden.  Use -vv to show these durations.)
3 passed in 315.00s"""
    per_notebook, per_cell = durations(out)
    assert per_notebook == {"04_stage1_losses": 302, "06_lora_captioning": 12}
    assert per_cell == {"04_stage1_losses::Cell 12": 301, "06_lora_captioning::Cell 3": 12,
                        "04_stage1_losses::Cell 0": 1}
