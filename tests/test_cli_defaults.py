"""One source of truth: every CLI option generated from a config dataclass shows that field's default, and the
commands that take hyper-parameters get them from their configs (not from literals in the CLI modules)."""

from __future__ import annotations

import dataclasses

import click
import pytest


def _commands():
    import typer.main

    from patchlm.cli.main import _register_all, app

    _register_all()
    root = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            if path and _fields(cmd):  # a group whose own callback takes generated options (federate)
                out.append((" ".join(path), cmd))
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            out.append((" ".join(path), cmd))

    walk(root, [])
    return out


def _fields(cmd):
    fn = cmd.callback
    while fn is not None:
        f = getattr(fn, "__patchlm_fields__", None)
        if f is not None:
            return f
        fn = getattr(fn, "__wrapped__", None)
    return {}


def _dataclass_default(cls, name):
    from patchlm.cli.options import field_default

    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    d = field_default(f)
    if isinstance(d, (list, tuple)):
        d = ",".join(str(x) for x in d)
    return d


def test_every_generated_option_shows_its_dataclass_default():
    checked = 0
    for path, cmd in _commands():
        fields = _fields(cmd)
        for p in cmd.params:
            if p.name not in fields:
                continue
            cls, name, _ = fields[p.name]
            want = _dataclass_default(cls, name)
            got = p.default
            from patchlm.cli.options import _UNSET

            if want is _UNSET:
                assert got is None, f"{path} {p.opts}: a required field shows default {got!r}"
            else:
                assert got == want, f"{path} {p.opts}: default {got!r}, but {cls.__name__}.{name} = {want!r}"
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("command", ["train"])
def test_hyper_parameter_commands_are_generated_from_configs(command):
    """The commands named here take their hyper-parameters from config dataclasses (the issue's contract)."""
    cmds = dict(_commands())
    fields = _fields(cmds[command])
    assert len(fields) >= 10, f"{command} has only {len(fields)} generated options"


def test_every_command_has_help_with_an_example(capsys):
    from conftest import run_cli

    for path, _cmd in _commands():
        code, out, err = run_cli([*path.split(), "--help"], capsys)
        assert code == 0, (path, err)
        assert "Usage" in out, path
