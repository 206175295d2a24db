"""--init-from: where a new run's weights start. A Stable Diffusion model (a diffusers folder or a single file: its
UNet, and its EMA where a single file keeps one) or an ldm-ray export (UNet, EMA UNet, trained tau_theta). The
config comes with it unless --preset names one, and the weights must fit the run's config exactly."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.config import LDMConfig
from pipeline.common import storage


@dataclass(frozen=True)
class InitFrom:
    """The weights a run starts from: the model's module weights (`unet.*`, `cond_stage.*`) and their EMA."""
    config: LDMConfig
    weights: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    source: str
    sha256: str


def _digest(path: Path) -> str:
    """sha256 of a file, or of a folder's weight files in name order (what identifies the source's weights)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin"))
    return storage.sha256_files(*files)


def load_init(path: str, tracking_uri: str = "") -> InitFrom:
    """The starting point named by --init-from (local, s3:// or an MLflow model URI)."""
    from ldm.checkpoint import load_components
    from ldm.config import from_dict
    from pipeline.common.models import local_file
    from pipeline.common.sd_import import import_sd, is_sd, resolve_sd
    if is_sd(path):
        m = import_sd(path)
        weights = {f"unet.{k}": v for k, v in m.unet.items()}
        return InitFrom(m.cfg, weights, weights, path, _digest(resolve_sd(path)))
    local = local_file(path, tracking_uri)
    comps, config, _ = load_components(local)
    weights = {f"{name}.{k}": v for name in ("unet", "cond_stage") for k, v in comps.get(name, {}).items()}
    ema = {f"{name[4:]}.{k}": v for name in ("ema_unet", "ema_cond_stage") for k, v in comps.get(name, {}).items()}
    return InitFrom(from_dict(LDMConfig, config), weights, ema or weights, path, _digest(Path(local)))


def check_fits(init: InitFrom, cfg: LDMConfig) -> None:
    """The starting weights must be the run's model, key for key and shape for shape (checked on the meta device)."""
    from ldm.config import ConfigError
    from ldm.model import LatentDiffusion
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in LatentDiffusion(cfg).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in init.weights.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or wrong:
        raise ConfigError(f"--init-from {init.source} does not fit the run's model: {len(missing)} weight(s) missing "
                          f"(e.g. {missing[:2]}), {len(extra)} unexpected ({extra[:2]}), {len(wrong)} of another shape "
                          f"({[(k, have[k], want[k]) for k in wrong[:2]]}). Leave --preset out to train the imported "
                          f"model's own config, or give the preset and overrides it was made with")
