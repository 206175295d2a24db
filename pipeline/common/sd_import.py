"""Stable Diffusion models from outside: a diffusers folder (model_index.json) or a single-file checkpoint
(.safetensors, or a .ckpt read weights-only) for SD 1.x, 2.x and SDXL, local or s3://. A single file is turned into a
diffusers folder once (kept under the cache, keyed by the file's content), so everything downstream reads folders."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ldm.convert.sd_folder import SDModel, is_pipeline_folder, read_pipeline
from pipeline.common import storage


def cache_root() -> Path:
    return Path(os.environ.get("LDM_CACHE", Path.home() / ".cache" / "ldm-ray"))


def is_sd(path: str) -> bool:
    """Whether `path` names a Stable Diffusion model (a diffusers folder or a single file) rather than an export."""
    if storage.is_remote(path):
        if storage.exists(storage.join(path, "model_index.json")):
            return True
        if not _single_file_suffix(path):
            return False
        from pipeline.common.models import local_file
        return not _ours(Path(local_file(path)))  # copied once into the cache: the copy a load would read anyway
    p = Path(path)
    return (p.is_dir() and is_pipeline_folder(p)) or (p.is_file() and _single_file_suffix(path) and not _ours(p))


def _single_file_suffix(path: str) -> bool:
    return path.endswith((".safetensors", ".ckpt"))


def _ours(path: Path) -> bool:
    """An ldm-ray export or first stage (our safetensors format), not a Stable Diffusion single file."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("format", "").startswith("ldm-ray")


def resolve_sd(path: str, tokenizers: tuple[str, ...] = (), prediction: str = "") -> Path:
    """A local diffusers folder for a Stable Diffusion model: the folder itself, an s3:// folder copied once, or a
    single file converted once into $LDM_CACHE/imported/<sha256>/ (written under a temporary name, then renamed)."""
    from ldm.text_encoders import resolve_local_dir
    if storage.is_remote(path) and not _single_file_suffix(path):
        return Path(resolve_local_dir(path))
    local = Path(path) if not storage.is_remote(path) else Path(resolve_local_dir(path.rsplit("/", 1)[0])) / \
        path.rsplit("/", 1)[1]
    if local.is_dir():
        if not is_pipeline_folder(local):
            raise FileNotFoundError(f"{path} is a folder without model_index.json: not a diffusers pipeline folder")
        return local
    if not local.exists():
        raise FileNotFoundError(f"Stable Diffusion checkpoint {path!r} does not exist")
    from ldm.convert.single_file import to_pipeline
    dest = cache_root() / "imported" / f"{storage.sha256_files(local)[:16]}{('-' + prediction) if prediction else ''}"
    if not (dest / "model_index.json").exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        to_pipeline(local, tmp, list(tokenizers), prediction)
        if not dest.exists():
            tmp.replace(dest)
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def import_sd(path: str, tokenizers: tuple[str, ...] = (), prediction: str = "") -> SDModel:
    """The model behind `path` in our terms (config, weights, published latent scale, text encoder folders)."""
    return read_pipeline(resolve_sd(path, tokenizers, prediction))
