"""bench/common.py's RowCache: committed studies keep finished rows under bench/rows/ (they travel with the
repository), artifact studies and quick runs under bench/.cache/; rows cached before the move are read and moved."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common


@pytest.fixture
def roots(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "ROWS", tmp_path / "rows")
    monkeypatch.setattr(common, "CACHE", tmp_path / "cache")
    monkeypatch.delenv("PATCHLM_BENCH_LOCK", raising=False)
    return tmp_path


def test_committed_rows_go_to_bench_rows_and_are_not_recomputed(roots):
    calls = []
    c = common.RowCache("study", "full", committed=True)
    row = c.run("a/b", lambda: calls.append(1) or {"x": 1.5})
    assert row == {"x": 1.5} and (roots / "rows" / "study" / "full" / "a_b.json").exists()
    assert common.RowCache("study", "full", committed=True).run("a/b", lambda: calls.append(2) or {}) == row
    assert calls == [1]
    assert not (roots / "cache" / "study").exists()


def test_artifact_studies_and_quick_runs_stay_in_the_machine_cache(roots):
    common.RowCache("study", "full").put("k", {"v": 1})
    common.RowCache("study", "quick", committed=True).put("k", {"v": 2})
    assert json.loads((roots / "cache" / "study" / "full" / "k.json").read_text()) == {"v": 1}
    assert json.loads((roots / "cache" / "study" / "quick" / "k.json").read_text()) == {"v": 2}
    assert not (roots / "rows").exists()


def test_a_row_cached_before_the_move_is_read_and_moved(roots):
    old = roots / "cache" / "study" / "full"
    old.mkdir(parents=True)
    (old / "k.json").write_text(json.dumps({"v": 3}))
    c = common.RowCache("study", "full", committed=True)
    assert c.run("k", lambda: pytest.fail("recomputed a cached row")) == {"v": 3}
    assert json.loads((roots / "rows" / "study" / "full" / "k.json").read_text()) == {"v": 3}


def test_a_study_without_measured_rows_writes_no_page(roots, monkeypatch):
    monkeypatch.setattr(common, "DOCS", roots / "docs")
    with pytest.raises(ValueError, match="no measured row"):
        common.write_results("study", [], "text")
    assert not (roots / "docs").exists()
    jf, mf = common.write_results("study", [{"name": "a", "x": 1}], "text")
    assert json.loads(jf.read_text())["rows"] == [{"name": "a", "x": 1}] and "- plots:" in mf.read_text()


def test_the_page_json_is_strict_json(roots, monkeypatch):
    """A non-private row's epsilon is inf: the JSON page says null (Python's `Infinity` is not JSON)."""
    monkeypatch.setattr(common, "DOCS", roots / "docs")
    jf, _ = common.write_results("study", [{"name": "a", "epsilon": float("inf"), "x": [1.0, float("nan")]}], "t")
    text = jf.read_text()
    assert "Infinity" not in text and "NaN" not in text
    row = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))["rows"][0]
    assert row == {"name": "a", "epsilon": None, "x": [1.0, None]}
