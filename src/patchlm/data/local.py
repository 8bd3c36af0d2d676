"""User data: local csv/tsv/json/jsonl/parquet files and (with network) Hugging Face hub datasets."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Number
from pathlib import Path

from patchlm.data.config import DataConfig
from patchlm.data.task import DEFAULT_RATIOS, Task, build_task, clean_text, dedup_key, deduplicate
from patchlm.errors import ConfigError, DataError

SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
LOCAL_TEMPLATE = "Text: {text}\nLabel:"


def read_table(path: Path):
    """Read one supported file into a pandas DataFrame; unreadable or empty files raise DataError."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"cannot read {path}: unsupported suffix {suffix!r}; "
                        f"use one of {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    try:
        if suffix in (".csv", ".tsv"):
            sep = "\t" if suffix == ".tsv" else ","
            try:
                df = pd.read_csv(path, sep=sep)
            except UnicodeDecodeError:
                df = pd.read_csv(path, sep=sep, encoding="latin-1")
        elif suffix == ".jsonl":
            df = pd.read_json(path, lines=True)
        elif suffix == ".json":
            try:
                df = pd.read_json(path)
            except ValueError:  # JSON lines saved as .json
                df = pd.read_json(path, lines=True)
        else:
            df = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} has no data") from None
    except (ValueError, TypeError, OSError, pd.errors.ParserError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read {path} as {suffix[1:]}: {reason}") from e
    if len(df) == 0:
        raise DataError(f"{path} has a header but no rows")
    return df


def _label_value(value):
    """A label cell as a hashable scalar: integral floats (1.0 from pandas) become ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if hasattr(value, "item"):  # numpy scalars
        return _label_value(value.item())
    return value


def _present(value, column: str, row: int, source: str) -> bool:
    """Whether a text or label cell holds a value (False: empty/NaN); a list or mapping there is refused."""
    import pandas as pd

    if isinstance(value, (list, tuple, dict, set)) or getattr(value, "ndim", 0):
        raise DataError(f"{source}: row {row + 1} has a {type(value).__name__} in the {column!r} column; each cell "
                        "must hold one text or label value")
    return not pd.isna(value)


def _sorted_labels(values: set) -> list:
    """Label values in a stable order: numeric order when all are numbers, else by their text."""
    if all(isinstance(v, Number) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return sorted(values, key=str)


def _as_messages(value) -> list[dict]:
    """A 'messages' cell (list, or numpy array from parquet) as [{'role', 'content'}], [] if unusable."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return []
    messages = [{"role": str(m.get("role", "")), "content": str(m.get("content") or "")}
                for m in value if isinstance(m, dict)]
    return messages if any(m["role"] == "user" and m["content"].strip() for m in messages) else []


def _missing(column: str, what: str, columns: Sequence[str], where: str) -> DataError:
    """The error for an absent column, listing the ones there are."""
    return DataError(f"{where} has no {what} column {column!r}; "
                     f"available columns: {', '.join(map(str, columns))}"
                     f" (pass --{what}-column / {what}_column=...)")


def frame_to_task(df, *, name: str, source: str, text_column: str | None, label_column: str | None,
                  seed: int = 0, split_ratios: Sequence[float] = DEFAULT_RATIOS,
                  max_examples: int | None = None,
                  label_names: Sequence[str] | None = None, description: str = "", license: str = "",
                  checks: DataConfig | None = None) -> Task:
    """Turn a table into a Task: classification when it has a label column, else text (or chat/qa)."""
    columns = [str(c) for c in df.columns]
    meta = {"source": source, "license": license, "description": description or f"user data from {source}"}
    common = {"name": name, "seed": seed, "split_ratios": split_ratios, "max_examples": max_examples}
    tcol = text_column or "text"
    if tcol not in columns:
        if text_column is None and "messages" in columns:
            rows = [{"messages": m} for m in map(_as_messages, df["messages"]) if m]
            return build_task(rows, kind="chat", **common, **meta)
        if text_column is None and {"question", "answer"} <= set(columns):
            rows = []
            for q, a in zip(df["question"], df["answer"]):
                if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
                    rows.append({"question": q.strip(), "answer": a.strip(), "messages": [
                        {"role": "user", "content": q.strip()}, {"role": "assistant", "content": a.strip()}]})
            return build_task(rows, kind="qa", **common, **meta)
        raise _missing(tcol, "text", columns, source)

    lcol = label_column or "label"
    if lcol not in columns:
        if label_column is not None:
            raise _missing(lcol, "label", columns, source)
        texts = [clean_text(str(t)) for i, t in enumerate(df[tcol]) if _present(t, tcol, i, source)]
        return build_task([{"text": t} for t in texts if t], kind="text", **common, **meta)

    checks = checks or DataConfig()
    pairs = [(clean_text(str(t)), _label_value(v)) for i, (t, v) in enumerate(zip(df[tcol], df[lcol]))
             if _present(t, tcol, i, source) and _present(v, lcol, i, source)]
    pairs = [(t, v) for t, v in pairs if t]
    if 0 < len(pairs) < len(df):
        checks.warn(f"{source}: {len(df) - len(pairs)} of {len(df)} rows have an empty {tcol!r} or {lcol!r} and "
                    "are skipped")
    if label_names is not None:  # integer class ids with known names (hub ClassLabel); -1 = unlabelled
        labels = [str(n) for n in label_names]
        rows = [{"text": t, "label": int(v)} for t, v in pairs if isinstance(v, int) and 0 <= v < len(labels)]
    else:
        values = _sorted_labels({v for _, v in pairs})
        check_labels(values, len(pairs), source, lcol, checks)
        labels = [str(v) for v in values]
        if len(set(labels)) != len(labels):
            raise DataError(f"{source}: label values {values!r} collide when written as text")
        index = {v: i for i, v in enumerate(values)}
        rows = [{"text": t, "label": index[v]} for t, v in pairs]
    if not rows:
        raise DataError(f"{source} has no rows with both {tcol!r} and {lcol!r} filled")
    unique = deduplicate(rows, "classification")
    if len(unique) < len(rows):
        keys = {dedup_key(r, "classification") for r in rows}
        conflicting = len(keys) - len(unique)
        checks.warn(f"{source}: {len(rows) - len(unique)} duplicate rows dropped (each text is kept once, so no text "
                    "is in two splits)" + (f"; {conflicting} texts with disagreeing labels dropped entirely"
                                           if conflicting else ""))
    if len({r["label"] for r in unique}) < 2:
        raise DataError(f"{source}: after dropping duplicates only one label is left; a classifier needs rows of "
                        "at least two labels")
    return build_task(unique, kind="classification", labels=labels, verbalizers=[" " + lab for lab in labels],
                      template=LOCAL_TEMPLATE, deduplicated=True, **common, **meta)


def check_labels(values: list, rows: int, source: str, column: str, checks: DataConfig) -> None:
    """Refuse a label column that cannot be classes: one value, fractional numbers, or too many distinct values."""
    if len(values) < 2:
        raise DataError(f"{source}: the {column!r} column has a single value ({values[0]!r} in every row); a "
                        "classifier needs at least two labels")
    fractional = [v for v in values if isinstance(v, float)]
    if fractional:
        raise DataError(f"{source}: the {column!r} column looks continuous (values like "
                        f"{', '.join(repr(v) for v in fractional[:3])}); classification needs a few discrete labels: "
                        "round or bin them, or choose another --label-column")
    if len(values) > checks.max_labels:
        raise ConfigError(f"{source}: the {column!r} column has {len(values)} distinct values, more than "
                          f"max_labels ({checks.max_labels}): it looks continuous or like an id; raise max_labels if "
                          "these really are classes", field="max_labels")
    if len(values) > max(2, rows // 2):
        raise DataError(f"{source}: the {column!r} column has {len(values)} distinct values in {rows} rows (most "
                        "labels would have a single example): it looks continuous or like an id column")


def load_local(path: str | Path, *, seed: int = 0, text_column: str | None = None,
               label_column: str | None = None, split_ratios: Sequence[float] = DEFAULT_RATIOS,
               max_examples: int | None = None, checks: DataConfig | None = None) -> Task:
    """A Task from a local table file, named after the file (checked by `checks`, default DataConfig())."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    df = read_table(path)
    return frame_to_task(df, name=path.stem, source=str(path), text_column=text_column,
                         label_column=label_column, seed=seed, split_ratios=split_ratios,
                         max_examples=max_examples, license="see file", checks=checks)


def looks_like_path(name: str) -> bool:
    """True for strings meant as a file path rather than a hub id (suffix, ./, ~/ or absolute)."""
    return name.startswith((".", "/", "~", "\\")) or Path(name).suffix.lower() in SUFFIXES


def looks_like_hub_id(name: str) -> bool:
    """True for 'owner/name' style strings that are not file paths."""
    return "/" in name and not looks_like_path(name)


def _hub_load(name: str):
    """datasets.load_dataset(name): separated out so tests can stand in for the network."""
    import datasets

    return datasets.load_dataset(name)


def load_hub(name: str, *, builtin_names: Sequence[str] = (), seed: int = 0, text_column: str | None = None,
             label_column: str | None = None, split_ratios: Sequence[float] = DEFAULT_RATIOS,
             max_examples: int | None = None, checks: DataConfig | None = None) -> Task:
    """A Task from a hub dataset: all its splits pooled, de-duplicated and re-split with the seed."""
    import pandas as pd

    try:
        loaded = _hub_load(name)
    except Exception as e:  # network, auth, missing dataset or script: all mean 'not available here'
        choices = ", ".join(sorted(builtin_names))
        raise DataError(f"could not load hub dataset {name!r} offline ({type(e).__name__}); "
                        f"pass a local file or one of: {choices}") from e
    parts = list(loaded.values()) if hasattr(loaded, "values") else [loaded]
    if not parts:
        raise DataError(f"hub dataset {name!r} has no splits")
    label_names = None
    lcol = label_column or "label"
    feature = parts[0].features.get(lcol) if hasattr(parts[0], "features") else None
    if feature is not None and getattr(feature, "names", None):
        label_names = list(feature.names)
    df = pd.concat([p.to_pandas() for p in parts], ignore_index=True)
    return frame_to_task(df, name=name.rstrip("/").split("/")[-1], source=f"hub:{name}",
                         text_column=text_column,
                         label_column=label_column, seed=seed, split_ratios=split_ratios,
                         max_examples=max_examples, label_names=label_names, license="see dataset card",
                         checks=checks)
