"""How a setting is declared once, and everything made from the declarations.

A setting is a dataclass field made by `setting(default, help, choices=, check=)`; a `Rule` is
a condition across settings. From the declarations come:
- absl flags with parse-time validators (`define_flags`, `define_rules`): a bad value is one
  line naming the flag, before anything else loads;
- argparse options (`add_arguments`, `first_error`) for a command that passes on the
  arguments it does not know (the training launcher);
- settings objects from parsed flags (`from_flags`) or from raw arguments (`from_args`).

dist_caption/config.py (training, data, export) and serving/config.py (the client, the local
server, publishing) declare every setting of every command with it. It lives in serving/, which
imports nothing from dist_caption, so both packages may import it. Imports no TensorFlow (but
for an existence check of a gs:// or other URL path).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any, Callable

def path_exists(path: str) -> bool:
    """Whether a local path or a filesystem URL (gs://, ram://) exists; TensorFlow is loaded
    only for a URL."""
    if "://" not in path:
        return os.path.exists(path)
    import tensorflow as tf

    return tf.io.gfile.exists(path)


@dataclasses.dataclass(frozen=True)
class Check:
    """A condition on one value, and what to say when it fails ("must be positive")."""
    test: Callable[[Any], bool]
    message: str

    def error(self, name: str, value) -> str | None:
        """The one-line message for `--name value`, or None if `value` passes."""
        return None if self.test(value) else f"--{name} {self.message}"


class ExistingPath(Check):
    """Every given path (a value, or each of a list) exists: "--name: WHAT PATH does not
    exist" names the first that does not."""

    def __init__(self, what: str):  # what the path is: "captions file", "image folder"
        super().__init__(lambda value: all(map(path_exists, _given(value))), what)

    def error(self, name: str, value) -> str | None:
        for path in _given(value):
            if not path_exists(path):
                return f"--{name}: {self.message} {path} does not exist"
        return None


def _given(value) -> list[str]:
    return [v for v in (value if isinstance(value, (list, tuple)) else [value]) if v]


POSITIVE = Check(lambda v: v > 0, "must be a positive number")
AT_LEAST_ONE = Check(lambda v: v >= 1, "must be at least 1")
NON_NEGATIVE = Check(lambda v: v >= 0, "must not be negative")
FRACTION = Check(lambda v: 0 <= v < 1, "must be in [0, 1)")


def setting(default, help: str, *, choices: tuple[str, ...] | None = None,
            check: Check | None = None, flag: bool = True, kind: type | None = None):
    """A dataclass field that is also a flag: `flag=False` for settings only tests change.
    `kind` is the flag's type where the default does not show it (an int flag defaulting to
    None; a list: a comma-separated flag, `list[str]` a repeated one)."""
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: list(default), metadata={
            "help": help, "choices": choices, "check": check, "flag": flag,
            "kind": kind or list})
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "check": check, "flag": flag,
        "kind": kind or type(default)})


def default_of(field: dataclasses.Field):
    """A field's default (a list setting's too)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


@dataclasses.dataclass(frozen=True)
class Rule:
    """A condition across settings, checked by the flags and by `validate`."""
    names: tuple[str, ...]
    test: Callable[..., bool]
    message: str


def settings(cls) -> list[dataclasses.Field]:
    """The fields of `cls` declared with `setting` that are flags."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag")]


def check(config, rules: tuple[Rule, ...] = ()) -> None:
    """Raises ValueError naming the first setting of `config` that breaks its declaration."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        choices, rule = field.metadata.get("choices"), field.metadata.get("check")
        if choices and value not in choices:
            raise ValueError(f"{field.name} must be one of {choices}, got {value!r}")
        error = rule.error(field.name, value) if rule else None
        if error:
            raise ValueError(f"{error[2:]}, got {value}")
    for rule in rules:
        if not rule.test(*(getattr(config, n) for n in rule.names)):
            raise ValueError(f"{rule.message} (got "
                             + ", ".join(f"{n}={getattr(config, n)}" for n in rule.names) + ")")




def declare(name: str, doc: str, fields: dict, *, module: str, **options):
    """A frozen dataclass `name` of `fields` ({name: setting(...)}), in declaration order,
    belonging to `module` (the declaring module's __name__)."""
    cls = dataclasses.make_dataclass(
        name, [(n, f.metadata["kind"] if f.metadata["kind"] is not list else list, f)
               for n, f in fields.items()], frozen=True, **options)
    cls.__doc__, cls.__module__ = doc, module
    return cls




def from_flags(cls, values, **fixed):
    """`cls` (a config dataclass) from parsed flags `values`: every flag setting by name."""
    return cls(**{f.name: getattr(values, f.name) for f in settings(cls)}, **fixed)




def _typed(field: dataclasses.Field, text: str):
    """`text` (a command-line value) as `field`'s type, or ValueError saying what it needs."""
    default = field.default
    try:
        if isinstance(default, bool):
            if text.lower() in ("true", "t", "1"):
                return True
            if text.lower() in ("false", "f", "0"):
                return False
            raise ValueError
        return type(default)(text) if isinstance(default, (int, float)) else text
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}[type(default)]
        raise ValueError(f"--{field.name} must be {kind}, got {text!r}") from None


def from_args(cls, args: list[str]):
    """`cls` (a settings dataclass) with the values that absl-style `args` give its flag
    settings (`--name=value`, `--name value`, `--name`/`--noname`; the last one wins),
    defaults for the rest; other arguments are ignored. Checks nothing (see `check`)."""
    fields = {f.name: f for f in settings(cls)}
    values: dict[str, Any] = {}
    args = iter(args)
    for arg in args:
        if not arg.startswith("--"):
            continue
        name, eq, text = arg[2:].partition("=")
        field = fields.get(name)
        if field is None and name.startswith("no") and not eq \
                and isinstance(getattr(fields.get(name[2:]), "default", None), bool):
            values[name[2:]] = False
        elif field is not None and isinstance(field.default, bool) and not eq:
            values[name] = True
        elif field is not None:
            values[name] = _typed(field, text if eq else next(args, ""))
    return cls(**values)


# ------------------------------------------------------------------------------- absl flags

def define_flags(cls) -> None:
    """One absl flag per setting declared in `cls`, with its validator."""
    from absl import flags

    for field in settings(cls):
        name, help_text, kind = field.name, field.metadata["help"], field.metadata["kind"]
        default = default_of(field)
        if field.metadata["choices"]:
            flags.DEFINE_enum(name, default, list(field.metadata["choices"]), help_text)
        elif kind is bool:
            flags.DEFINE_bool(name, default, help_text)
        elif kind is int:
            flags.DEFINE_integer(name, default, help_text)
        elif kind is float:
            flags.DEFINE_float(name, default, help_text)
        elif kind == list[str]:
            flags.DEFINE_multi_string(name, default, help_text)
        elif kind is list:
            flags.DEFINE_list(name, default, help_text)
        else:
            flags.DEFINE_string(name, default, help_text)
        rule = field.metadata["check"]
        if rule:
            flags.register_validator(name, lambda v, rule=rule, name=name: v is None or _ok(
                rule.error(name, v)))


def _ok(error: str | None) -> bool:
    from absl import flags

    if error:
        raise flags.ValidationError(error)
    return True


def define_rules(rules: tuple[Rule, ...]) -> None:
    """A parse-time absl validator per cross-setting rule."""
    from absl import flags

    for rule in rules:
        flags.register_multi_flags_validator(
            list(rule.names), lambda v, rule=rule: rule.test(*(v[n] for n in rule.names)),
            message=rule_message(rule))


def rule_message(rule: Rule) -> str:
    """A rule's message with its settings' names as flags (`cpu` -> `--cpu`)."""
    names = "|".join(sorted(map(re.escape, rule.names), key=len, reverse=True))
    return re.sub(rf"(?<![\w-])({names})(?!\w)", r"--\1", rule.message)


# -------------------------------------------------------------------------------- argparse

def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One argparse option per setting declared in `cls` (a bool one is a switch that sets
    it); values are checked by `first_error`."""
    for field in settings(cls):
        kind, default = field.metadata["kind"], default_of(field)
        if kind is bool:
            parser.add_argument(f"--{field.name}", action="store_true",
                                help=field.metadata["help"])
        else:
            parser.add_argument(f"--{field.name}", type=kind, default=default,
                                choices=field.metadata["choices"], help=field.metadata["help"])


def first_error(values, cls, rules: tuple[Rule, ...] = ()) -> str | None:
    """The first declared check or rule of `cls` that parsed `values` break, as one line
    ("--workers must be at least 1, got 0"), or None."""
    for field in settings(cls):
        value, rule = getattr(values, field.name), field.metadata["check"]
        error = rule.error(field.name, value) if rule and value is not None else None
        if error:
            return f"{error}, got {value:g}" if isinstance(value, (int, float)) else error
    for rule in rules:
        if not rule.test(*(getattr(values, n) for n in rule.names)):
            return rule_message(rule)
    return None
