"""Settings as dataclasses whose fields are command-line flags, `--config` file keys and run_config.json entries.

A field declared with `setting(default, help, ...)` carries everything about that setting in one place: its
default, its help text, its choices, the check of its value, and whether it is part of a run's identity (a
setting that changes the data order or the math, so `--resume` refuses a different value). A settings class may
hold another one (`nested(LossSettings)`): its fields become flags of their own, flat, so `LossSettings.beta` is
`--beta` and the key `beta` in a config file.

Each settings class calls `check_settings(self)` in `__post_init__`, so a bad value is rejected in one place
whatever builds the object (flags, a config file, Python code), with a message that names the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from dpo.errors import UserError

Check = Callable[[Any], "str | None"]  # value -> what is wrong with it ("must be positive"), or None


class ConfigError(UserError):
    """A setting that cannot work, reported before any work starts."""


def setting(default: Any, help: str, *, choices: list[str] | tuple[str, ...] | None = None,
            check: Check | None = None, flag: str | None = None, identity: bool = True) -> Any:
    """A settings field. `flag`: its name on the command line when not the field's name (`loss_type` is
    `--loss`); `identity=False`: changing it does not change the run's data order or math (logging, speed
    switches that are exact), so a resumed run may use another value."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "check": check, "flag": flag,
                "identity": identity}
    return dataclasses.field(default=default, metadata=metadata)


def nested(cls: type, title: str | None = None) -> Any:
    """A field holding another settings class, whose fields become flags (in an argument group `title`)."""
    return dataclasses.field(default_factory=cls, metadata={"nested": cls, "title": title})


# ---------------------------------------------------------------------------------------------------
# checks


def positive(value: Any) -> str | None:
    """A check: the value is a number above 0."""
    return None if _number(value) and value > 0 else "must be positive"


def non_negative(value: Any) -> str | None:
    """A check: the value is a number of at least 0."""
    return None if _number(value) and value >= 0 else "must be a non-negative number"


def finite(value: Any) -> str | None:
    """A check: the value is a finite number."""
    return None if _number(value) else "must be a finite number"


SEED_LIMIT = 2 ** 63  # torch.manual_seed takes 64 bits; seeds derived from a seed stay below 2**63


def seed_range(value: Any) -> str | None:
    """A check: an integer seed in [0, 2**63)."""
    return None if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT else \
        "must be an integer in [0, 2**63)"


def at_least(low: float) -> Check:
    """A check: the value is a number of at least `low`."""
    return lambda value: None if _number(value) and value >= low else f"must be at least {low}"


def in_range(low: float, high: float) -> Check:
    """low <= value < high."""
    return lambda value: None if _number(value) and low <= value < high else f"must be in [{low}, {high})"


def between(low: float, high: float) -> Check:
    """low <= value <= high."""
    return lambda value: None if _number(value) and low <= value <= high else f"must be in [{low}, {high}]"


def probability(value: Any) -> str | None:
    """A check: 0 < value <= 1 (a top-p)."""
    return None if _number(value) and 0 < value <= 1 else "must be in (0, 1]"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------
# fields, flat names, validation


@dataclasses.dataclass(frozen=True)
class SettingField:
    """One setting as the command line, config files and run_config.json see it."""

    name: str  # the flat name: flag without dashes, config-file key, run_config.json key
    path: tuple[str, ...]  # attribute path from the top settings object, e.g. ("loss", "beta")
    field: dataclasses.Field
    title: str | None  # argument group opened by a nested settings class

    @property
    def flag(self) -> str:
        """Its command-line flag, e.g. --max-length."""
        return "--" + self.name.replace("_", "-")

    @property
    def type(self) -> str:
        """Its declared type, as text."""
        return str(self.field.type)

    @property
    def help(self) -> str:
        """Its help text."""
        return self.field.metadata["help"]

    @property
    def default(self) -> Any:
        """Its default value."""
        return self.field.default

    @property
    def identity(self) -> bool:
        """Whether it is part of the run's identity (`--resume` refuses another value)."""
        return self.field.metadata.get("identity", True)


def setting_fields(cls: type, path: tuple[str, ...] = (), title: str | None = None) -> Iterator[SettingField]:
    """Every setting of `cls`, nested classes expanded in place, in declaration order."""
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            yield from setting_fields(f.metadata["nested"], path + (f.name,), f.metadata["title"])
            continue
        if "help" not in f.metadata:
            continue
        yield SettingField(f.metadata["flag"] or f.name, path + (f.name,), f, title)


def flag_of(cls: type, field_name: str) -> str:
    """'--beta' for LossSettings.beta, '--loss' for LossSettings.loss_type."""
    metadata = {f.name: f.metadata for f in dataclasses.fields(cls)}[field_name]
    return "--" + (metadata.get("flag") or field_name).replace("_", "-")


_TYPE_WORDS = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string",
               "None": "null", "tuple[float, float]": "two numbers"}


def _has_type(value: Any, declared: str) -> bool:
    if declared == "None":
        return value is None
    if declared == "bool":
        return isinstance(value, bool)
    if declared == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if declared == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if declared == "str":
        return isinstance(value, str)
    if declared.startswith("tuple"):
        return isinstance(value, (tuple, list))  # the field's own check looks inside
    return True


def type_problem(value: Any, declared: str) -> str | None:
    """What is wrong with the type of `value` for a field declared as `declared` ("int | None"), or None: a config
    file's "false" for a bool, 8.0 for an int or "3e-5" for a float is refused rather than misread."""
    alternatives = [part.strip() for part in declared.split("|")]
    if any(_has_type(value, part) for part in alternatives):
        return None
    return "must be " + " or ".join(_TYPE_WORDS.get(part, part) for part in alternatives)


def check_settings(obj: Any) -> None:
    """Check every field's type, then run its check (None passes when the type admits None); ConfigError names
    the flag."""
    for f in dataclasses.fields(obj):
        if "help" not in f.metadata:
            continue
        problem = type_problem(getattr(obj, f.name), str(f.type))
        if problem:
            raise ConfigError(f"{flag_of(type(obj), f.name)} {problem}, got {getattr(obj, f.name)!r}")
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        value = getattr(obj, f.name)
        if check is None or (value is None and "None" in str(f.type)):
            continue
        problem = check(value)
        if problem:
            raise ConfigError(f"{flag_of(type(obj), f.name)} {problem}, got {value!r}")
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices and getattr(obj, f.name) not in choices:
            raise ConfigError(f"{flag_of(type(obj), f.name)} must be one of {', '.join(choices)}, "
                              f"got {getattr(obj, f.name)!r}")


def to_flat(obj: Any) -> dict[str, Any]:
    """{flat name: value} of every setting of `obj` (tuples as lists, as JSON has them)."""
    flat = {}
    for s in setting_fields(type(obj)):
        value = obj
        for attribute in s.path:
            value = getattr(value, attribute)
        flat[s.name] = list(value) if isinstance(value, tuple) else value
    return flat


def from_flat(cls: type, values: dict[str, Any]) -> Any:
    """An instance of `cls` from {flat name: value}; names not given keep their defaults."""
    by_name = {s.name: s for s in setting_fields(cls)}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    tree: dict[str, Any] = {}
    for name, value in values.items():
        s = by_name[name]
        if s.type.startswith("tuple") and isinstance(value, list):
            value = tuple(value)
        node = tree
        for attribute in s.path[:-1]:
            node = node.setdefault(attribute, {})
        node[s.path[-1]] = value
    return _build(cls, tree)


def _build(cls: type, tree: dict[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in tree:
            kwargs[f.name] = _build(f.metadata["nested"], tree[f.name]) if "nested" in f.metadata else tree[f.name]
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(str(error)) from None


# ---------------------------------------------------------------------------------------------------
# command line and config files


def parse_bool(text: str) -> bool:
    """A command-line boolean: 1/true/yes/on or 0/false/no/off (any case)."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)
    parse.__name__ = convert.__name__
    return parse


def _pair(text: str) -> tuple[float, float]:
    parts = text.replace(",", " ").split()
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.999, got {text!r}")
    return float(parts[0]), float(parts[1])


CONVERTERS: dict[str, Callable[[str], Any]] = {
    "str": str, "int": int, "float": float, "bool": parse_bool, "tuple[float, float]": _pair,
    "str | None": _optional(str), "int | None": _optional(int), "float | None": _optional(float),
}


def add_flags(parser: argparse.ArgumentParser, cls: type, groups: dict[str, str] | None = None,
              converters: dict[str, Callable[[str], Any]] | None = None) -> None:
    """One flag per setting of `cls`. `groups` maps a field name to the argument group it opens (fields of a
    nested class go to that class's title when it has one); `converters` parses a setting's text when its type
    alone does not say how. Defaults are SUPPRESSed, so that only the flags actually given override a config
    file; the help shows the default."""
    groups, converters = groups or {}, converters or {}
    names = [s.name for s in setting_fields(cls)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"settings declared twice: {', '.join(duplicates)}")
    target: Any = parser
    current_title = None
    for s in setting_fields(cls):
        title = groups.get(s.path[0]) if len(s.path) == 1 else s.title
        if title and title != current_title:
            target, current_title = parser.add_argument_group(title), title
        kwargs: dict[str, Any] = {"help": f"{s.help} (default: {s.default})", "default": argparse.SUPPRESS}
        if s.field.metadata.get("choices"):
            kwargs["choices"] = s.field.metadata["choices"]
        if s.type == "bool":
            # --flag sets true; --flag false / --no-flag for the opposite
            kwargs.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
            target.add_argument(s.flag, **kwargs)
            target.add_argument("--no-" + s.flag[2:], dest=s.name, action="store_false", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
        else:
            target.add_argument(s.flag, type=converters.get(s.name) or CONVERTERS[s.type], **kwargs)


def load_config_file(path: str, cls: type, records: Collection[str] = (),
                     invocation: Collection[str] = ()) -> dict[str, Any]:
    """{flat name: value} of a JSON object of settings (keys in either spelling; keys starting with '_' are
    comments, and `records` name keys a run writes beside its settings, which are left out). `invocation` name
    settings of one command (--resume, --overwrite) that a run's record holds as they were given: left out of a file
    that holds one of `records`, so that replaying a run's record neither replaces nor resumes a run."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:  # json.loads alone keeps the last silently
        keys = [key for key, _ in pairs if not key.startswith("_")]  # comments may repeat
        if twice := next((key for key in keys if keys.count(key) > 1), None):
            raise ConfigError(f"--config {path}: {twice!r} is given twice")
        return dict(pairs)

    try:
        raw = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of settings")
    known = {s.name for s in setting_fields(cls)}
    is_record = any(key.replace("-", "_") in records for key in raw)
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        name = key.replace("-", "_")
        if name in records or (is_record and name in invocation):
            continue
        if name not in known:
            raise ConfigError(f"--config {path}: unknown setting {key!r}")
        if name in keys:
            raise ConfigError(f"--config {path}: {name} is given twice ({keys[name]!r} and {key!r})")
        keys[name], values[name] = key, value
    return values
