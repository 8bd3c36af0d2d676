"""`patchlm report`: one self-contained HTML page (inline CSS and SVG, no script, no network) for run
directories, patches, federated runs, Model-GLUE reports and benchmark studies, with a side-by-side comparison
when several training runs are given. The same inputs give the same bytes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from patchlm.errors import ConfigError
from patchlm.paths import atomic_write_text, check_output
from patchlm.report.plots import line_plot
from patchlm.report.sections import (
    Section,
    esc,
    federated_run,
    glue_report,
    patch_section,
    read_json,
    study,
    training_run,
)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em;background:#fff}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
nav ul{columns:2}figure.plot{display:inline-block;margin:.5em;vertical-align:top;max-width:100%}
figure.plot svg{max-width:100%;height:auto}figcaption{font-size:.8em;color:#555;text-align:center}
div.table{overflow-x:auto;margin:.6em 0}table{border-collapse:collapse;font-size:.8em}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top;min-width:3em;
max-width:32em;overflow-wrap:break-word}th{background:#f4f4f4}caption{text-align:left;font-weight:600;padding:.3em 0}
p.note{color:#8a5300;font-size:.85em}code{background:#f4f4f4;padding:0 .2em}
"""


def sections_for(path: Path) -> list[Section]:
    """What a path holds, as report sections (a ConfigError naming the path when it is none of them)."""
    if not path.exists():
        raise ConfigError(f"report input {path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ConfigError(f"report input {path} is a file but not a .json report or study; give a run, "
                              "patch or benchmark directory, or a JSON file")
        return [_json_section(path)]
    if (path / "log.jsonl").exists() and (path / "federate.json").exists():
        return [federated_run(path)]
    if (path / "metrics.jsonl").exists():
        return [training_run(path)]
    if (path / "patch.json").exists():
        return [patch_section(path)]
    studies = sorted(p for p in path.glob("*.json") if p.is_file())
    out = []
    for p in studies:
        data = read_json(p)
        if isinstance(data, dict) and ("rows" in data or "study" in data):
            out.append(study(p, data))
    if out:
        return out
    runs = sorted(p.parent for p in path.glob("*/metrics.jsonl")) + sorted(p.parent for p in path.glob("*/log.jsonl"))
    if runs:
        return [s for r in dict.fromkeys(runs) for s in sections_for(r)]
    raise ConfigError(f"report input {path} is not a training run (metrics.jsonl), a federated run (log.jsonl and "
                      "federate.json), a patch (patch.json), a directory of benchmark studies (*.json) or of runs")


def _json_section(path: Path) -> Section:
    data = read_json(path)
    if isinstance(data, dict) and "members" in data and "heuristics" in data:
        return glue_report(path, data)
    if isinstance(data, dict) and ("rows" in data or "study" in data):
        return study(path, data)
    raise ConfigError(f"{path} is neither a benchmark study (study, rows) nor a Model-GLUE report (members, "
                      "heuristics)")


def _comparison(sections: list[Section]) -> Section | None:
    """Overlay the curves several training runs share (train loss, each validation metric)."""
    runs = [s for s in sections if s.kind == "train"]
    if len(runs) < 2:
        return None
    sec = Section(f"comparison of {len(runs)} training runs", "compare")
    keys = [k for k in runs[0].curves if all(k in r.curves for r in runs[1:])]
    for k in keys:
        plot = line_plot({r.title.removeprefix("training run "): r.curves[k] for r in runs}, f"{k}: all runs",
                         ylabel=k)
        if plot:
            sec.parts.append(plot)
    if not sec.parts:
        sec.notes.append("the runs share no curve")
    return sec


def build_report(paths: Sequence[str | Path], title: str | None = None) -> str:
    """The HTML page for `paths` (each a run, patch, federated run, benchmark directory or JSON report)."""
    if not paths:
        raise ConfigError("give at least one path to report on")
    sections: list[Section] = []
    for p in paths:
        sections += sections_for(Path(p))
    cmp = _comparison(sections)
    if cmp is not None:
        sections.insert(0, cmp)
    title = title or "patchlm report: " + ", ".join(Path(p).name or str(p) for p in paths)
    nav = "".join(f'<li><a href="#s{i}">{esc(s.title)}</a></li>' for i, s in enumerate(sections))
    body = []
    for i, s in enumerate(sections):
        notes = "".join(f'<p class="note">{esc(n)}</p>' for n in s.notes)
        body.append(f'<section id="s{i}" class="{esc(s.kind)}"><h2>{esc(s.title)}</h2>{notes}{"".join(s.parts)}'
                    "</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><nav><ul>{nav}</ul></nav>{''.join(body)}"
            "<footer><p class=\"note\">made by <code>patchlm report</code></p></footer></body></html>\n")


def write_report(paths: Sequence[str | Path], out: str | Path, force: bool = False,
                 title: str | None = None) -> Path:
    """Build the page and write it to `out` atomically (refusing an existing file unless force)."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"the report is an HTML page: --out must end in .html, got {out}")
    check_output(out, force)
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name ending in .html")
    page = build_report(paths, title=title)
    atomic_write_text(out, page, mode=0o644)
    return out
