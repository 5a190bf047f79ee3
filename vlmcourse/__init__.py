"""vlmcourse: build a BLIP-2-style vision-language model piece by piece."""
from .profiles import Profile, get_profile
from .utils import cache_dir, peak_memory_mb, seed_everything, show_table

__version__ = "0.1.0"
__all__ = ["Profile", "get_profile", "cache_dir", "peak_memory_mb", "seed_everything", "show_table"]
