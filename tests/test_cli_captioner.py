"""``python -m vlmcourse train captioner | caption | evaluate`` on the tiny profile, run in-process through main()."""
import json
import os
import shutil

import pytest
from test_captioner import world  # noqa: F401  (the same colour photos and an empty cache)

import vlmcourse
from vlmcourse.__main__ import CLI_TRAINING_TIME, main
from vlmcourse.lora import LoRACaptioner


@pytest.fixture(scope="module")
def cli_model(world):  # noqa: F811
    """A captioner trained by the CLI's default recipe, cut to 2 steps per stage."""
    out = world["root"] / "cli_model"
    argv = ["train", "captioner", "--out", str(out), "--profile", "tiny", "--data", str(world["data"]),
            "--steps", "2", "--stage1-steps", "2", "--seed", "1"]
    return main(argv), out


def test_train_captioner_runs_both_stages_and_saves(cli_model):
    rc, out = cli_model
    assert rc == 0
    model = LoRACaptioner.from_pretrained(out)
    recipe = model.recipe
    assert (recipe.stage2.steps, recipe.stage2.stage1.steps) == (2, 2)
    assert recipe.stage2.seed == recipe.stage2.stage1.seed == 1
    assert model.lora is not None and model.profile_name == "tiny"
    assert len(json.loads((out / "history.json").read_text())["history"]) == 2


def test_train_help_says_how_long_the_default_takes(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "captioner", "--help"])
    assert exit_.value.code == 0
    assert CLI_TRAINING_TIME in " ".join(capsys.readouterr().out.split())


def test_train_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["train", "captioner", "--out", str(tmp_path), "--profile", "tiny"]) == 2
    assert f"{tmp_path} is not empty and was not written by vlmcourse" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_caption_prints_path_tab_caption_and_fails_at_the_end_on_bad_images(cli_model, world, capsys):
    _, model_dir = cli_model
    good = [str(world["images"] / n) for n in world["test"]]
    missing, broken = str(world["root"] / "missing.jpg"), world["root"] / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    rc = main(["caption", "--model", str(model_dir), good[0], missing, str(broken), good[1]])
    out, err = capsys.readouterr()
    assert rc == 1
    expected = vlmcourse.caption(good, model_dir)
    assert out.splitlines() == [f"{path}\t{' '.join(text.split())}" for path, text in zip(good, expected)]
    assert missing in err and str(broken) in err and "2 of 4 images" in err


def test_caption_without_a_model_says_so(tmp_path, capsys):
    assert main(["caption", "--model", str(tmp_path / "nothing"), "photo.jpg"]) == 2
    assert "no saved captioner" in capsys.readouterr().err


def test_evaluate_prints_one_json_object(cli_model, world, capsys):
    _, model_dir = cli_model
    before = os.environ.get("VLMCOURSE_DATA")
    assert main(["evaluate", "--model", str(model_dir), "--data", str(world["data"]), "--split", "test"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"bleu4", "cider", "blank_image", "nearest_neighbour", "constant", "distinct", "empty", "captions",
            "p_eos_first"} <= set(report) and "predictions" not in report
    assert report["captions"] == len(world["test"]) and set(report["nearest_neighbour"]) == {"bleu4", "cider"}
    assert os.environ.get("VLMCOURSE_DATA") == before            # --data does not leak into the process


def test_a_missing_data_folder_is_named(cli_model, capsys):
    _, model_dir = cli_model
    assert main(["evaluate", "--model", str(model_dir), "--data", "/no/such/dir"]) == 2
    assert "/no/such/dir" in capsys.readouterr().err


def test_evaluate_scores_the_readable_photos_and_exits_1_naming_the_others(cli_model, world, tmp_path, capsys):
    _, model_dir = cli_model
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    broken = world["test"][0]
    (data / "Images" / broken).write_bytes(b"\xff\xd8 not a jpeg")
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--split", "test"]) == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["unreadable_images"] == [broken] and report["captions"] == len(world["test"]) - 1
    assert broken in err and "left out of the scores" in err
