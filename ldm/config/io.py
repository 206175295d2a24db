"""Configs in and out: YAML files and dicts with type checking, `key=value` overrides from the command line, a
stable hash, and `load_config` (a preset, then a YAML file, then overrides, then validated)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import yaml

from ldm.config.presets import get_preset
from ldm.config.schema import ConfigError, LDMConfig



def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Turn a YAML/JSON value into the annotated type `tp`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


def config_hash(cfg: Any) -> str:
    """Stable identity of a config (used to match a latent cache to its autoencoder)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(path: str | Path, cls: type = None) -> Any:
    data = yaml.safe_load(Path(path).read_text()) or {}
    cls = cls or LDMConfig
    return from_dict(cls, data)


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """`["unet.model_channels=64", "diffusion.parameterization=v"]` -> a new frozen config."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. unet.model_channels=64")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        cfg = _set(cfg, key.strip().split("."), value, key)
    return cfg


def _set(cfg: Any, path: list[str], value: Any, full: str) -> Any:
    hints = typing.get_type_hints(type(cfg))
    name = path[0]
    if name not in hints:
        raise ConfigError(f"override {full!r}: {type(cfg).__name__} has no field {name!r}; "
                          f"valid: {sorted(hints)}")
    if len(path) == 1:
        return replace(cfg, **{name: _coerce(hints[name], value, full)})
    sub = getattr(cfg, name)
    if not dataclasses.is_dataclass(sub):
        raise ConfigError(f"override {full!r}: {name!r} is not a section")
    return replace(cfg, **{name: _set(sub, path[1:], value, full)})


def format_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip()


def load_config(preset: str = "", yaml_path: str = "", overrides: list[str] | tuple[str, ...] = (),
                base: LDMConfig | None = None) -> LDMConfig:
    """Preset (or a `base` config, e.g. an imported model's), then a YAML file on top (whole sections or single keys),
    then key=value overrides."""
    if not preset and not yaml_path and base is None:
        raise ConfigError("give a preset name or a YAML config file")
    cfg = get_preset(preset) if preset else (base or LDMConfig())
    if yaml_path:
        data = yaml.safe_load(Path(yaml_path).read_text()) or {}
        cfg = apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in flatten(data)])
    return apply_overrides(cfg, overrides).validate()


def flatten(d: dict, prefix: str = ""):
    """{"unet": {"model_channels": 64}} -> ("unet.model_channels", 64), ..."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
