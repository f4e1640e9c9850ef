"""Checks of what `stgr train` and `stgr eval` are given, before Ray, a model or a dataset is loaded.

Each mistake found here would otherwise surface minutes later, deep in a Ray worker or in
`from_pretrained`, as a screen of traceback (a model that is neither a folder nor in the cache ends
in the Hub's connection error, offline). Here it is one line naming the option, and exit 2.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.errors import InputError

#: What a Hugging Face Hub repository id looks like (`Qwen/Qwen2.5-VL-7B-Instruct`); anything else
#: given as a model is meant as a folder.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model(path: str, revision: str | None, key: str) -> None:
    """`path` is a checkpoint folder, or a Hub id that `from_pretrained` can load: in the local cache,
    or on a Hub that answers. InputError naming `key` otherwise."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise InputError(f"{key}: {path} holds no config.json; give a checkpoint folder (save_pretrained's "
                             "output, e.g. a training run's final/)")
        return
    if local.exists():
        raise InputError(f"{key}: {path} is a file, not a checkpoint folder")
    if not HUB_ID.match(path) or path.startswith(("./", "../", "~")):
        raise InputError(f"{key}: {path}: no such checkpoint folder")
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json", revision=revision), str):
        return
    hint = f"pass {key}{' ' if key.startswith('-') else '='}DIR of a checkpoint (`stgr tiny-model DIR` writes a tiny one for a smoke run)"
    if constants.HF_HUB_OFFLINE:
        raise InputError(f"{key}: {path} is neither a local folder nor in the Hugging Face cache, and the Hub is "
                         f"off (HF_HUB_OFFLINE); {hint}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(path, revision=revision, timeout=10)
    except GatedRepoError:
        return  # it exists; from_pretrained says what access it needs
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise InputError(f"{key}: {path} is neither a local folder nor a model on the Hugging Face Hub; {hint}") from None
    except Exception as exc:  # noqa: BLE001 - the HTTP client's connection errors and timeouts
        raise InputError(f"{key}: {path} is neither a local folder nor in the Hugging Face cache, and the Hub "
                         f"cannot be reached ({exc}); {hint}") from None


def check_data(path: str, key: str) -> None:
    """A local file or folder that exists (every evaluation format is read from one)."""
    if "://" not in path and not os.path.exists(path):
        raise InputError(f"{key} {path}: no such file or directory")


def check_output_dir(path: str, key: str) -> None:
    """A folder to write in: new or existing, not a file."""
    if os.path.isfile(path):
        raise InputError(f"{key} {path}: is a file; give a directory (created if missing)")
