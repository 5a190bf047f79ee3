import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("MPLBACKEND", "Agg")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k-subset"


def make_photo(path: Path, seed: int, size=(80, 60), mode="RGB"):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array).convert(mode)
    image.save(path, format="PNG" if mode in ("RGBA", "P", "LA") else "JPEG")


@pytest.fixture(autouse=True, scope="session")
def float32_training():
    """Training tests assert thresholds measured in float32 (on CPUs without bf16; CI's has it): on a CPU or
    GPU with bf16, train there in float32 too, unless a test asks for bf16 itself (TrainConfig(bf16=True)).
    Session-wide, so that module fixtures that train (test_shapes.py's models) see it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLMCOURSE_BF16", "0")
        yield


@pytest.fixture
def flickr_dir(tmp_path):
    """A Flickr8k folder in all three layouts: 8 train, 2 dev, 2 test images, 5 captions each."""
    images = tmp_path / "Images"
    images.mkdir()
    names = [f"{1000 + i}_abc.jpg" for i in range(12)]
    for i, name in enumerate(names):
        make_photo(images / name, i)
    captions = {n: [f"photo {i} caption {k} , with a comma" for k in range(5)] for i, n in enumerate(names)}
    splits = {"train": names[:8], "dev": names[8:10], "test": names[10:]}
    with open(tmp_path / "Flickr8k.token.txt", "w") as f:
        for n, caps in captions.items():
            for k, c in enumerate(caps):
                f.write(f"{n}#{k}\t{c}\n")
    with open(tmp_path / "captions.txt", "w") as f:
        f.write("image,caption\n")
        for n, caps in captions.items():
            for c in caps:
                f.write(f'{n},"{c}"\n')
    for split, members in splits.items():
        # the original split files name images with .jpg; strip it on one to check both forms
        lines = [m if k else m.removesuffix(".jpg") for k, m in enumerate(members)]
        (tmp_path / f"Flickr_8k.{split}Images.txt").write_text("\n".join(lines) + "\n")
    karpathy = {"images": [{"filename": n, "split": {"dev": "val"}.get(s, s),
                            "sentences": [{"raw": c, "tokens": c.split()} for c in captions[n]]}
                           for s, members in splits.items() for n in members]}
    (tmp_path / "karpathy").mkdir()
    (tmp_path / "karpathy" / "dataset_flickr8k.json").write_text(json.dumps(karpathy))
    (tmp_path / "karpathy" / "Images").symlink_to(images)
    return tmp_path


@pytest.fixture
def shared_data():
    if not (SHARED / "Flickr8k.token.txt").is_file():
        pytest.skip(f"the shared Flickr8k subset is not at {SHARED}")
    return SHARED


def pytest_collection_modifyitems(config, items):
    """The browser test runs notebook 07, which needs the stage-1 model notebook 04 trains: run it last, after
    the notebooks (pytest's testpaths put tests/ first)."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_browser.py"))
