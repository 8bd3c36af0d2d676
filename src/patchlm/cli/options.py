"""CLI options generated from config dataclasses, so every default and help text is written once, in the config.

A command declares which config classes feed it:

    @config_command(Group(TrainConfig, exclude=("progress",)), Group(LoraConfig, rename={"r": "rank"}))
    def train(cv: ConfigValues, model: str = typer.Option(...), ...):
        cfg = TrainConfig(**cv.values(TrainConfig))          # every field: the flag's value or its default
        spec = {**recipe_spec, **cv.given(LoraConfig)}       # only the flags the user typed (to layer on a recipe)

Each dataclass field becomes an option named after it (`--batch-size`), with the field's type, its default
(shown by --help) and `metadata["help"]`. Field metadata may also set `flag` (another option name), `short`
("-r"), `cli: False` (not an option), and `parse` (a function from the typed text to the field's value, for
list fields such as ranks "16,8,4"). Library errors name the config field; `flag_for` maps a field to its
option so the CLI can say which flag to change.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import keyword
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any

import typer

_UNSET = object()


@dataclass
class Group:
    """One config class's fields as options: rename maps field -> option stem, exclude/only filter fields."""

    cls: type
    rename: dict[str, str] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    prefix: str = ""                      # e.g. "mos-" gives --mos-r for field r
    panel: str | None = None              # rich help panel title
    defaults: dict[str, Any] = field(default_factory=dict)  # per-command defaults (must be documented)

    def fields(self) -> list[dataclasses.Field]:
        out = []
        for f in dataclasses.fields(self.cls):
            if f.name in self.exclude or (self.only is not None and f.name not in self.only):
                continue
            if f.metadata.get("cli", True) is False:
                continue
            out.append(f)
        return out


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _UNSET


def _plain_type(tp) -> tuple[type, bool]:
    """(the option's Python type, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner, _ = _plain_type(args[0]) if len(args) == 1 else (str, True)
        return inner, True
    if origin in (list, tuple) or tp in (list, tuple):
        return str, False
    if tp in (int, float, str, bool):
        return tp, False
    return str, False


@dataclass
class _Opt:
    param: str
    flag: str
    group: Group
    fld: dataclasses.Field
    typ: type
    default: Any


def _options(group: Group) -> list[_Opt]:
    hints = typing.get_type_hints(group.cls)
    out = []
    for f in group.fields():
        stem = group.rename.get(f.name) or f.metadata.get("flag") or f.name
        stem = group.prefix + stem.replace("_", "-")
        param = stem.replace("-", "_")
        if keyword.iskeyword(param):  # --lambda: the Python parameter is lambda_
            param += "_"
        typ, _ = _plain_type(hints.get(f.name, str))
        default = group.defaults.get(f.name, field_default(f))
        if isinstance(default, (list, tuple)):
            default = ",".join(str(x) for x in default)
        out.append(_Opt(param=param, flag=f"--{stem}", group=group, fld=f, typ=typ, default=default))
    return out


def _typer_param(opt: _Opt) -> inspect.Parameter:
    f = opt.fld
    negative = f.metadata.get("negative") or f"--no-{opt.flag[2:]}"
    names = [f"{opt.flag}/{negative}"] if opt.typ is bool else [opt.flag]
    if f.metadata.get("short"):
        names.append(f.metadata["short"])
    help_text = f.metadata.get("help", "")
    default = None if opt.default is _UNSET else opt.default
    option = typer.Option(default, *names, help=help_text, rich_help_panel=opt.group.panel,
                          show_default=default is not None)
    annotation = opt.typ if default is not None else typing.Optional[opt.typ]  # noqa: UP045 - typer needs it
    return inspect.Parameter(opt.param, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


class ConfigValues:
    """The generated options' values of one invocation, by config class."""

    def __init__(self, opts: list[_Opt], kwargs: dict[str, Any], given: set[str]):
        self._opts, self._kwargs, self._given = opts, kwargs, given

    def _convert(self, opt: _Opt, value: Any) -> Any:
        parse = opt.fld.metadata.get("parse")
        if parse is not None and isinstance(value, str):
            return parse(value)
        return value

    def values(self, cls: type) -> dict[str, Any]:
        """Every generated field of `cls`: the typed value, else the default."""
        return {o.fld.name: self._convert(o, self._kwargs[o.param]) for o in self._opts
                if o.group.cls is cls and not (o.default is _UNSET and self._kwargs[o.param] is None)}

    def given(self, cls: type) -> dict[str, Any]:
        """Only the fields of `cls` whose flag was typed on the command line."""
        return {o.fld.name: self._convert(o, self._kwargs[o.param]) for o in self._opts
                if o.group.cls is cls and o.param in self._given}

    def flag(self, cls: type, name: str) -> str | None:
        for o in self._opts:
            if o.group.cls is cls and o.fld.name == name:
                return o.flag
        return None


_FLAGS: dict[str, str | None] = {}  # field name -> flag of the command being run (for error messages)


def flag_for(field_name: str) -> str | None:
    """The option of the running command that sets config field `field_name` (None outside the CLI)."""
    return _FLAGS.get(field_name)


def config_command(*groups: Group):
    """Decorator: add the options generated from `groups` to a typer command function.

    The function takes a first parameter `cv: ConfigValues`; its other parameters stay ordinary typer options.
    """

    def deco(fn):
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(name, p.annotation)) for name, p in sig.parameters.items()
               if name != "cv"]
        opts = [o for g in groups for o in _options(g)]
        taken = {p.name for p in own}
        for o in opts:
            if o.param in taken:
                raise TypeError(f"{fn.__name__}: option {o.flag} is generated twice")
            taken.add(o.param)
        gen = [_typer_param(o) for o in opts]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + gen

        @functools.wraps(fn)
        def wrapper(**kwargs):
            import click

            ctx = click.get_current_context(silent=True)
            given = set()
            for o in opts:
                src = ctx.get_parameter_source(o.param) if ctx is not None else None
                if src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP"):
                    given.add(o.param)
            _FLAGS.clear()
            for o in opts:  # a field name two groups share (r: --rank, --mos-r) maps to no flag: it is ambiguous
                _FLAGS[o.fld.name] = None if o.fld.name in _FLAGS else o.flag
            gen_kwargs = {o.param: kwargs.pop(o.param) for o in opts}
            return fn(ConfigValues(opts, gen_kwargs, given), **kwargs)

        wrapper.__signature__ = inspect.Signature(params)
        ann = {p.name: p.annotation for p in own}
        ann.update({p.name: p.annotation for p in gen})
        wrapper.__annotations__ = ann
        wrapper.__patchlm_fields__ = {o.param: (o.group.cls, o.fld.name, o.default) for o in opts}
        del wrapper.__wrapped__  # typer must read our signature, not fn's
        return wrapper

    return deco
