"""vlmcourse: build a BLIP-2-style vision-language model piece by piece."""
from .profiles import Profile, get_profile
from .utils import cache_dir, notebook_figures, peak_memory_mb, seed_everything, show_table

__version__ = "0.1.0"
__all__ = ["Profile", "get_profile", "cache_dir", "notebook_figures", "peak_memory_mb", "seed_everything", "show_table", "caption"]


def __getattr__(name: str):
    # vlmcourse.caption(images, model_dir) without importing the LoRA captioner (peft, transformers) with the package
    if name == "caption":
        from .lora import caption

        return caption
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
