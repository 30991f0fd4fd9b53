"""Helpers of the bad-input tests (test_cli_errors, test_preflight, test_api_errors,
test_memory, test_load_errors): a CLI runner, its error line, base arguments, JSON-ish
values and the options they are thrown at. Their fixtures (files, no_load) are in conftest.py."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from factorlm.cli import main

FAST = settings(
    max_examples=40,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the work tree
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["-q", *map(str, args)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _base(files: Path, **over) -> list[str]:
    args = {
        "--method": "svd-llm",
        "--ratio": "0.3",
        "--n-samples": "8",
        "--seqlen": "32",
        "--calib": str(files / "calib.txt"),
        "--out": str(files / "out-never-written"),
    }
    args.update(over)
    return [x for k, v in args.items() if v is not None for x in (k, v)]


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=5,
)

_OPTION_KEYS = [
    ("nsvd", "k1_share"),
    ("nsvd", "variant"),
    ("asvd", "alpha"),
    ("asvd", "scale"),
    ("svd-llm", "whiten"),
    ("fwsvd", "fisher_batches"),
    ("svd", "min_rank"),
    ("lorap", "a"),
    ("lorap", "keep_least"),
    ("lorap", "channel_multiple"),
    ("distill", "lr"),
    ("distill", "betas"),
    ("distill", "holdout"),
]
