"""patchlm report: deterministic inline-SVG pages for training runs, federated runs, patches, Model-GLUE reports and
the benchmark directory, opened in headless Chromium (Selenium + the system chromedriver): no console error,
every expected plot present with data in it, a screenshot that is not blank. Bad input: one line, exit 2."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ runs the page is made of (built once)
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short LoRA training runs (different lr) on tiny-random-llama and a drop patch."""
    from patchlm.data import load_task
    from patchlm.depth.drop import drop_patch
    from patchlm.models import load_base
    from patchlm.train.config import TrainConfig
    from patchlm.train.trainer import train_patch

    root = tmp_path_factory.mktemp("runs")
    task = load_task("sms_spam", max_examples=60)
    for name, lr in (("a", 1e-3), ("b", 3e-3)):
        cfg = TrainConfig(steps=4, batch_size=4, lr=lr, log_every=1, eval_every=2, eval_limit=8, progress=False)
        train_patch(load_base("tiny-random-llama"), task, "lora", {"r": 2}, cfg, out=root / name)
    base = load_base("tiny-random-llama")
    n = base.num_layers
    scores = {"attention": [0.5 + 0.1 * i for i in range(n)], "mlp": [0.9 - 0.1 * i for i in range(n)]}
    drop_patch(base, {"attention": [n - 1], "mlp": [0], "block": []}, scores, "similarity",
               {"task": "sms_spam"}).save(root / "drop")
    return root


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory):
    """One real federated round (2 clients over a local Flower deployment, signed): what the page reads."""
    from patchlm.federated.config import FedConfig
    from patchlm.federated.flower.run import federate

    out = tmp_path_factory.mktemp("fed") / "run"
    federate(FedConfig(clients=2, rounds=1, local_steps=2, eval_limit=16, max_train=120, ranks=[4, 2]), out,
             timeout=240)
    return out


# ------------------------------------------------------------------ plots and pages without a browser
def test_svg_plots_are_deterministic_and_dateless():
    from patchlm.report.plots import bar_plot, heatmap, line_plot

    a = line_plot({"x": [(1, 2.0), (2, 1.5), (3, float("nan"))]}, "loss")
    assert a == line_plot({"x": [(1, 2.0), (2, 1.5)]}, "loss")  # non-finite points are left out, same bytes
    assert a.startswith('<figure class="plot" data-series="1" data-points="2">') and "<svg" in a
    assert "<dc:date>" not in a and "<?xml" not in a
    assert bar_plot(["l0", "l1"], {"s": [0.1, None]}, "b").count('data-points="1"') == 1
    assert heatmap([[1.0, 0.5], [0.5, 1.0]], ["a", "b"], "sim") == heatmap([[1.0, 0.5], [0.5, 1.0]], ["a", "b"], "sim")
    assert line_plot({"x": []}, "empty") is None and bar_plot([], {}, "none") is None


def test_page_of_runs_is_deterministic_and_self_contained(runs, tmp_path, capsys):
    args = ["report", str(runs / "a"), str(runs / "b"), str(runs / "drop")]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "one.html")], capsys)
    assert code == 0, err
    code, out, err = run_cli([*args, "--out", str(tmp_path / "two.html"), "--json"], capsys)
    assert code == 0, err and json.loads(out)["bytes"] > 0
    page = (tmp_path / "one.html").read_text()
    assert page == (tmp_path / "two.html").read_text()
    for text in ("comparison of 2 training runs", "loss: all runs", "training loss", "validation accuracy",
                 "attention: per-layer similarity score", "drop plan"):
        assert text in page, text
    for ref in ("<script", "<link", 'src="http', 'href="http', "url(http", "@import"):
        assert ref not in page, ref  # nothing fetched: the page works offline


def test_glue_report_json_and_benchmark_dir(tmp_path, capsys):
    glue = json.loads((ROOT / "docs" / "benchmarks" / "merging.json").read_text())["glue_report"]
    (tmp_path / "glue.json").write_text(json.dumps(glue))
    code, _, err = run_cli(["report", str(tmp_path / "glue.json"), "--out", str(tmp_path / "g.html")], capsys)
    assert code == 0, err
    page = (tmp_path / "g.html").read_text()
    assert "similarity of members" in page and "why each member was kept or left out" in page
    assert "merge weight of each member per selection" in page


# ------------------------------------------------------------------ the browser
def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra has it)")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium/chromedriver on PATH: `apt-get install -y chromium chromium-driver` (make setup "
                    "does it where it runs as root with apt)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1600",
              "--hide-scrollbars"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


FIGURES_JS = """return Array.from(document.querySelectorAll('figure.plot')).map(f => {
  const svg = f.querySelector('svg'); const r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  return {title: f.querySelector('figcaption').textContent, points: Number(f.dataset.points),
          marks: f.querySelectorAll('g[id^="line2d"] path, g[id^="patch"] path, image').length,
          width: r.width, height: r.height};
});"""


def _not_blank(png: bytes) -> float:
    """Share of pixels that are not (near) white."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("L")
    hist = img.histogram()
    return 1 - sum(hist[245:]) / sum(hist)


@pytest.mark.slow
def test_pages_open_in_headless_chromium(runs, fed_run, tmp_path, capsys):
    """The report of two training runs (with the drop patch), of one federated run and of docs/benchmarks/."""
    pages = {
        "runs": ([runs / "a", runs / "b", runs / "drop"],
                 ["loss: all runs", "training loss", "validation accuracy", "learning rate",
                  "attention: per-layer similarity score"]),
        "fed": ([fed_run], ["global model accuracy per round", "bytes on the wire per round",
                            "signing and verification time per round", "client training loss per round"]),
        "bench": ([ROOT / "docs" / "benchmarks"], ["adapters: accuracy", "depth: accuracy", "merging: accuracy",
                                                   "federated: accuracy_per_round"]),
    }
    for name, (paths, _) in pages.items():
        code, _, err = run_cli(["report", *map(str, paths), "--out", str(tmp_path / f"{name}.html")], capsys)
        assert code == 0, err
    browser = _browser()
    try:
        for name, (_, expected) in pages.items():
            browser.get((tmp_path / f"{name}.html").as_uri())
            figures = browser.execute_script(FIGURES_JS)
            titles = [f["title"] for f in figures]
            for t in expected:
                assert any(x.startswith(t) for x in titles), f"{name}: no plot {t!r} in {titles}"
            for f in figures:
                assert f["points"] > 0 and f["marks"] > 0, f"{name}: plot {f['title']!r} has no data"
                assert f["width"] > 100 and f["height"] > 50, f"{name}: plot {f['title']!r} is not drawn"
            errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
            assert not errors, f"{name}: console errors {errors}"
            shot = browser.get_screenshot_as_png()
            (tmp_path / f"{name}.png").write_bytes(shot)
            assert _not_blank(shot) > 0.02, f"{name}: the screenshot is blank"
    finally:
        browser.quit()


# ------------------------------------------------------------------ bad input
def test_bad_input_one_line_exit_2_nothing_written(runs, tmp_path, capsys):
    out = tmp_path / "r.html"
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(runs / "a" / "metrics.jsonl")], "not a .json"),
        ([str(tmp_path / "empty")], "is not a training run"),
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "odd.json").write_text('{"hello": 1}')
    cases.append(([str(tmp_path / "odd.json")], "neither a benchmark study"))
    (tmp_path / "nan.json").write_text('{"study": "x", "rows": [{"name": "a", "v": NaN}]}')
    cases.append(([str(tmp_path / "nan.json")], "not valid JSON"))
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    cases.append(([str(tmp_path / "bin.json")], "cannot read"))
    for paths, msg in cases:
        code, _, err = run_cli(["report", *paths, "--out", str(out)], capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (paths, err)
        assert not out.exists()
    code, _, err = run_cli(["report", str(runs / "a"), "--out", str(tmp_path / "r.txt")], capsys)
    assert code == 2 and ".html" in err and not (tmp_path / "r.txt").exists()
    code, _, err = run_cli(["report", "--out", str(out)], capsys)
    assert code == 2 and not out.exists()
    out.write_text("keep me")
    code, _, err = run_cli(["report", str(runs / "a"), "--out", str(out)], capsys)
    assert code == 2 and "--force" in err and out.read_text() == "keep me"
    code, _, err = run_cli(["report", str(runs / "a"), "--out", str(out), "--force"], capsys)
    assert code == 0 and out.read_text().startswith("<!DOCTYPE html>")
    (tmp_path / "d.html").mkdir()
    code, _, err = run_cli(["report", str(runs / "a"), "--out", str(tmp_path / "d.html"), "--force"], capsys)
    assert code == 2 and "directory" in err


def test_killed_run_with_a_cut_last_line_still_reports(runs, tmp_path, capsys):
    run = tmp_path / "cut"
    shutil.copytree(runs / "a", run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 1.')
    code, _, err = run_cli(["report", str(run), "--out", str(tmp_path / "c.html")], capsys)
    assert code == 0, err
    assert "1 unreadable line(s) in metrics.jsonl skipped" in (tmp_path / "c.html").read_text()
