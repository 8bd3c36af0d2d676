"""Readers that turn what patchlm writes into report sections: training runs (metrics.jsonl), federated runs
(log.jsonl), patches (patch.json: info, depth scores and plan, merge members and weights), Model-GLUE reports and
benchmark studies (docs/benchmarks/<study>.json)."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from patchlm.errors import ConfigError
from patchlm.paths import reject_constant
from patchlm.report.plots import bar_plot, heatmap, line_plot

MAX_TABLE_ROWS = 200


@dataclass
class Section:
    """One block of the page: a heading, an anchor, its HTML parts (plots, tables) and, for training runs, the
    curves a side-by-side comparison overlays."""

    title: str
    kind: str
    parts: list[str] = field(default_factory=list)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def esc(v) -> str:
    return html.escape(str(v))


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, dict | list | tuple):
        text = json.dumps(v, default=str)
        return text if len(text) <= 160 else text[:157] + "..."
    return str(v)


def table(rows: list[dict], columns: list[str] | None = None, caption: str | None = None) -> str:
    """An HTML table of dict rows (all keys seen, in first-seen order, unless columns are given)."""
    if not rows:
        return ""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    shown = rows[:MAX_TABLE_ROWS]
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in shown)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    more = (f'<p class="note">{len(rows) - len(shown)} more rows not shown</p>' if len(rows) > len(shown) else "")
    return f'<div class="table"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{more}'


def key_values(d: dict, caption: str | None = None) -> str:
    return table([{"field": k, "value": v} for k, v in d.items()], ["field", "value"], caption)


def read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject_constant)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records of a JSONL log and how many lines were skipped (a killed run's last line may be cut)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    recs, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line, parse_constant=reject_constant)
        except ValueError:
            bad += 1
            continue
        if isinstance(rec, dict):
            recs.append(rec)
        else:
            bad += 1
    return recs, bad


def _num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------ training runs
def training_run(path: Path) -> Section:
    """Curves of metrics.jsonl (train loss, learning rate, throughput, every validation metric) and the patch."""
    recs, bad = read_jsonl(path / "metrics.jsonl")
    sec = Section(f"training run {path.name}", "train")
    if bad:
        sec.notes.append(f"{bad} unreadable line(s) in metrics.jsonl skipped")
    train = [r for r in recs if "loss" in r and _num(r.get("step"))]
    val = [r for r in recs if any(k.startswith("val_") for k in r) and _num(r.get("step"))]
    loss = [(r["step"], r["loss"]) for r in train]
    sec.curves["loss"] = loss
    plot = line_plot({"train loss": loss}, "training loss", ylabel="loss")
    if plot:
        sec.parts.append(plot)
    val_keys = sorted({k for r in val for k in r if k.startswith("val_") and _num(r[k])})
    for k in val_keys:
        pts = [(r["step"], r[k]) for r in val if k in r]
        sec.curves[k] = pts
        plot = line_plot({k: pts}, f"validation {k[4:]}", ylabel=k)
        if plot:
            sec.parts.append(plot)
    for k, title in (("lr", "learning rate"), ("tokens_per_s", "throughput (tokens/s)")):
        plot = line_plot({k: [(r["step"], r[k]) for r in train if k in r]}, title, ylabel=k)
        if plot:
            sec.parts.append(plot)
    if not recs:
        sec.notes.append("metrics.jsonl has no records yet")
    for sub in ("patch", "checkpoints/last/patch"):
        if (path / sub / "patch.json").exists():
            sec.parts += patch_parts(path / sub, heading=f"patch ({sub})")
            break
    else:
        sec.notes.append("no patch written yet (the run has not reached its first checkpoint)")
    if recs:
        sec.parts.append(table(recs[-20:], caption="last metrics records"))
    return sec


# ------------------------------------------------------------------ federated runs
def federated_run(path: Path) -> Section:
    """Per round: accuracy, aggregation error, bytes, signing and verification time, rejections; per client."""
    recs, bad = read_jsonl(path / "log.jsonl")
    sec = Section(f"federated run {path.name}", "federated")
    if bad:
        sec.notes.append(f"{bad} unreadable line(s) in log.jsonl skipped")
    cfg = read_json(path / "federate.json") if (path / "federate.json").exists() else {}
    if isinstance(cfg, dict) and cfg:
        keep = ("model", "task", "aggregation", "scheme", "clients", "rounds", "ranks", "local_steps", "sign", "dp",
                "protocol", "broadcast", "partition", "seed")
        sec.parts.append(key_values({k: cfg[k] for k in keep if k in cfg}, "configuration (federate.json)"))
    rounds = {}
    for r in recs:
        if r.get("event") == "round" and _num(r.get("round")):
            rounds[int(r["round"])] = r  # a resumed run may log a round again: the last record wins
    ordered = [rounds[k] for k in sorted(rounds)]
    acc = {k: [(r["round"], r[k]) for r in ordered if k in r] for k in ("eval_accuracy", "eval_macro_f1")}
    for plot in (
        line_plot(acc, "global model accuracy per round", xlabel="round", ylabel="accuracy"),
        line_plot({"aggregation error": [(r["round"], r["aggregation_error"]) for r in ordered
                                         if "aggregation_error" in r]},
                  "aggregation error per round", xlabel="round", ylabel="relative error", logy=True),
        line_plot({k: [(r["round"], r[k]) for r in ordered if k in r] for k in ("bytes_up", "bytes_down")},
                  "bytes on the wire per round", xlabel="round", ylabel="bytes"),
        line_plot({k: [(r["round"], r[k]) for r in ordered if k in r]
                   for k in ("sign_seconds_clients", "broadcast_sign_seconds", "verify_seconds",
                             "verify_broadcast_seconds")},
                  "signing and verification time per round", xlabel="round", ylabel="seconds"),
        line_plot({"rejected updates": [(r["round"], len(r.get("rejected") or [])) for r in ordered
                                        if r["round"] > 0]},
                  "rejected updates per round", xlabel="round", ylabel="count"),
    ):
        if plot:
            sec.parts.append(plot)
    clients: dict[str, dict[str, list]] = {}
    for r in ordered:
        for c in r.get("clients") or []:
            cid = str(c.get("client_id", "?"))
            for k in ("train_loss", "bytes_up", "sign_seconds", "train_seconds", "num_samples"):
                if _num(c.get(k)):
                    clients.setdefault(k, {}).setdefault(cid, []).append((r["round"], c[k]))
    for k, title in (("train_loss", "client training loss"), ("bytes_up", "client upload bytes"),
                     ("sign_seconds", "client signing time (s)"), ("train_seconds", "client training time (s)")):
        plot = line_plot(clients.get(k, {}), f"{title} per round", xlabel="round", ylabel=k)
        if plot:
            sec.parts.append(plot)
    rejected = [{"round": r["round"], **x} for r in ordered for x in (r.get("rejected") or [])]
    sec.parts.append(table(rejected, caption="rejected updates and why") if rejected
                     else '<p class="note">no update was rejected</p>')
    failed = [r for r in recs if r.get("event") == "round_failed"]
    if failed:
        sec.parts.append(table(failed, caption="failed rounds"))
    flat = [{k: v for k, v in r.items() if k not in ("clients", "rejected", "weights")} for r in ordered]
    sec.parts.append(table(flat, caption="rounds"))
    if (path / "final" / "patch" / "patch.json").exists():
        sec.parts += patch_parts(path / "final" / "patch", heading="final patch")
    if not ordered:
        sec.notes.append("log.jsonl has no completed round yet")
    return sec


# ------------------------------------------------------------------ patches
def patch_parts(path: Path, heading: str = "patch") -> list[str]:
    """The patch's info, and for drop patches the per-layer scores and plan, for merged patches the members."""
    from patchlm.patch import Patch

    p = Patch.load(path)
    info = p.info()
    parts = [f"<h3>{esc(heading)}: {esc(p.kind)}</h3>",
             key_values({k: info.get(k) for k in ("kind", "base", "trainable_params", "num_tensors", "file_bytes")
                         if k in info}),
             key_values(p.spec, "spec") if p.spec else "",
             key_values(p.metrics, "metrics") if p.metrics else ""]
    if p.kind == "drop":
        parts += _drop_parts(p)
    glue = (p.metrics or {}).get("glue")
    if isinstance(glue, dict) and isinstance(glue.get("weights"), dict):
        w = glue["weights"]
        plot = bar_plot(list(w), {"weight": list(w.values())}, f"merge weights ({glue.get('heuristic', '-')})")
        if plot:
            parts.append(plot)
    members = (p.provenance or {}).get("members") or (p.spec or {}).get("members")
    if isinstance(members, list) and members:
        parts.append(table([m if isinstance(m, dict) else {"member": m} for m in members], caption="members"))
    return [x for x in parts if x]


def _drop_parts(p) -> list[str]:
    parts = []
    for t in ("attention", "mlp", "block"):
        key = f"scores.{t}"
        if key not in p.tensors:
            continue
        scores = [float(v) for v in p.tensors[key].tolist()]
        dropped = set(p.spec.get(t) or [])
        plot = bar_plot([str(i) for i in range(len(scores))], {f"{t} similarity": scores},
                        f"{t}: per-layer similarity score (hatched: dropped {sorted(dropped) or 'none'})",
                        ylabel="cosine similarity", highlight=sorted(dropped))
        if plot:
            parts.append(plot)
    plan = {t: p.spec.get(t) for t in ("attention", "mlp", "block") if t in p.spec}
    if plan:
        parts.append(key_values(plan, "drop plan (layer indices)"))
    return parts


def patch_section(path: Path) -> Section:
    return Section(f"patch {path.name}", "patch", parts=patch_parts(path))


# ------------------------------------------------------------------ Model-GLUE reports
def glue_report(path: Path, report: dict) -> Section:
    """Members and their validation scores, the similarity matrix, each heuristic's weights and its reasons."""
    sec = Section(f"Model-GLUE report {path.name}", "glue")
    sec.parts += glue_parts(report)
    return sec


def glue_parts(report: dict) -> list[str]:
    parts = []
    members = report.get("members") or []
    names = [str(m.get("name")) for m in members if isinstance(m, dict)]
    if members:
        parts.append(table(members, caption="members"))
        plot = bar_plot(names, {"validation score": [m.get("validation_score") for m in members]},
                        "validation score of each member")
        if plot:
            parts.append(plot)
    sim = report.get("similarity") or {}
    if isinstance(sim, dict) and sim.get("matrix") and len(sim["matrix"]) == len(names):
        plot = heatmap(sim["matrix"], names, f"similarity of members (on {sim.get('on', '?')})")
        if plot:
            parts.append(plot)
    heur = report.get("heuristics") or {}
    if isinstance(heur, dict) and heur:
        rows = [{"heuristic": h, "score": s.get("score"), "weights": s.get("weights")} for h, s in heur.items()
                if isinstance(s, dict)]
        if isinstance(report.get("merge_all"), dict):
            rows.append({"heuristic": "merge all", "score": report["merge_all"].get("score"),
                         "weights": report["merge_all"].get("weights")})
        parts.append(table(rows, caption=f"selections (best: {report.get('best', '-')})"))
        weights = {r["heuristic"]: [(r["weights"] or {}).get(n) for n in names] for r in rows
                   if isinstance(r.get("weights"), dict)}
        plot = bar_plot(names, weights, "merge weight of each member per selection")
        if plot:
            parts.append(plot)
        steps = [{"heuristic": h, **st} for h, s in heur.items() if isinstance(s, dict)
                 for st in (s.get("steps") or []) if isinstance(st, dict)]
        if steps:
            parts.append(table(steps, caption="why each member was kept or left out"))
    if report.get("mix"):
        parts.append(key_values(report["mix"], "mixture"))
    return parts


# ------------------------------------------------------------------ benchmark studies
def study(path: Path, data: dict) -> Section:
    """A benchmark study: its settings, the rows table, and bar charts of its numeric metrics."""
    name = str(data.get("study") or path.stem)
    sec = Section(f"benchmark: {name}", "study")
    meta = {k: data[k] for k in ("command", "machine", "date") if k in data}
    if meta:
        sec.parts.append(key_values(meta))
    rows = [r for r in data.get("rows") or data.get("runs") or [] if isinstance(r, dict)]
    labels = [str(r.get("name", i)) for i, r in enumerate(rows)]
    numeric = []
    for r in rows:
        numeric += [k for k, v in r.items() if _num(v) and k not in numeric]
    acc = [k for k in numeric if "acc" in k and "std" not in k]
    if acc:
        plot = bar_plot(labels, {k: [r.get(k) for r in rows] for k in acc}, f"{name}: accuracy", ylabel="accuracy")
        if plot:
            sec.parts.append(plot)
    for k in [k for k in numeric if k not in acc and "std" not in k][:8]:
        plot = bar_plot(labels, {k: [r.get(k) for r in rows]}, f"{name}: {k}", ylabel=k)
        if plot:
            sec.parts.append(plot)
    per_round = [k for r in rows for k, v in r.items()
                 if isinstance(v, list) and v and all(_num(x) for x in v) and k.endswith("per_round")]
    for k in dict.fromkeys(per_round):
        series = {lab: list(enumerate(r[k], 1)) for lab, r in zip(labels, rows) if isinstance(r.get(k), list)}
        plot = line_plot(series, f"{name}: {k}", xlabel="round", ylabel=k)
        if plot:
            sec.parts.append(plot)
    if isinstance(data.get("glue_report"), dict):
        sec.parts.append("<h3>Model-GLUE report</h3>")
        sec.parts += glue_parts(data["glue_report"])
    sec.parts.append(table(rows, caption="rows"))
    if not rows:
        sec.notes.append("the study has no rows")
    return sec
