"""Strict, typed loading of YAML into frozen dataclasses.

mitmproxy silently ignores unknown option names; a security gateway must not do the same with
its own config. Every problem (unknown key, wrong type, missing value, invalid regex, unavailable
secret) is collected with the file and the key path that caused it, so one run reports them all.

Sections are plain dataclasses. Field types drive validation; per-field documentation lives in
`setting(doc=...)` so the config reference is generated from the code and cannot drift.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import regex
import yaml

from sluicegate.secrets import SecretRef, SecretUnavailable
from sluicegate.strict_yaml import StrictLoader


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, located by file and key path."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        location = f"{self.file}: {self.path}" if self.path else self.file
        return f"{location}: {self.message}"


class ConfigError(Exception):
    """A config file could not be loaded; `problems` says every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def setting(default: Any = dataclasses.MISSING, *, doc: str, factory: Any = None) -> Any:
    """Declare a config field with its documentation (and default, if it is optional)."""
    metadata = {"doc": doc}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Regex(str):
    """A config string that must compile as a pattern of the `regex` module."""


# The strict loader (duplicate keys are errors) is shared with the rule files.
_StrictLoader = StrictLoader


def read_yaml(file: Path) -> Any:
    """Parse a YAML file strictly; errors become a ConfigError naming the file and line."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8"
        raise ConfigError([Problem(str(file), "", f"cannot read file ({reason})")]) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([Problem(str(file), where, f"invalid YAML: {problem}")]) from None


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


class Parser:
    """Converts parsed YAML into typed dataclasses, collecting every problem on the way."""

    def __init__(self, file: Path, base_dir: Path | None = None) -> None:
        self.file = file
        self.base_dir = base_dir if base_dir is not None else file.parent
        self.problems: list[Problem] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(str(self.file), path, message))

    def parse(self, tp: Any, value: Any, path: str) -> Any:
        """Return `value` converted to `tp`, or None after recording a problem."""
        origin = get_origin(tp)
        if origin in (Union, types.UnionType):
            options = [a for a in get_args(tp) if a is not type(None)]
            if value is None:
                if len(options) < len(get_args(tp)):
                    return None
                self.problem(path, "must not be empty")
                return None
            if len(options) == 1:
                return self.parse(options[0], value, path)
            raise TypeError(f"unsupported union {tp}")  # schema bug, not a config problem
        if value is None:
            self.problem(path, "must not be empty")
            return None
        if origin is Literal:
            choices = get_args(tp)
            if value not in choices:
                listed = ", ".join(repr(c) for c in choices)
                self.problem(path, f"must be one of {listed}, not {value!r}")
                return None
            return value
        if origin is list or origin is tuple:
            if not isinstance(value, list):
                self.problem(path, "must be a list")
                return None
            (item_type, *_) = get_args(tp)
            items = [self.parse(item_type, v, join(path, i)) for i, v in enumerate(value)]
            return tuple(items)
        if origin is dict or origin is Mapping:
            _, value_type = get_args(tp)
            if not isinstance(value, dict):
                self.problem(path, "must be a mapping")
                return None
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    self.problem(path, f"keys must be strings, not {k!r}")
                    continue
                out[k] = self.parse(value_type, v, join(path, k))
            return types.MappingProxyType(out)
        if tp is SecretRef:
            return self.parse_secret(value, path)
        if tp is Path:  # relative paths are resolved against the config file's directory
            if not isinstance(value, str) or not value:
                self.problem(path, "must be a file path (string)")
                return None
            p = Path(os.path.expanduser(value))
            return p if p.is_absolute() else (self.base_dir / p).resolve()
        if tp is Regex:
            if not isinstance(value, str):
                self.problem(path, "must be a regular expression (string)")
                return None
            try:
                regex.compile(value)
            except regex.error as e:
                self.problem(path, f"invalid regular expression: {e}")
                return None
            return Regex(value)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.parse_dataclass(tp, value, path)
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.problem(path, f"must be {_TYPE_NAMES[float]}, not {_describe(value)}")
                return None
            return float(value)
        if tp in (str, int, bool):
            if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
                self.problem(path, f"must be {_TYPE_NAMES[tp]}, not {_describe(value)}")
                return None
            return value
        raise TypeError(f"unsupported schema type {tp!r}")  # schema bug, not a config problem

    def parse_secret(self, value: Any, path: str) -> SecretRef | None:
        if isinstance(value, str):
            self.problem(
                path,
                "secrets must not be inlined in the config: use {env: VAR_NAME} or {file: PATH}",
            )
            return None
        if not isinstance(value, dict):
            self.problem(path, "must be {env: VAR_NAME} or {file: PATH}")
            return None
        unknown = sorted(set(value) - {"env", "file"})
        if unknown or len(value) != 1:
            self.problem(path, "must have exactly one of 'env' or 'file'")
            return None
        if "env" in value:
            name = value["env"]
            if not isinstance(name, str) or not name:
                self.problem(join(path, "env"), "must be an environment variable name")
                return None
            ref = SecretRef(env=name)
        else:
            file = self.parse(Path, value["file"], join(path, "file"))
            if file is None:
                return None
            ref = SecretRef(file=file)
        try:
            ref.read()
        except SecretUnavailable as e:
            self.problem(path, f"secret unavailable: {e}")
        return ref

    def parse_dataclass(self, cls: type, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            self.problem(path, f"must be a mapping, not {_describe(value)}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = [k for k in value if k not in fields]
        for key in unknown:
            hint = _closest(str(key), fields)
            suggestion = f" (did you mean {hint!r}?)" if hint else ""
            known = ", ".join(sorted(fields))
            self.problem(join(path, str(key)), f"unknown key{suggestion}; known keys: {known}")
        kwargs = {}
        before = len(self.problems)
        for name, field in fields.items():
            if name in value:
                kwargs[name] = self.parse(hints[name], value[name], join(path, name))
            elif (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                self.problem(join(path, name), "required key is missing")
        if len(self.problems) > before or unknown:
            return None
        try:
            obj = cls(**kwargs)
        except ValueError as e:  # __post_init__ cross-field checks
            self.problem(path, str(e))
            return None
        check = getattr(obj, "check", None)
        if check is not None:
            for item in check(self):
                if isinstance(item, Problem):  # located in another file (e.g. a rule file)
                    self.problems.append(item)
                    continue
                sub, message = item
                self.problem(join(path, sub) if sub else path, message)
        return obj


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.75)
    return matches[0] if matches else None


Check = Callable[[Parser], Iterable[tuple[str, str] | Problem]]


def reference(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, doc) for every field, recursively: the config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key = join(prefix, field.name)
        tp = hints[field.name]
        default = _default_text(field)
        rows.append((key, _type_text(tp), default, field.metadata.get("doc", "")))
        inner = _dataclass_inside(tp)
        if inner is not None:
            sub = f"{key}[]" if get_origin(_strip_optional(tp)) in (list, tuple) else key
            rows.extend(reference(inner, sub))
    return rows


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _dataclass_inside(tp: Any) -> type | None:
    tp = _strip_optional(tp)
    if get_origin(tp) in (list, tuple):
        tp = get_args(tp)[0]
    if dataclasses.is_dataclass(tp) and tp is not SecretRef:
        return tp  # type: ignore[return-value]
    return None


def _type_text(tp: Any) -> str:
    tp_s = _strip_optional(tp)
    optional = tp_s is not tp
    origin = get_origin(tp_s)
    if origin is Literal:
        text = " | ".join(str(a) for a in get_args(tp_s))
    elif origin in (list, tuple):
        text = f"list of {_type_text(get_args(tp_s)[0])}"
    elif origin in (dict, Mapping):
        text = f"mapping of {_type_text(get_args(tp_s)[1])}"
    elif tp_s is SecretRef:
        text = "secret ({env: NAME} or {file: PATH})"
    elif tp_s is Path:
        text = "path"
    elif tp_s is Regex:
        text = "regex"
    elif dataclasses.is_dataclass(tp_s):
        text = "mapping"
    else:
        text = getattr(tp_s, "__name__", str(tp_s))
    return f"{text} (optional)" if optional else text


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(see below)"
    if isinstance(value, tuple):
        value = [str(v) if isinstance(v, Path) else v for v in value]
    if isinstance(value, Path):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
