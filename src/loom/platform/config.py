"""Typed, frozen job configs: help beside each field, validation that names the field, dotted overrides, recipes.

A job config is a tree of frozen, keyword-only dataclasses. Leaves are ``int``, ``float``, ``bool``, ``str``,
``Optional`` of those, or tuples of them. ``--set a.b=value`` parses ``value`` as YAML and checks it against the
field's declared type, so a typo in a key or a wrong type is refused with the dotted name, never ignored.

Recipes are small functions registered per job class that return a config differing from the defaults by a few
fields (torchtitan's config registry). ``resolve(JobClass, recipe, overrides)`` is the one way configs are made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key was refused. The message names the dotted field and says what is allowed."""


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING, **kw) -> Any:
    """A dataclass field with help text (shown by ``loom ... --help-config`` and written in docs)."""
    md = {"help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=md, **kw)
    return dataclasses.field(default=default, metadata=md, **kw)


def config(cls: type[T]) -> type[T]:
    """Decorator: a frozen, keyword-only dataclass."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


def require(cond: bool, name: str, value: Any, what: str) -> None:
    """Validation helper for ``__post_init__``: raise ConfigError naming the field if ``cond`` is false."""
    if not cond:
        raise ConfigError(f"{name}={value!r} is invalid: {what}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check (and lightly convert: int -> float, list -> tuple) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}={value!r} matches none of {tp}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not one of {list(allowed)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} should be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{name}={value!r} should have {len(args)} items")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if _is_config(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name} should be a mapping of fields of {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} should be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} should be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} should be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} should be a string")
        return value
    raise ConfigError(f"{name}: unsupported field type {tp}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a nested mapping, refusing unknown keys by their dotted name."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) for JSON/YAML/MLflow."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def override(cfg: T, key: str, value: Any, _prefix: str = "") -> T:
    """A copy of ``cfg`` with the dotted field ``key`` set to ``value`` (type-checked and validated)."""
    head, _, rest = key.partition(".")
    full = _prefix + head
    names = {f.name: f for f in dataclasses.fields(cfg)}
    if head not in names:
        raise ConfigError(f"unknown config key {_prefix + key!r}: {type(cfg).__name__} has {sorted(names)}")
    tp = _hints(type(cfg))[head]
    if rest:
        sub = getattr(cfg, head)
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"{_prefix + key!r}: {full} is a value, not a section")
        new = override(sub, rest, value, _prefix=full + ".")
    else:
        new = _coerce(value, tp, full)
    return dataclasses.replace(cfg, **{head: new})


def parse_set(items: Iterable[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``[("a.b", 1), ("c", [1, 2])]``; values are YAML."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set render.frames=61")
        try:
            val = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
        out.append((key.strip(), val))
    return out


def config_hash(cfg: Any, exclude: Iterable[str] = ()) -> str:
    """sha256 of the canonical JSON of the config, less the top-level keys in ``exclude`` (e.g. output paths that
    do not change what a task produces)."""
    d = to_dict(cfg)
    for k in exclude:
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every leaf field: the source of ``--help-config``."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_config(tp):
            rows += describe(tp, prefix + f.name + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((prefix + f.name, json.dumps(to_dict(default)), f.metadata.get("help", "")))
    return rows


_RECIPES: dict[type, dict[str, Callable[[], Any]]] = {}


def recipe(job_cls: type, name: str, help: str = "") -> Callable[[Callable[[], T]], Callable[[], T]]:
    """Register a named recipe: a zero-argument function returning a ``job_cls`` instance."""

    def deco(fn: Callable[[], T]) -> Callable[[], T]:
        fn.__doc__ = fn.__doc__ or help
        _RECIPES.setdefault(job_cls, {})[name] = fn
        return fn

    return deco


def recipes(job_cls: type) -> dict[str, Callable[[], Any]]:
    return dict(_RECIPES.get(job_cls, {}))


def resolve(job_cls: type[T], recipe_name: str = "default", overrides: Iterable[tuple[str, Any]] = ()) -> T:
    """The config a job runs with: the recipe, then each override in order."""
    known = _RECIPES.get(job_cls, {})
    if recipe_name not in known:
        raise ConfigError(f"unknown recipe {recipe_name!r} for {job_cls.__name__}; known: {sorted(known)}")
    cfg = known[recipe_name]()
    for key, value in overrides:
        cfg = override(cfg, key, value)
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load_yaml(job_cls: type[T], path: str) -> T:
    """A config from a YAML file (e.g. the ``config.yaml`` a job writes): every key checked as ``--set`` would."""
    from loom.platform import storage

    try:
        data = yaml.safe_load(storage.read_bytes(path).decode())
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of config fields, got {type(data).__name__}")
    return from_dict(job_cls, data)

