"""Command-line options generated from their one home: a config dataclass's fields (``config_types.option``) or a
command function's signature and ``Args:`` docstring. Standard library only, so a bad option is an error before
torch or DeepSpeed is imported.

argparse builds the parser and the help; the values are converted here afterwards, from the field's type, so
every bad value is one ``ConfigError`` line naming the option.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mvptr_ds.config_types import ConfigError

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclasses.dataclass(frozen=True)
class Opt:
    """One option: ``dest`` is ``section.field`` for a config field, else the command function's parameter."""

    dest: str
    flag: str
    help: str
    type: Any
    default: Any = None
    required: bool = False
    short: Optional[str] = None
    parse: Optional[Callable[[str], Any]] = None
    metavar: Optional[str] = None
    default_text: Optional[str] = None  # shown instead of ``default`` (a default that depends on other options)


def field_options(section: str, cls, names: Optional[Sequence[str]] = None) -> List[Opt]:
    """The options of dataclass ``cls``'s fields (those with ``cli`` metadata true; only ``names`` if given)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if (names is None and not meta.get("cli", True)) or (names is not None and f.name not in names):
            continue
        out.append(Opt(dest=f"{section}.{f.name}", flag=meta.get("flag", f.name), help=meta.get("help", ""),
                       type=hints[f.name], default=f.default, short=meta.get("short"), parse=meta.get("parse"),
                       metavar=meta.get("metavar")))
    return out


def signature_options(func: Callable, skip: Sequence[str] = ()) -> List[Opt]:
    """The options of ``func``'s keyword parameters; help from the ``Args:`` section of its docstring."""
    hints = typing.get_type_hints(func)
    helps = docstring_args(func.__doc__ or "")
    out = []
    for p in inspect.signature(func).parameters.values():
        if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        required = p.default is inspect.Parameter.empty
        text = helps.get(p.name, "")
        out.append(Opt(dest=p.name, flag=p.name, help=text[:1].upper() + text[1:], type=hints.get(p.name, str),
                       default=None if required else p.default, required=required))
    return out


def docstring_args(doc: str) -> Dict[str, str]:
    """``{name: text}`` of a Google-style ``Args:`` section (continuation lines joined)."""
    out, name, inside = {}, None, False
    for line in inspect.cleandoc(doc).splitlines():
        if line.strip() == "Args:":
            inside = True
            continue
        if not inside:
            continue
        m = re.match(r"^    (\w+): (.*)$", line)
        if m:
            name = m.group(1)
            out[name] = m.group(2).strip()
        elif line.startswith("        ") and name:
            out[name] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return out


def _base(tp) -> Tuple[Any, bool]:
    """(the type inside Optional[...], whether it was Optional)."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def type_label(opt: Opt) -> str:
    """The value's placeholder in help: INT, FLOAT, TEXT, LIST, ..."""
    if opt.metavar:
        return opt.metavar
    tp, _ = _base(opt.type)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return "LIST" if len(args) == 2 and args[1] is Ellipsis else ",".join(type_label(Opt("", "", "", a))
                                                                              for a in args)
    return {int: "INT", float: "FLOAT", bool: "BOOL"}.get(tp, "TEXT")


def shown_default(opt: Opt) -> Optional[str]:
    """The default as help shows it; None when there is none to show (the help text says what "not given" means)."""
    if opt.default_text is not None:
        return opt.default_text
    value = opt.default
    if opt.required or value is None or value == ():
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def help_text(opt: Opt) -> str:
    shown = shown_default(opt)
    text = opt.help.replace("%", "%%")  # argparse formats help with %
    return f"{text} (default: {shown.replace('%', '%%')})" if shown is not None else text


def build_parser(prog: str, description: str, groups: Sequence[Tuple[str, Sequence[Opt]]],
                 epilog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, usage=f"{prog} [OPTIONS]", description=description, epilog=epilog, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from mvptr_ds import __version__

    parser.add_argument("--version", action="version", version=f"mvptr_ds {__version__}")
    for title, opts in groups:
        group = parser.add_argument_group(title) if title else parser
        for opt in opts:
            names = [f"--{opt.flag}"] + ([opt.short] if opt.short else [])
            if _base(opt.type)[0] is bool:  # --flag, --flag false, --no_flag
                group.add_argument(*names, dest=opt.dest, nargs="?", const="true", default=argparse.SUPPRESS,
                                   metavar="BOOL", help=help_text(opt) + (f" --no_{opt.flag} turns it off."
                                                                          if opt.default is True else ""))
                group.add_argument(f"--no_{opt.flag}", dest=opt.dest, action="store_const", const="false",
                                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            else:
                group.add_argument(*names, dest=opt.dest, default=argparse.SUPPRESS, metavar=type_label(opt),
                                   required=opt.required, help=help_text(opt))
    return parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors, as one ConfigError line
        m = re.match(r"argument (\S+?)(/\S+)?: expected one argument", message)
        if m:
            flag = m.group(1)
            raise ConfigError(f"{flag} has no value (a negative value that is not a plain number, such as -inf, "
                              f"must be written {flag}=VALUE)")
        raise ConfigError(re.sub(r"^argument (\S+?)(/\S+)?: ", r"\1: ", message))


def parse(parser: argparse.ArgumentParser, options: Sequence[Opt], argv: Sequence[str]) -> Dict[str, Any]:
    """``{dest: value}`` of the options given in ``argv`` (converted); ConfigError for anything unknown or bad."""
    flags = {f"--{o.flag}" for o in options} | {f"--no_{o.flag}" for o in options if _base(o.type)[0] is bool}
    argv = [_underscored(a, flags) for a in argv]
    namespace, extra = parser.parse_known_args(list(argv))
    if extra:
        raise ConfigError(_unknown(extra, sorted(flags | {"--help", "--version"})))
    given = vars(namespace)
    return {o.dest: convert(o, given[o.dest]) for o in options if o.dest in given}


def _underscored(arg: str, flags) -> str:
    """``--max-steps`` -> ``--max_steps`` when that is an option (the dashed spelling DeepSpeed users also type)."""
    if not arg.startswith("--") or "-" not in arg[2:]:
        return arg
    name, eq, value = arg.partition("=")
    alt = "--" + name[2:].replace("-", "_")
    return alt + eq + value if alt in flags else arg


def _unknown(extra: List[str], flags: List[str]) -> str:
    first = next((a for a in extra if a.startswith("-") and not _is_number(a)), None)
    if first is None:
        return (f"unexpected argument {extra[0]!r}: options are written --name VALUE (a value with spaces needs "
                "quotes)")
    name = first.partition("=")[0]
    close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "--help lists the options"
    return f"unknown option {name} ({hint})"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def convert(opt: Opt, raw: Any) -> Any:
    """The value of option ``opt`` from its text, by the field's type (or its ``parse``)."""
    text = str(raw)
    flag = f"--{opt.flag}"
    if opt.parse is not None:
        try:
            return opt.parse(text)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{flag} {text!r}: {e}") from None
    tp, optional = _base(opt.type)
    if optional and tp is not str and text.lower() == "none":
        return None
    return _convert(tp, text, flag)


def _convert(tp, text: str, flag: str) -> Any:
    if tp is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise ConfigError(f"{flag} {text!r}: expected true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{flag} {text!r} is not an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{flag} {text!r} is not a number") from None
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], p, flag) for p in parts)
        if len(parts) != len(args):
            raise ConfigError(f"{flag} {text!r}: expected {len(args)} comma-separated values")
        return tuple(_convert(a, p, flag) for a, p in zip(args, parts))
    return text
