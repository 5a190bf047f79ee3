
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlmcourse import data
from vlmcourse.data import (CaptionFormatError, DataNotFoundError, Flickr8k, ImageLoadError, collate,
                            find_data_root, hash_split, load_image, read_annotations, to_rgb)


def test_three_layouts_agree(flickr_dir):
    original = read_annotations(flickr_dir, "original")
    kaggle = read_annotations(flickr_dir, "kaggle")
    karpathy = read_annotations(flickr_dir / "karpathy", "karpathy")
    assert original.captions == kaggle.captions == karpathy.captions
    assert original.splits == kaggle.splits == karpathy.splits
    assert original.captions["1000_abc.jpg"][0] == "photo 0 caption 0 , with a comma"
    assert [len(original.splits[s]) for s in ("train", "dev", "test")] == [8, 2, 2]


def test_auto_layout_prefers_karpathy_then_original(flickr_dir):
    assert read_annotations(flickr_dir).layout == "original"
    assert read_annotations(flickr_dir / "karpathy").layout == "karpathy"
    (flickr_dir / "Flickr8k.token.txt").unlink()
    assert read_annotations(flickr_dir).layout == "kaggle"


def test_dataset_items_are_rgb_tensors_with_five_captions(flickr_dir):
    ds = Flickr8k("train", root=flickr_dir)
    item = ds[0]
    assert item["pixel_values"].shape == (3, 224, 224) and item["pixel_values"].dtype == torch.float32
    assert 0.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert len(item["captions"]) == 5 and item["image_id"] == "1000_abc.jpg"
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert batch["pixel_values"].shape == (3, 3, 224, 224) and len(batch["captions"]) == 3


def test_hf_dataset_view(flickr_dir):
    hf = Flickr8k("dev", root=flickr_dir).to_hf_dataset()
    assert hf.num_rows == 2 and set(hf.column_names) == {"image", "captions", "image_id"}
    assert hf[0]["image"].size == (80, 60) and len(hf[0]["captions"]) == 5


def test_kaggle_without_split_files_uses_a_stable_hash(flickr_dir):
    for split in ("train", "dev", "test"):
        (flickr_dir / f"Flickr_8k.{split}Images.txt").unlink()
    (flickr_dir / "Flickr8k.token.txt").unlink()
    index = read_annotations(flickr_dir)
    assert sorted(sum(index.splits.values(), [])) == sorted(index.captions)
    assert all(name in index.splits[hash_split(name)] for name in index.captions)


def test_missing_root_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("VLMCOURSE_DATA", raising=False)
    monkeypatch.setattr(data, "PROJECT_ROOT", tmp_path / "project")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataNotFoundError) as err:
        find_data_root()
    message = str(err.value)
    assert "VLMCOURSE_DATA" in message and str(tmp_path / "shared" / "flickr8k-subset") in message
    assert str(tmp_path / "data" / "flickr8k") in message


def test_explicit_and_env_roots_are_named_when_missing(tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError, match="/no/such/dir"):
        Flickr8k("train", root="/no/such/dir")
    monkeypatch.setenv("VLMCOURSE_DATA", str(tmp_path))
    with pytest.raises(DataNotFoundError, match=str(tmp_path)):
        find_data_root()


def test_env_root_is_used(flickr_dir, monkeypatch):
    monkeypatch.setenv("VLMCOURSE_DATA", str(flickr_dir))
    assert find_data_root() == flickr_dir


def test_rows_naming_missing_images_are_left_out_with_a_warning(flickr_dir):
    (flickr_dir / "Images" / "1001_abc.jpg").unlink()
    with pytest.warns(UserWarning, match=r"1 of 8 images are not in .*1001_abc.jpg"):
        ds = Flickr8k("train", root=flickr_dir)
    assert len(ds) == 7 and "1001_abc.jpg" not in ds.image_ids


@pytest.mark.parametrize("line, layout", [("1000_abc.jpg caption without tab", "original"),
                                          ("1000_abc.jpg#0\t   ", "original"),
                                          ("1000_abc.jpg,", "kaggle")])
def test_malformed_rows_name_file_and_line(flickr_dir, line, layout):
    path = flickr_dir / ("Flickr8k.token.txt" if layout == "original" else "captions.txt")
    lines = path.read_text().splitlines()
    lines.insert(3, line)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CaptionFormatError, match=rf"{path.name}:4: expected"):
        read_annotations(flickr_dir, layout)


def test_bad_header_and_bad_json(flickr_dir):
    (flickr_dir / "captions.txt").write_text("file,text\na.jpg,a dog\n")
    with pytest.raises(CaptionFormatError, match="captions.txt:1: expected the header"):
        read_annotations(flickr_dir, "kaggle")
    (flickr_dir / "karpathy" / "dataset_flickr8k.json").write_text('{"images": [\n{"filename": }]}')
    with pytest.raises(CaptionFormatError, match="dataset_flickr8k.json:2: not valid JSON"):
        read_annotations(flickr_dir / "karpathy")


def test_truncated_jpeg_is_skipped_with_a_warning_not_a_crash(flickr_dir):
    path = flickr_dir / "Images" / "1002_abc.jpg"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageLoadError, match="1002_abc.jpg"):
        load_image(path)
    ds = Flickr8k("train", root=flickr_dir)
    with pytest.warns(UserWarning, match="1002_abc.jpg.*1 skipped"):
        batches = list(DataLoader(ds, batch_size=4, collate_fn=collate))
    assert sum(len(b["image_id"]) for b in batches) == 7 and ds.skipped == ["1002_abc.jpg"]
    assert ds.verify() == ["1002_abc.jpg"]


def test_not_an_image_at_all(flickr_dir):
    (flickr_dir / "Images" / "1003_abc.jpg").write_text("not a jpeg")
    with pytest.raises(ImageLoadError, match="1003_abc.jpg"):
        Flickr8k("train", root=flickr_dir).load_image(3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "I;16", "1"])
def test_every_image_mode_becomes_rgb(mode, tmp_path):
    image = Image.new("RGB", (8, 6), (200, 100, 50))
    image = image.convert(mode) if mode != "I;16" else Image.new("I;16", (8, 6), 4000)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (8, 6)


def test_transparent_pixels_become_white_and_files_of_any_mode_load(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    for mode, fmt in (("CMYK", "JPEG"), ("L", "JPEG"), ("P", "PNG"), ("RGBA", "PNG")):
        path = tmp_path / f"x_{mode}.{fmt.lower()}"
        Image.new("RGB", (5, 5), (0, 128, 255)).convert(mode).save(path, format=fmt)
        assert load_image(path).mode == "RGB"


def test_empty_split_is_an_error(flickr_dir):
    (flickr_dir / "Flickr_8k.devImages.txt").write_text("\n")
    with pytest.raises(ValueError, match="split 'dev' .* has no images"):
        Flickr8k("dev", root=flickr_dir)


def test_unknown_split_and_alias(flickr_dir):
    with pytest.raises(ValueError, match="unknown split"):
        Flickr8k("holdout", root=flickr_dir)
    assert len(Flickr8k("val", root=flickr_dir)) == 2


def test_shared_subset_counts(shared_data):
    counts = {s: len(Flickr8k(s, root=shared_data)) for s in ("train", "dev", "test")}
    assert counts == {"train": 646, "dev": 78, "test": 76}
    assert all(len(c) == 5 for c in Flickr8k("test", root=shared_data).captions)
