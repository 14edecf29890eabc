"""Building blocks of the typed configuration (``config.py``): the option field, range checks, and building a
dataclass from JSON with its types checked. Standard library only: the command line imports this before torch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, Callable, Dict, Optional, Sequence, Tuple


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names it."""


def option(default: Any, help: str, *, flag: Optional[str] = None, short: Optional[str] = None, cli: bool = True,
           parse: Optional[Callable[[str], Any]] = None, metavar: Optional[str] = None) -> Any:
    """A config field, with the one description the command line (``--help``) and the docs show.

    Every field of a config dataclass is declared with ``option``: the command line generates its options from
    these fields (``mvptr_ds/cli/options.py``), so a new field is a new option with no other edit.

    Args:
        default: the default value (immutable: configs are frozen).
        help: what the field means, one or more sentences; the default and the type are added by ``--help``.
        flag: the option's name when it is not the field's (``--data`` for ``data.source``).
        short: a short alias, e.g. ``-o``.
        cli: False for fields set only through config files and presets (model sizes, data-derived values).
        parse: reads the option's text when the field's type alone does not say how (e.g. ``wpg=3,mlm=0.5``).
        metavar: the value's placeholder in ``--help`` when the type's name is not telling.
    """
    meta = {"help": help, "flag": flag, "short": short, "cli": cli, "parse": parse, "metavar": metavar}
    return dataclasses.field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


def at_least(owner, section: str, names, low: int) -> None:
    """Each integer field ``names`` of ``owner`` is >= ``low``, else ConfigError naming ``section.name``."""
    for name in names:
        value = getattr(owner, name)
        if value < low:
            raise ConfigError(f"{section}.{name} must be >= {low}, got {value}")


def in_range(owner, section: str, name: str, low: float, high: float = math.inf, low_open: bool = False,
             high_open: bool = True, what: str = "") -> None:
    """Float field ``name`` of ``owner`` is finite (NaN and inf refused) and in the given interval."""
    value = getattr(owner, name)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        interval = (f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                    if math.isfinite(high) else f"{'>' if low_open else '>='} {low:g}")
        raise ConfigError(f"{section}.{name}={value!r}: must be a finite number {'in ' if math.isfinite(high) else ''}"
                          f"{interval}{what}")


def read_json(path: str, label: str, hint: str = "") -> Any:
    """The JSON value in ``path``, or ConfigError ``"{label}: file not found{hint}"`` / not valid JSON (line,
    column) / cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{label}: file not found{hint}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{label}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{label}: cannot be read ({reason(e)})") from None


# Readers of option texts whose field type alone does not say how (``option(parse=...)``).

def parse_names(text: str) -> Tuple[str, ...]:
    """``"mcr, VSC"`` -> ``("mcr", "vsc")`` (the names are checked by the config's ``validate``)."""
    return tuple(x.strip().lower() for x in str(text).split(",") if x.strip())


def name_values(flag: str, example: str) -> Callable[[str], Tuple[Tuple[str, float], ...]]:
    """A reader of ``"wpg=3,itm=0.5"`` -> ``(("itm", 0.5), ("wpg", 3.0))`` (a name given twice keeps its last
    value); ConfigError naming the item and ``flag`` when it is malformed or not a number."""
    def parse(text: str) -> Tuple[Tuple[str, float], ...]:
        out: Dict[str, float] = {}
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            name, eq, value = part.partition("=")
            if not eq:
                raise ConfigError(f"{flag}: {part!r} is not NAME=VALUE (e.g. {example})")
            try:
                out[name.strip().lower()] = float(value)
            except ValueError:
                raise ConfigError(f"{flag}: value of {name.strip()!r} is {value!r}, not a number") from None
        return tuple(sorted(out.items()))
    return parse


def keyword_or_text(keywords: Sequence[str]) -> Callable[[str], str]:
    """A reader that takes ``keywords`` in any case (``None`` is ``none``) and any other text as given."""
    return lambda text: text.lower() if text.lower() in keywords else text


def reason(e: BaseException) -> str:
    """The short reason of an OSError / UnicodeDecodeError, for one-line messages."""
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8: byte 0x{e.object[e.start]:02x} at offset {e.start}"
    return e.strerror or type(e).__name__


def build(cls, d: Any, prefix: str):
    """Construct dataclass ``cls`` from a plain dict, recursively, checking keys and types."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: coerce(hints[k], v, prefix + k) for k, v in d.items()}
    return cls(**kwargs)


def coerce(tp, v, key: str):
    """``v`` (a JSON value) as type ``tp``, or ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, v, key + ".")
    if origin is typing.Union:  # Optional[X]
        if v is None:
            return None
        return coerce([a for a in args if a is not type(None)][0], v, key)
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {v!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], x, key) for x in v)
        if len(args) != len(v):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(v)}")
        return tuple(coerce(a, x, key) for a, x in zip(args, v))
    if tp is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        raise ConfigError(f"{key}: expected true/false, got {v!r}")
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}: expected an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{key}: expected a string, got {v!r}")
        return v
    return v
