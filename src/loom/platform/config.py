"""Typed, frozen job configs: help beside each field, validation that names the field, dotted overrides, recipes.

A job config is a tree of frozen, keyword-only dataclasses. Leaves are ``int``, ``float``, ``bool``, ``str``,
``Optional`` of those, or tuples of them. ``--set a.b=value`` parses ``value`` as YAML and checks it against the
field's declared type, so a typo in a key or a wrong type is refused with the dotted name, never ignored.

Recipes are small functions registered per job class that return a config differing from the defaults by a few
fields (torchtitan's config registry). ``resolve(JobClass, recipe, overrides)`` is the one way configs are made.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key was refused. The message names the dotted field and says what is allowed.

    ``field`` is the name the error is about. A section's ``__post_init__`` only knows its own field names
    (``require(..., "devices", ...)``); :func:`override` and :func:`from_dict` know where the section sits and
    qualify the name (``trainer.devices``), so the error names what the user typed."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field if field is not None else _leading_field(message)

    def qualified(self, prefix: str) -> ConfigError:
        """This error named from the root: ``prefix`` (``"trainer."``) before a bare field name. A name that is
        dotted already (a section that wrote ``ray.workers`` itself) is left as it is."""
        name = self.field
        if not prefix or not name or "." in name.split("[")[0]:
            return self
        full = prefix + name
        msg = str(self)
        msg = prefix + msg if msg.startswith(name) else f"{full}: {msg}"
        return ConfigError(msg, field=full)


def _leading_field(message: str) -> str | None:
    """The field a hand-written message starts with (``"prompt='x' is invalid ..."`` -> ``prompt``)."""
    m = re.match(r"([A-Za-z_][\w.]*(?:\[\d+\])?)(?==)", message)
    return m.group(1) if m else None


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
        raise ConfigError(f"{name}={value!r} is invalid: {what}", field=name)


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
        hints_ = "; ".join(unknown_key_hint(cls, prefix + k, prefix, data[k]) for k in unknown)
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}: {hints_}",
                          field=prefix + unknown[0])
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.qualified(prefix) from None
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
        raise ConfigError(f"unknown config key {_prefix + key!r}: "
                          f"{unknown_key_hint(type(cfg), _prefix + key, _prefix)}", field=_prefix + key)
    tp = _hints(type(cfg))[head]
    if rest:
        sub = getattr(cfg, head)
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"{_prefix + key!r}: {full} is a value, not a section", field=_prefix + key)
        new = override(sub, rest, value, _prefix=full + ".")
    else:
        new = _coerce(value, tp, full)
    try:
        return dataclasses.replace(cfg, **{head: new})
    except ConfigError as e:  # the section's own validation knows only its bare field names
        raise e.qualified(_prefix) from None


# Keys renamed by the restructure of issue 15 (one ``ray`` section for every job). Old config.yaml files and old
# habits get "X was renamed Y" instead of a bare "unknown key". A section entry renames every key under it.
RENAMED = {
    "cluster": "ray",
    "parallel": "ray",
    "launch.ray_address": "ray.address",
    "launch.num_workers": "ray.workers",
    "launch.use_gpu": "ray.gpus_per_worker",
    "launch.cpus_per_worker": "ray.cpus_per_worker",
    "launch.max_failures": "trainer.max_failures",
}
_RENAME_NOTES = {"launch.use_gpu": " (a number of GPUs per worker: use_gpu=true is ray.gpus_per_worker=1)"}


def renamed(key: str) -> str | None:
    """The new name of an old dotted key (``cluster.workers`` -> ``ray.workers``), or None."""
    if key in RENAMED:
        return RENAMED[key]
    head, _, rest = key.partition(".")
    if head in RENAMED and "." not in RENAMED[head]:
        return RENAMED[head] + ("." + rest if rest else "")
    return None


def dotted_names(cls: type, prefix: str = "") -> list[str]:
    """Every section and leaf of ``cls`` by its dotted name (``trainer``, ``trainer.devices``, ...)."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        if _is_config(hints[f.name]):
            out += dotted_names(hints[f.name], prefix + f.name + ".")
    return out


def suggest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Close matches of the dotted ``word`` among ``candidates``: a field of the same section with a similar name
    (difflib on the last part, so a shared ``trainer.`` does not make every field look close), the same field in
    another section (``devices`` -> ``trainer.devices``), then a similar whole name (``orbt.frames``)."""
    candidates = list(candidates)
    parent, _, tail = word.rpartition(".")
    siblings = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == parent}
    close = [siblings[t] for t in difflib.get_close_matches(tail, list(siblings), n=n, cutoff=0.6)]
    same_tail = [c for c in candidates if c != word and c.rpartition(".")[2] == tail]
    whole = difflib.get_close_matches(word, candidates, n=n, cutoff=0.8)
    return list(dict.fromkeys(close + same_tail + whole))[:n]


def unknown_key_hint(cls: type, key: str, prefix: str = "", value: Any = None) -> str:
    """What to say about the unknown dotted ``key`` met in the section ``cls`` (at ``prefix``): its new name if
    it was renamed, else the closest known names, else the section's fields."""
    if not prefix:
        known = set(dotted_names(cls))
        olds = [key] if renamed(key) or not isinstance(value, dict) else [f"{key}.{k}" for k in value]
        moves = [(old, renamed(old)) for old in olds]
        moves = [(old, new) for old, new in moves if new and new.split(".")[0] in known]
        if moves:
            return ", ".join(f"{old!r} was renamed {new!r}{_RENAME_NOTES.get(old, '')}" for old, new in moves)
    close = suggest(key, dotted_names(cls, prefix))
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"{prefix.rstrip('.') or cls.__name__} has {sorted(f.name for f in dataclasses.fields(cls))}"


def diff(a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """(dotted field, value in ``a``, value in ``b``) for every leaf where two configs of one class differ."""
    out: list[tuple[str, Any, Any]] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in dict.fromkeys([*x, *y]):
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
        elif x != y:
            out.append((prefix.rstrip("."), x, y))

    walk(to_dict(a), to_dict(b), "")
    return out


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


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every leaf field: the source of ``--help-config``. A section's defaults are
    those of the instance its parent makes (``ray`` defaults to 2 workers in training, 1 in evaluation)."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        if _is_config(tp):
            rows += describe(tp, prefix + f.name + ".", default if isinstance(default, tp) else None)
            continue
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
    # The last value of each key wins; keys are applied in order, and one refused by a check across fields
    # (flow.method=raft before flow.raft_weights) is tried again once the others are in, so the order of --set
    # flags does not matter. A key refused in every pass raises its own error.
    last = {key: value for key, value in overrides}
    pending = list(last.items())
    while pending:
        left, first = [], None
        for key, value in pending:
            try:
                cfg = override(cfg, key, value)
            except ConfigError as e:
                left.append((key, value))
                first = first or e
        if len(left) == len(pending):
            raise first
        pending = left
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
    try:
        return from_dict(job_cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", field=e.field) from None

