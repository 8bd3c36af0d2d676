"""Hostile input: every bad input is refused before anything is written or destroyed (exit 2, one error line)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

TRAIN = ["train", "-m", "tiny-random-llama", "-t", "sms_spam", "--rank", "2", "--targets", "attn", "--steps", "2",
         "--max-examples", "32", "--eval-limit", "4", "-q"]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and modification time (to prove a failed command changed nothing)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished two-step LoRA run on tiny-random-llama (its dir: checkpoints/, metrics.jsonl, patch/)."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    code, _, err = run_cli([*TRAIN, "--out", str(out)], _CaptureNothing())
    assert code == 0, err
    return out


class _CaptureNothing:
    """A stand-in for pytest's capsys in module fixtures (run_cli only needs readouterr)."""

    def readouterr(self):
        class _R:
            out = ""
            err = ""

        return _R()


@pytest.mark.parametrize("bad, needle", [(["--targets", "foo_proj"], "foo_proj"),
                                         (["-m", "no-such-model-name"], "no-such-model-name")])
def test_force_with_a_bad_option_keeps_the_old_run(trained_run, capsys, bad, needle):
    before = snapshot(trained_run)
    code, _, err = run_cli([*TRAIN, "--out", str(trained_run), "--force", *bad], capsys)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert snapshot(trained_run) == before
    assert not [p for p in trained_run.parent.iterdir() if p.name.startswith(".")]  # no set-aside copy left


def test_force_replaces_the_run_once_the_new_one_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli([*TRAIN, "--out", str(out)], capsys)[0] == 0
    (out / "marker").write_text("old run")
    code, _, err = run_cli([*TRAIN, "--out", str(out), "--force"], capsys)
    assert code == 0, err
    assert not (out / "marker").exists() and (out / "patch" / "patch.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_set_aside_restores_unless_the_new_target_is_kept(tmp_path):
    from patchlm.paths import set_aside

    t = tmp_path / "t"
    t.mkdir()
    (t / "a").write_text("old")
    with pytest.raises(RuntimeError), set_aside(t, keep_new=lambda p: False):
        t.mkdir()
        (t / "b").write_text("partial")
        raise RuntimeError
    assert sorted(p.name for p in t.iterdir()) == ["a"]
    with pytest.raises(RuntimeError), set_aside(t, keep_new=lambda p: (p / "ckpt").exists()):
        t.mkdir()
        (t / "ckpt").write_text("resumable")
        raise RuntimeError
    assert sorted(p.name for p in t.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


# ---------------------------------------------------------------- non-finite numbers
def nan_patch(src: Path, dst: Path, value: float = float("nan")) -> str:
    """A copy of patch `src` at `dst` whose first tensor holds `value` (checksum updated, so only NaN is wrong)."""
    import hashlib
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "tensors.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(dst / "tensors.safetensors"), metadata={"format": "patchlm"})
    meta = json.loads((dst / "patch.json").read_text())
    meta["tensors_sha256"] = hashlib.sha256((dst / "tensors.safetensors").read_bytes()).hexdigest()
    (dst / "patch.json").write_text(json.dumps(meta))
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_patch_is_refused_by_every_consumer(trained_run, tmp_path, capsys, value):
    bad = tmp_path / "bad"
    name = nan_patch(trained_run / "patch", bad, value)
    before = snapshot(tmp_path)
    for argv in (["eval", "-m", "tiny-random-llama", "-t", "sms_spam", "-p", str(bad), "--limit", "4"],
                 ["export", str(bad), "--out", str(tmp_path / "peft")],
                 ["merge", "-p", str(bad), "-p", str(trained_run / "patch"), "--method", "linear",
                  "--out", str(tmp_path / "m")],
                 ["info", str(bad)]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)
        assert name in err and "tensors.safetensors" in err and "Traceback" not in err, (argv, err)
        assert err.count("error:") == 1, err
    assert snapshot(tmp_path) == before


def test_a_non_finite_patch_is_never_saved_or_applied(trained_run, tmp_path, tiny):
    import torch

    from patchlm.errors import PatchFormatError
    from patchlm.patch import Patch

    p = Patch.load(trained_run / "patch")
    p.tensors = {k: torch.full_like(v, float("nan")) for k, v in p.tensors.items()}
    with pytest.raises(PatchFormatError, match="refusing to save"):
        p.save(tmp_path / "p")
    assert not (tmp_path / "p").exists() and not list(tmp_path.iterdir())
    with pytest.raises(PatchFormatError, match="NaN"):
        p.apply(tiny)


def test_json_is_strict_both_ways(trained_run, tmp_path, capsys):
    import json
    import shutil

    from patchlm.errors import PatchlmError
    from patchlm.paths import strict_json

    with pytest.raises(PatchlmError, match=r"metrics\.val_loss"):
        strict_json({"metrics": {"val_loss": float("nan")}}, "the report")
    bad = tmp_path / "nanjson"
    shutil.copytree(trained_run / "patch", bad)
    meta = json.loads((bad / "patch.json").read_text())
    meta["metrics"]["val_accuracy"] = float("nan")
    (bad / "patch.json").write_text(json.dumps(meta))  # Python writes a bare NaN: not JSON
    code, _, err = run_cli(["info", str(bad)], capsys)
    assert code == 2 and "NaN" in err and "patch.json" in err and "Traceback" not in err, err
    # what patchlm itself writes parses under a strict reader
    for f in [trained_run / "patch" / "patch.json", trained_run / "checkpoints" / "last" / "state.json"]:
        json.loads(f.read_text(), parse_constant=lambda c, f=f: pytest.fail(f"{f} holds {c}"))
    for line in (trained_run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))


# ---------------------------------------------------------------- data sanity
def _csv(path: Path, rows: list[tuple]) -> Path:
    path.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    return path


@pytest.mark.parametrize("rows,match", [
    ([(f"row {i}", 1) for i in range(20)], "single value"),
    ([(f"row {i}", i * 0.37) for i in range(20)], "looks continuous"),
    ([(f"row {i}", i) for i in range(20)], "distinct values"),
    ([(f"row {i}", i % 60) for i in range(600)], "max_labels"),
])
def test_label_columns_that_are_not_classes_are_refused(tmp_path, rows, match):
    from patchlm.data import load_task
    from patchlm.errors import PatchlmError

    with pytest.raises(PatchlmError, match=match):
        load_task(str(_csv(tmp_path / "d.csv", rows)))


def test_max_labels_lets_many_real_classes_through(tmp_path):
    from patchlm.data import DataConfig, load_task

    t = load_task(str(_csv(tmp_path / "d.csv", [(f"row {i}", i % 60) for i in range(600)])),
                  checks=DataConfig(max_labels=60))
    assert len(t.labels) == 60


def test_duplicates_and_empty_texts_warn_and_the_warning_can_be_silenced(tmp_path):
    import warnings

    from patchlm.data import DataConfig, DataWarning, load_task

    rows = [(f"text {i % 10}", i % 2) for i in range(20)] + [("", 0), ("   ", 1)]
    f = _csv(tmp_path / "d.csv", rows)
    with pytest.warns(DataWarning) as got:
        t = load_task(str(f))
    text = " ".join(str(w.message) for w in got)
    assert "duplicate" in text and "empty" in text
    every = [normalize for split in (t.train, t.validation, t.test) for normalize in (e["text"] for e in split)]
    assert len(every) == len(set(every)) == 10  # no text in two splits
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        load_task(str(f), checks=DataConfig(data_warnings=False))


def test_train_refuses_data_smaller_than_one_batch_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import patchlm.models

    monkeypatch.setattr(patchlm.models, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    f = _csv(tmp_path / "d.csv", [(f"good {i}", 0) for i in range(3)] + [(f"bad {i}", 1) for i in range(3)])
    before = snapshot(tmp_path)
    code, _, err = run_cli(["train", "-m", "tiny-random-llama", "-t", str(f), "--batch-size", "8",
                            "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "fewer than one batch" in err and err.count("error:") == 1, err
    assert snapshot(tmp_path) == before


def test_the_cli_prints_a_data_warning_as_one_line_and_a_config_field_silences_it(tmp_path):
    import subprocess
    import sys

    f = _csv(tmp_path / "d.csv", [(f"text {i % 10}", i % 2) for i in range(20)])
    argv = [str(Path(sys.executable).with_name("patchlm")), "train", "-m", "nope-model", "-t", str(f),
            "--out", str(tmp_path / "r"), "--batch-size", "2"]
    loud = subprocess.run(argv, capture_output=True, text=True)
    assert loud.returncode == 2 and "Traceback" not in loud.stderr, loud.stderr
    assert [ln for ln in loud.stderr.splitlines() if ln.startswith("warning:") and "duplicate" in ln], loud.stderr
    quiet = subprocess.run([*argv, "--no-data-warnings"], capture_output=True, text=True)
    assert quiet.returncode == 2 and "warning:" not in quiet.stderr, quiet.stderr


# ---------------------------------------------------------------- the sweep: bad input over every command
# (command path, argv, a substring the one error line must hold). {w} is the workspace (see `workspace`): lora
# (a good LoRA patch), nan (its tensors hold NaN), trunc (tensors cut short), badjson (patch.json is not JSON),
# badfield (patch.json's spec is a list), notdir (a file, so nothing can be written under it), bad.yml (not
# YAML), types.yml (a recipe with wrong types), one.csv (a single label), notjson (neither a key nor a registry).
TINY = ["-m", "tiny-random-llama"]
SWEEP = [
    ("train", ["train", *TINY, "-t", "sms_spam", "--lr", "nan", "--out", "{w}/run"], "lr"),
    ("train", ["train", *TINY, "-t", "sms_spam", "--steps", "-1", "--out", "{w}/run"], "steps"),
    ("train", ["train", *TINY, "-t", "sms_spam", "--save-every", "0", "--out", "{w}/run"], "save"),
    ("train", ["train", *TINY, "-t", "sms_spam", "--dropout", "-0.1", "--out", "{w}/run"], "dropout"),
    ("train", ["train", *TINY, "-t", "sms_spam", "--rank", "0", "--out", "{w}/run"], "rank"),
    ("train", ["train", *TINY, "-t", "sms_spam", "--rank", str(10**12), "--max-examples", "32", "-q",
               "--out", "{w}/run"], "not enough memory"),  # 512 TB: beyond any address space, it never allocates
    ("train", ["train", *TINY, "-t", "{w}/one.csv", "--out", "{w}/run"], "single value"),
    ("train", ["train", *TINY, "-t", "sms_spam", "--out", "{w}/notdir/run"], "notdir"),
    ("train", ["train", "--config", "{w}/bad.yml", "--out", "{w}/run"], "bad.yml"),
    ("train", ["train", "--config", "{w}/types.yml", "--out", "{w}/run"], "steps"),
    ("train", ["train", *TINY, "-t", "sms_spam", "--method", "nope", "--out", "{w}/run"], "nope"),
    ("eval", ["eval", *TINY, "-t", "sms_spam", "-p", "{w}/nan"], "NaN"),
    ("eval", ["eval", *TINY, "-t", "sms_spam", "-p", "{w}/trunc"], "trunc"),
    ("eval", ["eval", *TINY, "-t", "sms_spam", "--batch-size", "-3"], "batch"),
    ("eval", ["eval", *TINY, "-t", "no_such_task"], "no_such_task"),
    ("merge", ["merge", "{w}/bad.yml", "--out", "{w}/m"], "bad.yml"),
    ("merge", ["merge", "-p", "{w}/trunc", "-p", "{w}/lora", "--method", "linear", "--out", "{w}/m"], "trunc"),
    ("merge", ["merge", "-p", "{w}/lora", "-p", "{w}/lora2", "--method", "fisher", "--fisher-examples", "0",
               "--out", "{w}/m"], "fisher"),
    ("merge", ["merge", "-p", "{w}/lora", "-p", "{w}/lora2", "--method", "linear", "--out", "{w}/notdir/m"],
     "notdir"),
    ("glue", ["glue", "-p", "{w}/lora", "-p", "{w}/lora2", "-t", "sms_spam", "--trials", "0"], "trials"),
    ("glue", ["glue", "-p", "{w}/lora", "-p", "{w}/lora2", "-t", "sms_spam", "--threshold", "2"], "threshold"),
    ("port", ["port", "{w}/trunc", "--to", "tiny-random-llama", "--out", "{w}/p"], "trunc"),
    ("port", ["port", "{w}/lora", "--to", "tiny-random-llama", "--min-similarity", "nan", "--out", "{w}/p"],
     "similarity"),
    ("export", ["export", "{w}/badjson", "--out", "{w}/e"], "not valid JSON"),
    ("export", ["export", "{w}/lora", "--format", "nope", "--out", "{w}/e"], "nope"),
    ("info", ["info", "{w}/badfield"], "spec"),
    ("info", ["info", "{w}/missing"], "missing"),
    ("demo", ["demo", "--rank", "0", "--out", "{w}/d"], "rank"),
    ("demo", ["demo", "--steps", "-2", "--out", "{w}/d"], "steps"),
    ("drop apply", ["drop", "apply", *TINY, "-p", "{w}/nan", "--out", "{w}/dp"], "NaN"),
    ("drop score", ["drop", "score", *TINY, "-p", "{w}/badjson"], "not valid JSON"),
    ("skip train", ["skip", "train", *TINY, "-t", "sms_spam", "-p", "{w}/trunc", "--out", "{w}/s"], "trunc"),
    ("skip stats", ["skip", "stats", *TINY, "-p", "{w}/lora", "-t", "sms_spam"], "router"),
    ("federate", ["federate", *TINY, "-t", "sms_spam", "--dp", "--dp-noise", "-1", "--out", "{w}/f"], "noise"),
    ("federate", ["federate", *TINY, "-t", "sms_spam", "--timeout", "0", "--out", "{w}/f"], "timeout"),
    ("federate rebuild", ["federate", "rebuild", "{w}/missing", "--round", "1", "--out", "{w}/r"], "missing"),
    ("federate-keygen", ["federate-keygen", "--out", "{w}/new.key", "--registry", "{w}/notjson"], "notjson"),
    ("federate-app", ["federate-app", "--out", "{w}/notdir/app"], "notdir"),
    ("models", ["models", "--nope"], "--nope"),
    ("data", ["data", "--nope"], "--nope"),
    ("data export-harness", ["data", "export-harness", "{w}/one.csv", "--out", "{w}/h"], "single value"),
    ("data export-harness", ["data", "export-harness", "sms_spam", "--out", "{w}/notdir/h"], "notdir"),
    ("moe compress", ["moe", "compress", "{w}/missing", "-t", "sms_spam", "--out", "{w}/mc"], "missing"),
    ("moe upcycle", ["moe", "upcycle", "{w}/bad.yml", "--out", "{w}/mu"], "bad.yml"),
    ("quant", ["quant", *TINY, "--bits", "5", "--out", "{w}/q"], "bits"),
    ("report", ["report", "{w}/missing", "--out", "{w}/r.html"], "missing"),
    ("route eval", ["route", "eval", "{w}/missing", "-t", "sms_spam"], "missing"),
    ("route gates", ["route", "gates", "{w}/missing"], "missing"),
    ("route library add", ["route", "library", "add", "{w}/lib", "{w}/trunc", "-d", "spam"], "trunc"),
    ("route library list", ["route", "library", "list", "{w}/missing"], "missing"),
    ("select", ["select", "-t", "sms_spam", "--fraction", "2", "--out", "{w}/s.jsonl"], "fraction"),
]


def cli_commands() -> list[str]:
    """Every command the CLI app has, as its words ('drop apply'), walked from the app itself."""
    import typer.main

    from patchlm.cli.main import _register_all, app

    _register_all()

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if not subs:
            yield " ".join(path)
            return
        if path and getattr(cmd, "invoke_without_command", False):
            yield " ".join(path)  # a group that is also a command (federate)
        for name, sub in sorted(subs.items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def test_every_command_has_bad_input_cases():
    missing = sorted(set(cli_commands()) - {c for c, _, _ in SWEEP})
    assert not missing, (f"commands without bad-input cases in tests/test_hostile.py SWEEP: {', '.join(missing)}; "
                         "add (command, argv, expected substring) rows for them")
    stale = sorted({c for c, _, _ in SWEEP} - set(cli_commands()))
    assert not stale, f"SWEEP rows for commands the CLI no longer has: {', '.join(stale)}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The files the sweep's cases hand in, good and bad (see SWEEP)."""
    import json
    import shutil

    from conftest import randomize

    from patchlm.adapters.lora import LoraKind
    from patchlm.models import load_base
    from patchlm.patch import Patch

    w = tmp_path_factory.mktemp("sweep")
    base = load_base("tiny-random-llama")
    for name, seed in (("lora", 1), ("lora2", 2)):
        kind = LoraKind()
        spec = kind.attach(base.model, {"r": 2, "alpha": 4, "targets": "qv"}, None, seed=0)
        randomize(kind.trainable_parameters(base.model), seed=seed)
        Patch(kind="lora", base=base.ref(), spec=spec, tensors=kind.state(base.model)).save(w / name)
        kind.detach(base.model)
    nan_patch(w / "lora", w / "nan")
    shutil.copytree(w / "lora", w / "trunc")
    blob = (w / "trunc" / "tensors.safetensors").read_bytes()
    (w / "trunc" / "tensors.safetensors").write_bytes(blob[: len(blob) // 2])
    shutil.copytree(w / "lora", w / "badjson")
    (w / "badjson" / "patch.json").write_text('{"kind": "lora", ')
    shutil.copytree(w / "lora", w / "badfield")
    meta = json.loads((w / "badfield" / "patch.json").read_text())
    meta["spec"] = [1, 2]
    (w / "badfield" / "patch.json").write_text(json.dumps(meta))
    (w / "notdir").write_text("a file, not a directory\n")
    (w / "bad.yml").write_text("model: [unclosed\n  task: : :\n")
    (w / "types.yml").write_text("model: tiny-random-llama\ntask: sms_spam\ntrain:\n  steps: many\n")
    _csv(w / "one.csv", [(f"row {i}", 1) for i in range(20)])
    (w / "notjson").write_text("this is not JSON {\n")
    return w


@pytest.fixture()
def no_deployment(monkeypatch):
    """A case that got as far as starting a Flower deployment failed to validate first."""
    import patchlm.federated.flower.run as fed_run

    def boom(*a, **k):
        raise AssertionError("reached the Flower deployment before validating")

    monkeypatch.setattr(fed_run, "federate", boom)


@pytest.mark.parametrize(("command", "argv", "expect"), SWEEP, ids=[f"{c}:{i}" for i, (c, _, _) in enumerate(SWEEP)])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(workspace, capsys, no_deployment, command, argv,
                                                             expect, monkeypatch):
    monkeypatch.setenv("PATCHLM_HOME", str(workspace.parent / "home"))
    argv = [a.format(w=workspace) for a in argv]
    before = snapshot(workspace)
    listing = sorted(str(p) for p in workspace.rglob("*"))
    code, _, err = run_cli(argv, capsys)
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1, err
    assert expect.lower() in errors[0].lower(), (expect, err)
    assert snapshot(workspace) == before and sorted(str(p) for p in workspace.rglob("*")) == listing, argv


def test_an_unexpected_exception_is_one_line_saying_it_is_a_bug(monkeypatch, capsys):
    """Exit 1 is kept for bugs: one line that says so and how to report it; the traceback only under PATCHLM_DEBUG."""
    def broken(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("patchlm.patch.Patch.load", broken)  # `patchlm info` reads the patch through it
    code, _, err = run_cli(["info", "anything"], capsys)
    assert code == 1 and err.count("error:") == 1 and "Traceback" not in err, err
    assert "bug in patchlm" in err and "PATCHLM_DEBUG=1" in err and "ZeroDivisionError" in err, err
    monkeypatch.setenv("PATCHLM_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        run_cli(["info", "anything"], capsys)


def test_os_errors_from_the_users_paths_are_input_errors():
    import errno

    from patchlm.cli.main import input_error

    assert "cannot use /x/y" in input_error(PermissionError(errno.EACCES, "Permission denied", "/x/y"))
    assert "No space" in input_error(OSError(errno.ENOSPC, "No space left on device", "/x"))
    assert "not enough memory" in input_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: 9 bytes"))
    assert input_error(ZeroDivisionError("x")) is None and input_error(OSError(errno.EBADF, "bad fd")) is None


# ---------------------------------------------------------------- resume refuses another run's settings, by name
@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """tiny-random-llama saved as a checkpoint directory with one weight changed: another base (fingerprint)."""
    import torch

    from patchlm.models import load_base

    d = tmp_path_factory.mktemp("otherbase") / "base"
    base = load_base("tiny-random-llama")
    with torch.no_grad():
        next(base.model.parameters()).add_(0.5)
    base.model.save_pretrained(d)
    base.tokenizer.save_pretrained(d)
    return d


LORA = TRAIN[5:9]  # TRAIN's spec: --rank 2 --targets attn
RESUME = [*TRAIN[:5], *TRAIN[9:]]  # TRAIN without its spec (a case that changes the method has none)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("change", "expect"), [
    (["-t", "{csv}", *LORA], "task"),
    (["--method", "vera"], "method"),
    (["--rank", "4", "--targets", "attn"], "spec (r)"),
    (["-m", "{base}", *LORA], "base model"),
])
def test_resume_at_the_cli_refuses_another_task_method_spec_or_base_by_name(trained_run, other_base, tmp_path,
                                                                           capsys, change, expect):
    csv = _csv(tmp_path / "other.csv", [(f"good {i}", 0) for i in range(16)] + [(f"bad {i}", 1) for i in range(16)])
    change = [a.format(csv=csv, base=other_base) for a in change]
    before = snapshot(trained_run)
    code, _, err = run_cli([*RESUME, "--out", str(trained_run), "--resume", *change], capsys)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "cannot resume" in lines[0] and expect in lines[0] and "Traceback" not in err, err
    assert snapshot(trained_run) == before


# ---------------------------------------------------------------- NaN never reaches a saved patch or a metric
@pytest.mark.timeout(120)
def test_a_diverging_run_stops_with_one_line_and_writes_no_patch_or_nan(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    code, _, err = run_cli([*TRAIN, "--steps", "12", "--lr", "1e30", "--max-grad-norm", "0", "--warmup", "0",
                            "--save-every", "1", "--out", str(out)], capsys)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err and "lr" in lines[0], err
    assert not (out / "patch").exists()
    for f in out.rglob("*.json*"):  # strict JSON: a NaN or Infinity literal fails
        for doc in f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]:
            json.loads(doc, parse_constant=lambda c, f=f: pytest.fail(f"{f} holds {c}"))
    for f in out.rglob("*.safetensors"):
        from safetensors.torch import load_file

        assert all(bool(t.isfinite().all()) for t in load_file(str(f)).values() if t.is_floating_point()), f


# ---------------------------------------------------------------- no user-supplied file reaches a pickle loader
@pytest.mark.timeout(120)
def test_a_checkpoint_with_only_pickled_weights_is_refused_unread(other_base, tmp_path, capsys, monkeypatch):
    """A model directory whose weights are a pytorch_model.bin (a pickle: loading one can run code) is refused
    with one line naming the file; torch.load is never called (the grep test in test_layering covers
    patchlm's own code, this one the libraries it hands user paths to)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(other_base, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")  # a valid checkpoint: only its format is refused

    def refuse(*a, **k):
        raise AssertionError("a pickle loader was called on a user-supplied file")

    monkeypatch.setattr(torch, "load", refuse)  # how transformers reads a .bin (datasets' cache may use pickle)
    before = snapshot(tmp_path)
    for argv in (["eval", "-m", str(d), "-t", "sms_spam", "--limit", "2"],
                 [*TRAIN, "-m", str(d), "--out", str(tmp_path / "run")]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, (argv, err)
        assert "pytorch_model.bin" in err and "pickle" in err, (argv, err)
    assert snapshot(tmp_path) == before


def test_a_hub_model_without_safetensors_says_only_safetensors_are_loaded(monkeypatch):
    """A hub id whose repository has only pickled weights: transformers (use_safetensors=True) raises; the error
    says why instead of the generic 'offline?'."""
    import transformers

    from patchlm.errors import PatchlmError
    from patchlm.models.base import load_base

    def no_safetensors(path, **kw):
        assert kw.get("use_safetensors") is True
        raise OSError(f"{path} does not appear to have a file named model.safetensors")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_safetensors)
    with pytest.raises(PatchlmError) as e:
        load_base("someone/pickled-only-model")
    msg = str(e.value)
    assert "only from safetensors" in msg and "offline?" not in msg and "\n" not in msg
