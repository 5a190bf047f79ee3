"""Flickr8k: photos with five captions each, read from any of the layouts found in the wild.

Layouts (``layout="auto"`` picks the first present, in this order):
- ``karpathy``: ``dataset_flickr8k.json`` (Karpathy's splits; "val" is our "dev")
- ``original``: ``Flickr8k.token.txt`` (``NAME.jpg#K<TAB>caption``) + ``Flickr_8k.{train,dev,test}Images.txt``
- ``kaggle``:   ``captions.txt`` (CSV ``image,caption``), split by the original split files when
  present, else by a stable hash of the file name (75/12.5/12.5).

The data root is, in order: the ``root`` argument, ``$VLMCOURSE_DATA``,
``../shared/flickr8k-subset`` and ``./data/flickr8k`` (beside the project, then
beside the working directory), then the subset downloaded earlier from the Hub (below).

``load_flickr8k(split, profile)`` is the one way in, for notebooks and the CLI alike: the hub profile reads the
full set from the Hugging Face Hub with ``datasets`` (``HubFlickr8k``); any other profile reads a local folder, and
when there is none and the Hub is reachable it first downloads a subset of the size of the shared one (646 / 78 /
76 photos, ``fetch_hub_subset``) into the cache and reads that. Offline with no data it stops with an error that
lists every place it looked. Both kinds of dataset give ``captions``, ``image_ids``, ``load_image(i)`` and
``image_file(i)`` (a local file of the photo); only a local one has ``image_paths``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import stat
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from . import profiles     # profiles.hub_reachable looked up at call time: the tests' Hub fakes replace it
from .profiles import as_profile
from .utils import atomic_dir, cache_dir, progress_bar

DATA_ENV = "VLMCOURSE_DATA"
SPLITS = ("train", "dev", "test")
SPLIT_ALIASES = {"val": "dev", "validation": "dev", "restval": "train"}
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOTS = ("../shared/flickr8k-subset", "data/flickr8k")
CAPTION_FILES = {"karpathy": "dataset_flickr8k.json", "original": "Flickr8k.token.txt", "kaggle": "captions.txt"}
SPLIT_FILES = {s: f"Flickr_8k.{s}Images.txt" for s in SPLITS}
IMAGE_DIRS = ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "images", ".")
HUB_DATASET = "jxie/flickr8k"           # columns image, caption_0 .. caption_4; splits train / validation / test
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
HUB_SUBSET_SIZES = {"train": 646, "dev": 78, "test": 76}    # the shared subset's splits (800 photos)
HUB_SUBSET_MAX_SIDE = 320               # the shared subset's photos: longer side at most 320 px, JPEG quality 90


# ---------------------------------------------------------------- images -> tensors
HALF_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # mean 0.5 and std 0.5 (EfficientNet-Lite): inputs scaled to [-1, 1]
CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


class ImageTransform:
    """PIL image -> (3, S, S) float tensor: resize the short side to S, centre-crop, normalise.

    Plain PIL + NumPy, because there is no CPU build of torchvision to lean on.
    """

    def __init__(self, size: int, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def crop(self, image: Image.Image) -> Image.Image:
        """The resized, centre-cropped RGB image the model sees (useful for drawing on)."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r} (use data.to_rgb)")
        w, h = image.size
        scale = self.size / min(w, h)
        image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                             Image.BICUBIC)
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(self.crop(image), dtype=np.float32) / 255.0
        return (torch.from_numpy(array).permute(2, 0, 1) - self.mean) / self.std

    def __repr__(self):
        return f"ImageTransform(size={self.size})"



class DataNotFoundError(FileNotFoundError):
    """No Flickr8k folder where we looked."""


class CaptionFormatError(ValueError):
    """A caption or split file has a row we cannot read (the message names file and line)."""


class ImageLoadError(OSError):
    """An image file is missing, corrupt or truncated (the message names the file)."""


# ---------------------------------------------------------------- finding the data

def _is_data_root(path: Path) -> bool:
    return any((path / name).is_file() for name in CAPTION_FILES.values())


def find_data_root(root: str | os.PathLike | None = None) -> Path:
    """The Flickr8k folder to use; a clear error listing every place tried when there is none."""
    if root is not None or os.environ.get(DATA_ENV):
        path, source = (Path(root), "the root argument") if root is not None else (Path(os.environ[DATA_ENV]), f"${DATA_ENV}")
        if _is_data_root(path):
            return path
        state = "has none of " + ", ".join(CAPTION_FILES.values()) if path.is_dir() else "does not exist"
        raise DataNotFoundError(f"Flickr8k folder {path} (from {source}) {state}. "
                                f"Point {DATA_ENV} (or the root argument) at a folder with one of those caption files.")
    tried = []
    for base in dict.fromkeys([PROJECT_ROOT, Path.cwd()]):
        for rel in DEFAULT_ROOTS:
            path = (base / rel).resolve()
            if _is_data_root(path):
                return path
            tried.append(str(path))
    subset = hub_subset_root()
    if _is_data_root(subset):
        return subset
    tried.append(str(subset))
    raise DataNotFoundError(
        "no Flickr8k data found. Looked in:\n  " + "\n  ".join(dict.fromkeys(tried)) +
        f"\nSet {DATA_ENV}=/path/to/flickr8k (a folder with captions.txt, Flickr8k.token.txt or "
        f"dataset_flickr8k.json and the photos), or pass root=..., or connect to the internet: load_flickr8k then "
        f"downloads an 800-photo subset from the Hugging Face Hub ({HUB_DATASET}), and the hub profile "
        f"(VLMCOURSE_PROFILE=hub) the full set.")


# ---------------------------------------------------------------- reading annotations

def _image_name(name: str) -> str:
    name = name.strip()
    return name if Path(name).suffix else name + ".jpg"


@contextmanager
def open_annotation(path: Path, newline: str | None = None):
    """An annotation file opened as text: a UTF-8 byte-order mark (common from Windows editors) is skipped, and
    bytes that are not UTF-8 are a CaptionFormatError naming the file, not a UnicodeDecodeError."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            yield f
    except UnicodeDecodeError as error:
        raise CaptionFormatError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} cannot be decoded); "
                                 f"save it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def read_token_file(path: Path) -> dict[str, list[str]]:
    """``NAME.jpg#K<TAB>caption`` lines -> {name: [captions]}."""
    captions: dict[str, list[str]] = {}
    pattern = re.compile(r"^(?P<name>[^#\t]+)#(?P<k>\d+)\t(?P<caption>.*\S.*)$")
    with open_annotation(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            match = pattern.match(line)
            if not match:
                raise CaptionFormatError(f"{path}:{lineno}: expected 'NAME.jpg#K<TAB>caption', got {line[:80]!r}")
            captions.setdefault(_image_name(match["name"]), []).append(match["caption"].strip())
    return captions


def read_kaggle_captions(path: Path) -> dict[str, list[str]]:
    """The Kaggle ``captions.txt`` (CSV with header ``image,caption``) -> {name: [captions]}."""
    captions: dict[str, list[str]] = {}
    with open_annotation(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
            raise CaptionFormatError(f"{path}:1: expected the header 'image,caption', got {header!r}")
        for row in rows:
            lineno = rows.line_num
            if not row or not "".join(row).strip():
                continue
            # Unquoted commas inside a caption split it into more fields: join them back.
            name, caption = (row[0], ",".join(row[1:])) if len(row) >= 2 else (row[0], "")
            if not name.strip() or not caption.strip():
                raise CaptionFormatError(f"{path}:{lineno}: expected 'image,caption' with both filled, got {row!r}")
            captions.setdefault(_image_name(name), []).append(caption.strip())
    return captions


def read_karpathy_json(path: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Karpathy's ``dataset_flickr8k.json`` -> ({name: [captions]}, {split: [names]})."""
    try:
        with open_annotation(path) as f:
            data = json.loads(f.read())
    except json.JSONDecodeError as error:
        raise CaptionFormatError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    captions, splits = {}, {s: [] for s in SPLITS}
    for i, entry in enumerate(data.get("images", []) if isinstance(data, dict) else []):
        try:
            name = _image_name(entry["filename"])
            sents = [s["raw"].strip() if "raw" in s else " ".join(s["tokens"]) for s in entry["sentences"]]
            split = SPLIT_ALIASES.get(entry["split"], entry["split"])
        except (KeyError, TypeError, AttributeError) as error:
            raise CaptionFormatError(f"{path}: images[{i}] lacks {error} (needs filename, split, sentences)") from None
        if split not in splits:
            raise CaptionFormatError(f"{path}: images[{i}] has unknown split {entry['split']!r}")
        sents = [s for s in sents if s.strip()]
        if not sents:       # it would pass loading and crash training at its first batch
            raise CaptionFormatError(f"{path}: images[{i}] ({name}) has no caption (its sentences are empty)")
        captions[name] = sents
        splits[split].append(name)
    if not captions:
        raise CaptionFormatError(f"{path}: no 'images' entries found")
    return captions, splits


def read_split_file(path: Path) -> list[str]:
    """One image name per line (with or without .jpg)."""
    names = []
    with open_annotation(path) as f:
        for lineno, line in enumerate(f, 1):
            name = line.strip()
            if not name:
                continue
            if len(name.split()) != 1:
                raise CaptionFormatError(f"{path}:{lineno}: expected one image name, got {line.strip()[:80]!r}")
            names.append(_image_name(name))
    return names


def hash_split(name: str) -> str:
    """A stable split from the file name alone (for layouts that ship no split)."""
    bucket = int(hashlib.md5(name.encode()).hexdigest(), 16) % 8
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


@dataclass
class Flickr8kIndex:
    """What the annotation files say: captions per image and the image names of each split."""

    root: Path
    layout: str
    image_dir: Path
    captions: dict[str, list[str]]
    splits: dict[str, list[str]]
    duplicates: int = 0     # caption rows dropped because the same image already had that caption


def drop_duplicate_captions(captions: dict[str, list[str]]) -> tuple[dict[str, list[str]], int]:
    """Each image's captions with repeats removed (a repeated row would count twice as a reference), and how many."""
    unique = {name: list(dict.fromkeys(caps)) for name, caps in captions.items()}
    return unique, sum(map(len, captions.values())) - sum(map(len, unique.values()))


def shared_images(splits: dict[str, list[str]]) -> dict[str, list[str]]:
    """{"train and test": [names], ...}: images listed in two splits (in train and test, a leak)."""
    shared = {}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            both = sorted(set(splits[a]) & set(splits[b]))
            if both:
                shared[f"{a} and {b}"] = both
    return shared


def _find_image_dir(root: Path) -> Path:
    for name in IMAGE_DIRS:
        path = root / name
        if path.is_dir() and any(path.glob("*.jpg")):
            return path
    return root / "Images"


def read_annotations(root: str | os.PathLike | None = None, layout: str = "auto") -> Flickr8kIndex:
    root = find_data_root(root)
    if layout == "auto":
        layout = next((k for k, f in CAPTION_FILES.items() if (root / f).is_file()), "kaggle")
    if layout not in CAPTION_FILES:
        raise ValueError(f"unknown layout {layout!r}: choose one of {['auto', *CAPTION_FILES]}")
    path = root / CAPTION_FILES[layout]
    if not path.is_file():
        raise DataNotFoundError(f"layout {layout!r} needs {path}, which does not exist")
    if layout == "karpathy":
        captions, splits = read_karpathy_json(path)
    else:
        captions = read_token_file(path) if layout == "original" else read_kaggle_captions(path)
        if all((root / f).is_file() for f in SPLIT_FILES.values()):
            splits = {s: read_split_file(root / f) for s, f in SPLIT_FILES.items()}
        elif layout == "original":
            missing = [f for f in SPLIT_FILES.values() if not (root / f).is_file()]
            raise DataNotFoundError(f"the original layout needs the split files {missing} in {root}")
        else:
            splits = {s: [] for s in SPLITS}
            for name in sorted(captions):
                splits[hash_split(name)].append(name)
    captions, duplicates = drop_duplicate_captions(captions)
    if duplicates:
        warnings.warn(f"{path}: {duplicates} duplicate caption rows dropped (an image's caption repeated word for "
                      f"word)", stacklevel=2)
    splits = {s: list(dict.fromkeys(names)) for s, names in splits.items()}   # a name listed twice: once
    for pair, names in shared_images(splits).items():
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        if pair == "train and test":
            raise CaptionFormatError(f"{listed}: in both the train and test splits of {root}, a leak that would "
                                     f"inflate every test score; remove them from one split")
        warnings.warn(f"{listed}: in both the {pair} splits of {root}", stacklevel=2)
    return Flickr8kIndex(root, layout, _find_image_dir(root), captions, splits, duplicates)


# ---------------------------------------------------------------- images

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as RGB: grayscale, CMYK and palette converted, transparency laid on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I", "F"):   # 16-bit / float grayscale: rescale to 8 bits
        image = image.point(lambda v: v * (255.0 / max(1.0, image.getextrema()[1])), "F").convert("L")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB; ImageLoadError (naming the file) if it can't be read, is not a
    regular file, or is a decompression bomb (more than ``Image.MAX_IMAGE_PIXELS`` pixels)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):     # a FIFO or a device would block open() or never end
            raise OSError("not a regular file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)    # a few GB of pixels: refuse
            with Image.open(path) as image:
                image.load()    # decode now: a truncated file fails here, not mid-batch
                return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(f"cannot read image {path}: {error}") from None


# ---------------------------------------------------------------- the dataset

class CaptionDataset(Dataset):
    """One split of photos with their captions, as the course reads every dataset (local Flickr8k, the Hub's, the
    shapes world): ``ds[i]`` is ``{"pixel_values", "captions", "image_id"}``, ``ds.load_image(i)`` the photo,
    ``ds.image_file(i)`` a file of it. Here the photos are files in ``image_dir``; ``HubFlickr8k`` reads them from
    the datasets cache instead.

    A photo that turns out corrupt when read is skipped (``ds[i]`` is ``None``, which ``collate`` drops) with a
    warning, and counted in ``ds.skipped``.
    """

    def __init__(self, split: str, image_ids: list[str], captions: list[list[str]], transform=None, root=None,
                 layout: str = "", image_dir: Path | None = None):
        self.split, self.image_ids, self.captions = split, list(image_ids), list(captions)
        self.root, self.layout, self.image_dir = root, layout, image_dir
        self.transform = transform or _default_transform()
        self.skipped: list[str] = []

    @property
    def image_paths(self) -> list[Path]:
        return [self.image_dir / n for n in self.image_ids]

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, i: int) -> Image.Image:
        return load_image(self.image_dir / self.image_ids[i])

    def image_file(self, i: int) -> Path:
        """Photo ``i`` as a file (here the file itself), for code that takes file names; works on hub data too."""
        return self.image_dir / self.image_ids[i]

    def __getitem__(self, i: int):
        try:
            image = self.load_image(i)
        except ImageLoadError as error:
            self.skipped.append(self.image_ids[i])
            warnings.warn(f"{error}; skipped ({len(self.skipped)} skipped so far)", stacklevel=2)
            return None
        return {"pixel_values": self.transform(image), "captions": self.captions[i], "image_id": self.image_ids[i]}

    def verify(self) -> list[str]:
        """Decode every image once (with a progress bar); the ids of those that fail."""

        bad = []
        for i in progress_bar(range(len(self)), desc=f"checking {self.split} images"):
            try:
                self.load_image(i)
            except ImageLoadError:
                bad.append(self.image_ids[i])
        return bad

    def to_hf_dataset(self):
        """This split as a ``datasets.Dataset`` (columns image, captions, image_id)."""
        import datasets

        features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string")),
                                      "image_id": datasets.Value("string")})
        return datasets.Dataset.from_dict({"image": [str(p) for p in self.image_paths], "captions": self.captions,
                                           "image_id": self.image_ids}, features=features)


def check_split(split: str) -> str:
    """The split's name ("val" -> "dev"), or a ValueError naming the choices."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {SPLITS}")
    return split


class Flickr8k(CaptionDataset):
    """One split of Flickr8k from a local folder (either layout; see ``read_annotations``).

    Images named by a caption file but missing on disk are left out with a warning.
    """

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, transform=None,
                 layout: str = "auto", max_images: int | None = None):
        split = check_split(split)
        index = read_annotations(root, layout)
        names = index.splits[split]
        if not names:
            raise ValueError(f"split {split!r} of {index.root} ({index.layout} layout) has no images")
        no_caption = [n for n in names if n not in index.captions]
        missing = [n for n in names if n in index.captions and not (index.image_dir / n).is_file()]
        for problem, bad in (("have no captions", no_caption), (f"are not in {index.image_dir}", missing)):
            if bad:
                warnings.warn(f"Flickr8k {split}: {len(bad)} of {len(names)} images {problem}; "
                              f"left out (first: {', '.join(bad[:3])})", stacklevel=2)
        names = [n for n in names if n in index.captions and n not in set(missing)]
        if not names:
            raise ValueError(f"split {split!r} of {index.root}: none of its images could be found in {index.image_dir}")
        names = names[:max_images] if max_images else names
        super().__init__(split, names, [index.captions[n] for n in names], transform, index.root, index.layout,
                         index.image_dir)

    @classmethod
    def from_hub(cls, split: str = "train", dataset_id: str = HUB_DATASET, transform=None,
                 max_images: int | None = None) -> "HubFlickr8k":
        return HubFlickr8k(split, dataset_id, transform, max_images)

    def __repr__(self):
        return f"Flickr8k(split={self.split!r}, images={len(self)}, root={str(self.root)!r}, layout={self.layout!r})"


def hub_caption_rows(hf, split: str) -> tuple[list[list[str]], list[str]]:
    """(captions, image ids) of a Hub Flickr8k split, whatever its schema: five ``caption_K`` columns (jxie/flickr8k)
    or one ``caption(s)`` column of lists; ids from an ``image_filename``/``filename``/``image_id`` column, else
    ``{split}_{row:05d}``."""
    columns = hf.column_names
    caption_columns = sorted(c for c in columns if re.fullmatch(r"caption_?\d+", c)) or \
        [next((c for c in ("captions", "caption") if c in columns), "caption")]
    rows = hf.remove_columns([c for c in columns if c == "image"]).to_dict()
    captions = [list(c) if isinstance(c, list) else [c] for c in rows[caption_columns[0]]] \
        if len(caption_columns) == 1 else [list(t) for t in zip(*(rows[c] for c in caption_columns))]
    captions = [[c.strip() for c in caps if c and c.strip()] for caps in captions]
    id_column = next((c for c in ("image_filename", "filename", "image_id") if c in columns), None)
    ids = [str(x) for x in rows[id_column]] if id_column else [f"{split}_{i:05d}" for i in range(len(hf))]
    return captions, ids


def _load_hub_split(dataset_id: str, split: str):
    """One split of a Hub dataset with ``datasets.load_dataset`` (its progress bars; cached in the Hugging Face
    datasets cache, so a second call reads the disk); a HubUnavailableError naming the cpu profile when offline."""
    import datasets

    if not profiles.hub_reachable():
        raise profiles.hub_unavailable(f"the dataset {dataset_id}")
    return datasets.load_dataset(dataset_id, split=HUB_SPLITS[split])


class HubFlickr8k(CaptionDataset):
    """Full Flickr8k from the Hugging Face Hub (hub profile), with the same interface as ``Flickr8k`` except
    ``image_paths`` (its photos live in the datasets cache, not in files: use ``load_image`` or ``image_file``)."""

    HUB_SPLITS = HUB_SPLITS

    def __init__(self, split="train", dataset_id=HUB_DATASET, transform=None, max_images=None):
        split = check_split(split)
        self.hf = _load_hub_split(dataset_id, split)
        if max_images:
            self.hf = self.hf.select(range(min(max_images, len(self.hf))))
        captions, image_ids = hub_caption_rows(self.hf, split)
        super().__init__(split, image_ids, captions, transform, dataset_id, "hub")

    @property
    def image_paths(self):
        raise AttributeError("images of a hub dataset have no local paths; use load_image(i) or image_file(i)")

    def load_image(self, i: int) -> Image.Image:
        return to_rgb(self.hf[i]["image"])

    def image_file(self, i: int) -> Path:
        """Photo ``i`` as a JPEG file (written once to the cache), for code that takes file names."""
        name = self.image_ids[i] if Path(self.image_ids[i]).suffix else self.image_ids[i] + ".jpg"
        path = cache_dir("data", "hub-photos", str(self.root).replace("/", "--"), self.split) / name
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            self.load_image(i).save(tmp, format="JPEG", quality=95)
            os.replace(tmp, path)
        return path

    def to_hf_dataset(self):
        return self.hf


def hub_subset_root(dataset_id: str = HUB_DATASET) -> Path:
    """Where ``fetch_hub_subset`` keeps its subset: ``$VLMCOURSE_CACHE/data/<dataset>-subset`` (not created here)."""
    base = Path(os.environ.get("VLMCOURSE_CACHE") or Path.home() / ".cache" / "vlmcourse")
    return base / "data" / f"{dataset_id.replace('/', '--')}-subset"


def subset_rows(total: int, size: int) -> list[int]:
    """The fixed rule that picks the subset: ``size`` rows evenly spaced over the split, row ``k * total // size``
    for k = 0 .. size - 1 (the same rows on every machine, spread over the whole split)."""
    size = min(size, total)          # a split smaller than the subset: all of it
    return [k * total // size for k in range(size)]


def fetch_hub_subset(dataset_id: str = HUB_DATASET, sizes: dict[str, int] | None = None,
                     out: str | os.PathLike | None = None) -> Path:
    """Download Flickr8k from the Hub and keep a subset of it as a local folder in the Kaggle layout
    (``Images/``, ``captions.txt`` and the three split files), shaped like the shared subset: 646 / 78 / 76
    photos (``sizes``) picked by ``subset_rows``, the longer side shrunk to 320 px, JPEG quality 90. Written
    all at once (an interrupted download leaves nothing half done); returns the folder (default
    ``hub_subset_root()``, where ``find_data_root`` looks)."""
    sizes = sizes or HUB_SUBSET_SIZES
    out = Path(out) if out is not None else hub_subset_root(dataset_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        (tmp / "Images").mkdir()
        rows = []
        for split in SPLITS:
            hf = _load_hub_split(dataset_id, split)
            picked = subset_rows(len(hf), sizes[split])
            hf = hf.select(picked)
            captions, ids = hub_caption_rows(hf, split)
            if not any(Path(i).suffix for i in ids):        # jxie/flickr8k has no file names: name by source row
                ids = [f"{split}_{row:05d}" for row in picked]
            names = [_image_name(i) for i in ids]
            for k in progress_bar(range(len(hf)), desc=f"Flickr8k {split} subset from {dataset_id}"):
                image = to_rgb(hf[k]["image"])
                image.thumbnail((HUB_SUBSET_MAX_SIDE, HUB_SUBSET_MAX_SIDE), Image.BICUBIC)
                image.save(tmp / "Images" / names[k], format="JPEG", quality=90)
            rows += [(name, c) for name, caps in zip(names, captions) for c in caps]
            (tmp / SPLIT_FILES[split]).write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        with open(tmp / CAPTION_FILES["kaggle"], "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption"])
            writer.writerows(rows)
        (tmp / "SOURCE.txt").write_text(f"{dataset_id}: rows k * total // size of each split, sizes {sizes}\n")
    return out


def load_flickr8k(split: str = "train", profile=None, transform=None, root=None, max_images=None) -> CaptionDataset:
    """The split's photos and captions, from wherever the profile takes them: the one function every notebook and
    the CLI read Flickr8k through.

    - hub profile (``profile.data`` a dataset id): the full set from the Hub (``HubFlickr8k``);
    - otherwise a local folder (``root``, ``$VLMCOURSE_DATA``, then the places ``find_data_root`` lists); when none
      is found and the Hub is reachable, an 800-photo subset is downloaded once (``fetch_hub_subset``) and read
      from the cache; offline, the DataNotFoundError that lists where it looked.
    """
    profile = as_profile(profile)
    if profile.data == "shapes":          # the synthetic world of shapes.py (data="shapes")
        from .shapes import load_shapes

        return load_shapes(split, transform=transform, max_images=max_images)
    if profile.data == "local" or root is not None:
        if root is None and not os.environ.get(DATA_ENV):
            try:
                root = find_data_root()
            except DataNotFoundError as error:
                if not profiles.hub_reachable():
                    raise DataNotFoundError(f"{error}\n(The Hugging Face Hub is not reachable either, so no "
                                            f"subset could be downloaded.)") from None
                print(f"No Flickr8k folder found: downloading an 800-photo subset of {HUB_DATASET} from the "
                      f"Hugging Face Hub into {hub_subset_root()} (once; about 275 MB to download).", flush=True)
                root = fetch_hub_subset()
        return Flickr8k(split, root=root, transform=transform, max_images=max_images)
    return Flickr8k.from_hub(split, profile.data, transform=transform, max_images=max_images)


def _default_transform():
    return ImageTransform(224)   # [0, 1] RGB, no normalisation


def collate(items: list[dict | None]) -> dict:
    """Stack a batch, dropping items that could not be read (``None``)."""
    items = [item for item in items if item is not None]
    if not items:
        return {"pixel_values": torch.empty(0), "captions": [], "image_id": []}
    return {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "captions": [item["captions"] for item in items],
            "image_id": [item["image_id"] for item in items]}
