"""Issue 15: what a careful new user and a hostile tester feed the package and the CLI. Each test reproduces one
probe of the issue (numbered as there) and pins the clear error or the safe behaviour that replaced it."""
import io
import json
import os
import shutil
import struct
import threading
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmcourse import features, recipes
from vlmcourse.__main__ import main
from vlmcourse.backbones import load_llm, load_vision_encoder
from vlmcourse.stage2 import MeanPoolConnector, SoftPromptCaptioner
from vlmcourse.lora import ADAPTER_FILE, LoRACaptioner, ModelFolderError
from vlmcourse.data import CaptionFormatError, Flickr8k, ImageLoadError, load_image, read_annotations
from vlmcourse.doctor import doctor
from vlmcourse.features import cache_features
from vlmcourse.recipes import CaptionerRecipe, LoraSettings, Stage2Recipe, save_trained
from vlmcourse.train import TrainResult
from vlmcourse.utils import cache_dir

LORA = LoraSettings(r=2, lora_alpha=4)


@pytest.fixture
def env(flickr_dir, tmp_path, monkeypatch):
    """flickr_dir as $VLMCOURSE_DATA and an empty $VLMCOURSE_CACHE (sharing the converted tokenizer)."""
    llm_cache = cache_dir("llm")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "llm").symlink_to(llm_cache)
    monkeypatch.setenv("VLMCOURSE_DATA", str(flickr_dir))
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path / "cache"))
    return flickr_dir


@pytest.fixture(scope="module")
def llm():
    return load_llm("tiny")


def make_captioner(llm, lora=LORA, seed=0) -> LoRACaptioner:
    """An untrained tiny captioner (mean-pool connector, LoRA with non-zero B so the adapter matters)."""
    torch.manual_seed(seed)
    model = LoRACaptioner(MeanPoolConnector((4, 4), 2), 32, llm, lora=lora)
    if lora:
        with torch.no_grad():
            for n, p in model.llm_model.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.5)
    model.recipe = CaptionerRecipe(connector="meanpool", pooled=2, lora=lora, stage2=Stage2Recipe(stage1=None))
    model.profile_name, model.vision_name = "tiny", load_vision_encoder("tiny").name
    return model.eval()


def save(model, path: Path) -> Path:
    save_trained(model, model.recipe, TrainResult(), path)
    return path


def photo(path: Path, colour=(200, 40, 40)) -> Path:
    Image.new("RGB", (64, 48), colour).save(path)
    return path


# ----------------------------------------------------------------------------- 1. data loss
def test_1_train_out_refuses_a_folder_it_did_not_write_and_keeps_the_files(env, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "src").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "precious.txt").write_text("keep me")
    (out / "src" / "data.csv").write_text("a,b\n")
    rc = main(["train", "captioner", "--out", str(out), "--profile", "tiny", "--stage1-steps", "1", "--steps", "1"])
    assert rc == 2 and str(out) in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me" and (out / "src" / "data.csv").is_file()
    with pytest.raises(FileExistsError, match="not written by vlmcourse"):
        save_trained(make_captioner(load_llm("tiny")), None, TrainResult(), out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "precious.txt", "src"]


def test_1_save_trained_marks_its_folder_and_an_interrupted_replace_keeps_the_old_model(env, tmp_path, llm,
                                                                                        monkeypatch):
    path = save(make_captioner(llm, seed=0), tmp_path / "models" / "model")
    assert json.loads((path / "config.json").read_text())["vlmcourse"]["format"] == recipes.SAVED_FORMAT
    old = (path / "model.safetensors").read_bytes()
    real_replace = os.replace

    def interrupted(src, dst):
        if Path(src).name.startswith("model.partial"):     # the new model moving into place
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(make_captioner(llm, seed=1), path)
    assert (path / "model.safetensors").read_bytes() == old and (path / "history.json").is_file()
    monkeypatch.setattr(os, "replace", real_replace)
    save(make_captioner(llm, seed=1), path)                  # a folder it wrote is replaced
    assert (path / "model.safetensors").read_bytes() != old
    assert [p.name for p in path.parent.iterdir()] == ["model"]     # no partial or old copy left


# ----------------------------------------------------------------------------- 2. silent wrong model
@pytest.mark.parametrize("kind", ["no-lora captioner", "stage-2 model"])
def test_2_an_adapter_the_config_does_not_describe_is_an_error(env, tmp_path, llm, kind, capsys):
    with_lora = save(make_captioner(llm), tmp_path / "lora")
    path = tmp_path / "foreign"
    if kind == "stage-2 model":
        SoftPromptCaptioner(MeanPoolConnector((4, 4), 2), 32, llm).save_pretrained(path)
    else:
        save(make_captioner(llm, lora=None), path)
    shutil.copy(with_lora / ADAPTER_FILE, path / ADAPTER_FILE)
    with pytest.raises(ModelFolderError, match=f"model folder {path}"):
        LoRACaptioner.from_pretrained(path, llm=llm)
    assert main(["caption", "--model", str(path), str(photo(tmp_path / "p.jpg"))]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and ("adapter" in err or "not a captioner" in err)


# ----------------------------------------------------------------------------- 3, 4. feature caches
def _cached(flickr_dir):
    vision = load_vision_encoder("tiny")
    ds = Flickr8k("train", root=flickr_dir, transform=vision.transform)
    return vision, ds, cache_features(vision, ds)


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated"])
def test_3_a_damaged_feature_cache_is_named_removed_and_recomputed(env, damage):
    vision, ds, first = _cached(env)
    (path,) = cache_dir("features").glob("*.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "flipped bytes":
        middle = len(data) // 2
        data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    else:
        data = data[:len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"{path.name}.*recomput"):
        again = cache_features(vision, ds)
    assert torch.equal(again.features, first.features) and again.image_ids == first.image_ids
    assert features.load_features(path).image_ids == first.image_ids     # the rewritten file is whole


def test_4_a_replaced_photo_is_encoded_not_left_out_of_a_stale_cache(env):
    bad = env / "Images" / "1002_abc.jpg"
    good = bad.read_bytes()
    bad.write_bytes(b"\xff\xd8 broken")
    vision = load_vision_encoder("tiny")
    ds = Flickr8k("train", root=env, transform=vision.transform)
    with pytest.warns(UserWarning, match="1002_abc.jpg"):
        assert "1002_abc.jpg" not in cache_features(vision, ds).image_ids
    bad.write_bytes(good)
    assert "1002_abc.jpg" in cache_features(vision, Flickr8k("train", root=env, transform=vision.transform)).image_ids


# ----------------------------------------------------------------------------- 5. byte-order mark
@pytest.mark.parametrize("name, layout", [("Flickr8k.token.txt", "original"), ("captions.txt", "kaggle")])
def test_5_a_utf8_bom_loses_nothing(flickr_dir, name, layout):
    expected = read_annotations(flickr_dir, layout).captions
    path = flickr_dir / name
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_annotations(flickr_dir, layout).captions == expected


# ----------------------------------------------------------------------------- 6. decompression bomb
def bomb(path: Path, side: int = 14000) -> Path:
    """A small PNG whose header claims side x side pixels (PIL refuses to decode it: a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, side, side)                         # IHDR width, height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))     # its CRC
    path.write_bytes(bytes(data))
    return path


def test_6_a_decompression_bomb_is_one_more_unreadable_image(env, tmp_path, llm, capsys):
    model = save(make_captioner(llm), tmp_path / "model")
    big = bomb(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="big.png"):
        load_image(big)
    good = photo(tmp_path / "good.jpg")
    assert main(["caption", "--model", str(model), str(big), str(good)]) == 1
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(good)] and "big.png" in err


# ----------------------------------------------------------------------------- 7. tracebacks where a sentence is due
@pytest.mark.parametrize("file", ["model.safetensors", ADAPTER_FILE])
def test_7_a_truncated_weight_file_is_a_damaged_model_folder(env, tmp_path, llm, file, capsys):
    path = save(make_captioner(llm), tmp_path / "model")
    data = (path / file).read_bytes()
    (path / file).write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelFolderError, match=f"model folder {path} is damaged.*{file}"):
        LoRACaptioner.from_pretrained(path, llm=llm)
    assert main(["caption", "--model", str(path), str(photo(tmp_path / "p.jpg"))]) == 2
    assert "damaged" in capsys.readouterr().err


def test_7_a_stage1_or_mismatched_config_is_not_a_captioner(env, tmp_path, llm, capsys):
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "config.json").write_text(json.dumps({"stage1": {}, "qformer": {}, "num_image_tokens": 16}))
    (stage1 / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFolderError, match=f"model folder {stage1} .*not a captioner"):
        LoRACaptioner.from_pretrained(stage1, llm=llm)
    assert main(["caption", "--model", str(stage1), str(photo(tmp_path / "p.jpg"))]) == 2
    # a mean-pool config.json beside weights of another connector (pooled 2 x 2, not 1 x 1)
    path = save(make_captioner(llm), tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    config["connector"]["pooled"], config["connector_size"] = 1, 16
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=f"model folder {path}.*model.safetensors"):
        LoRACaptioner.from_pretrained(path, llm=llm)


def test_7_invalid_json_names_the_file(env, tmp_path, llm, capsys):
    path = save(make_captioner(llm), tmp_path / "model")
    (path / "config.json").write_text('{"bridge": ')
    assert main(["caption", "--model", str(path), str(photo(tmp_path / "p.jpg"))]) == 2
    assert str(path / "config.json") in capsys.readouterr().err


def test_7_latin1_captions_name_the_file_and_doctor_does_not_call_them_missing(env, capsys):
    path = env / "captions.txt"
    (env / "Flickr8k.token.txt").unlink()
    path.write_bytes(path.read_bytes().replace(b"photo 0 caption 0", "caf\u00e9 0 caption 0".encode("latin-1")))
    with pytest.raises(CaptionFormatError, match=f"{path}.*UTF-8"):
        read_annotations(env)
    out = io.StringIO()
    assert doctor("tiny", str(env), out=out) != 0
    assert "captions.txt" in out.getvalue() and "MISSING" not in out.getvalue()


def test_7_a_bogus_profile_is_one_sentence(monkeypatch, capsys):
    monkeypatch.setenv("VLMCOURSE_PROFILE", "nosuch")
    assert main(["doctor"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nosuch" in err and "VLMCOURSE_PROFILE" in err and "Traceback" not in err


def test_7_an_image_without_captions_is_an_error_at_load_time(flickr_dir):
    path = flickr_dir / "karpathy" / "dataset_flickr8k.json"
    data = json.loads(path.read_text())
    data["images"][3]["sentences"] = []
    data["images"][4]["sentences"] = [{"raw": "  ", "tokens": []}]
    path.write_text(json.dumps(data))
    with pytest.raises(CaptionFormatError, match=r"images\[3\] .*no caption"):
        read_annotations(path.parent)


# ----------------------------------------------------------------------------- 8. quieter gaps
def test_8_duplicate_caption_rows_are_dropped_and_counted(flickr_dir):
    path = flickr_dir / "Flickr8k.token.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[0].replace("#0", "#5"), lines[1]]) + "\n")
    with pytest.warns(UserWarning, match="2 duplicate caption rows dropped"):
        index = read_annotations(flickr_dir)
    assert len(index.captions["1000_abc.jpg"]) == 5 and index.duplicates == 2


def test_8_an_image_in_two_splits_is_named_and_a_train_test_leak_is_an_error(flickr_dir):
    dev = flickr_dir / "Flickr_8k.devImages.txt"
    dev.write_text(dev.read_text() + "1000_abc.jpg\n")
    with pytest.warns(UserWarning, match="1000_abc.jpg.*train and dev"):
        read_annotations(flickr_dir)
    test = flickr_dir / "Flickr_8k.testImages.txt"
    test.write_text(test.read_text() + "1001_abc.jpg\n")
    with pytest.raises(CaptionFormatError, match="1001_abc.jpg.*train and test"), pytest.warns(UserWarning):
        read_annotations(flickr_dir)


def test_8_doctor_decodes_the_photos(flickr_dir):
    (flickr_dir / "Images" / "1003_abc.jpg").write_bytes(b"not a photo")
    out = io.StringIO()
    assert doctor("tiny", str(flickr_dir), out=out) != 0
    assert "1 unreadable" in out.getvalue() and "1003_abc.jpg" in out.getvalue()
    assert "all good" not in out.getvalue()


@pytest.mark.parametrize("problem", ["empty dev split", "train/test leak"])
def test_8_doctor_fails_on_an_empty_split_or_a_leak(flickr_dir, problem):
    if problem == "empty dev split":
        (flickr_dir / "Flickr_8k.devImages.txt").write_text("\n")
    else:
        test = flickr_dir / "Flickr_8k.testImages.txt"
        test.write_text(test.read_text() + "1001_abc.jpg\n")
    out = io.StringIO()
    assert doctor("tiny", str(flickr_dir), out=out) == 2
    assert ("dev   EMPTY" if problem == "empty dev split" else "1001_abc.jpg: in both the train and test") \
        in out.getvalue()


def test_8_printed_paths_escape_tab_and_newline(env, tmp_path, llm, capsys):
    model = save(make_captioner(llm), tmp_path / "model")
    odd = photo(tmp_path / "a\tb\nc.jpg")
    assert main(["caption", "--model", str(model), str(odd)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.split("\t")[0] == str(odd).replace("\t", "\\t").replace("\n", "\\n")


def test_8_a_fifo_is_unreadable_not_a_hang(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    errors = []

    def read():
        try:
            load_image(fifo)
        except ImageLoadError as error:
            errors.append(str(error))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():                       # unblock the reader stuck in open() before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_image hangs on a FIFO")
    assert errors and "photo.jpg" in errors[0] and "not a regular file" in errors[0]


def test_8_a_negative_seed_is_refused_at_once(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "captioner", "--out", "x", "--data", "/no/such/dir", "--seed", "-1"])
    assert exit_.value.code == 2 and "--seed" in capsys.readouterr().err


def test_8_exit_codes_tell_a_crash_from_unreadable_images(monkeypatch, capsys):
    from vlmcourse import lora as captioner

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(captioner, "load_captioner", crash)
    assert main(["caption", "--model", "m", "x.jpg"]) == 3
    assert "boom" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(f"{code}: " in help_text for code in range(4))


def test_3_non_finite_features_are_never_cached(tmp_path):
    feats = features.FeatureSet(torch.zeros(3, 4, 2, dtype=torch.float16), ["a.jpg", "b.jpg", "c.jpg"], (2, 2), "enc")
    feats.features[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="1 photos .*b.jpg"):
        features.save_features(feats, tmp_path / "f.safetensors")
    assert not list(tmp_path.iterdir())
