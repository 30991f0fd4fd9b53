"""Report rendering: report.json round trip, report.md content, PNG plots, run comparison."""

from __future__ import annotations

import json

import pytest

from factorlm.errors import ConfigError, FormatError
from factorlm.report import (
    BlockRecord,
    ModuleRecord,
    Report,
    compare_reports,
    format_markdown,
    summary_table,
    write_report,
)
from factorlm.report.plots import block_index, module_role

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_report(method: str = "svd-llm", ratio: float = 0.2, ppl: float = 50.0) -> Report:
    modules = []
    for i in range(3):
        for role, (m, n), rank in (("q_proj", (32, 32), 8 + i), ("k_proj", (16, 32), 4 + i)):
            modules.append(
                ModuleRecord(
                    name=f"model.layers.{i}.self_attn.{role}",
                    group="attn",
                    shape=(m, n),
                    kind="lowrank",
                    rank=rank,
                    params_before=m * n,
                    params_after=rank * (m + n),
                    rel_error=0.01 * (i + 1) if role == "q_proj" else 0.002 * (i + 1),
                    notes=["gram shifted by 1e-6"] if i == 1 and role == "k_proj" else [],
                )
            )
        modules.append(
            ModuleRecord(
                name=f"model.layers.{i}.mlp.up_proj",
                group="mlp",
                shape=(64, 32),
                kind="pruned",
                width=50 - i,
                params_before=64 * 32,
                params_after=(50 - i) * 32,
            )
        )
    before = sum(m.params_before for m in modules)
    after = sum(m.params_after for m in modules)
    return Report(
        method=method,
        ratio=ratio,
        achieved_ratio=1 - after / before,
        options={"alpha": 0.5},
        model_type="llama",
        model_name="tiny-llama",
        params_targeted_before=before,
        params_targeted_after=after,
        params_total_before=before + 10_000,
        params_total_after=after + 10_000,
        calibration={"source": "brown_calib.txt", "n_samples": 4, "seqlen": 32, "seed": 0},
        modules=modules,
        blocks=[
            BlockRecord(index=i, seconds=1.5, rel_output_error=0.05 * (i + 1)) for i in range(3)
        ],
        wall_seconds=12.5,
        peak_rss_bytes=3 * 2**30,
        warnings=["model.layers.1.self_attn.k_proj: gram shifted by 1e-6"],
        evaluation={
            "dense": {
                "perplexity": {
                    "/data/wiki_test.txt": {"ppl": 20.0, "seqlen": 512, "n_tokens": 1022}
                }
            },
            "compressed": {
                "perplexity": {
                    "/data/wiki_test.txt": {"ppl": ppl, "seqlen": 512, "n_tokens": 1022}
                },
                "zeroshot": {"goal.jsonl": {"task": "goal", "acc": 0.5, "acc_norm": 0.4, "n": 10}},
            },
        },
    )


def assert_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def test_names():
    assert block_index("model.layers.12.self_attn.q_proj") == 12
    assert block_index("model.layers.3.block_sparse_moe.experts.7.w1") == 3
    assert block_index("lm_head") is None
    assert module_role("transformer.h.0.attn.c_attn") == "c_attn"


def test_write_report_files(tmp_path):
    report = make_report()
    files = write_report(report, tmp_path / "out")
    assert set(files) == {"json", "markdown", "ranks", "errors"}
    back = Report.from_dict(json.loads(files["json"].read_text()))
    assert back == report
    assert back.to_dict() == report.to_dict()
    md = files["markdown"].read_text()
    assert "svd-llm" in md and "0.2000" in md and f"{report.achieved_ratio:.4f}" in md
    assert "model.layers.2.mlp.up_proj" in md and "pruned" in md and "gram shifted" in md
    assert f"{report.params_total_before:,}" in md and f"{report.total_ratio:.2%}" in md
    assert "| /data/wiki_test.txt | 512 | 1,022 | 20.000 | 50.000 | 2.500 |" in md
    assert "![ranks](ranks.png)" in md
    for key in ("ranks", "errors"):
        assert files[key].name == f"{key}.png"
        assert_png(files[key])


def test_plots_skip_gracefully(tmp_path):
    report = make_report()
    for m in report.modules:
        m.rel_error = None
    report.blocks = []
    report.evaluation = {}
    files = write_report(report, tmp_path, plots=True)
    assert "errors" not in files and not (tmp_path / "errors.png").exists()
    assert_png(files["ranks"])
    assert "## Evaluation" not in files["markdown"].read_text()
    files = write_report(make_report(), tmp_path / "noplots", plots=False)
    assert set(files) == {"json", "markdown"}


def test_format_markdown_single_evaluation_and_summary():
    report = make_report()
    report.evaluation = {
        "perplexity": {"eval.txt": {"ppl": 31.25, "seqlen": 128, "n_tokens": 127}},
        "zeroshot": {},
        "speed": {
            "prefill_tok_s": 100.0,
            "decode_tok_s": 10.0,
            "peak_mem_bytes": 2**21,
            "model_bytes": 2**20,
        },
    }
    md = format_markdown(report)
    assert "31.250" in md and "### Speed" in md and "100.0" in md
    text = summary_table(report)
    assert "svd-llm" in text and "0.2000" in text and "ppl eval.txt" in text
    assert "min 4, max 10" in text


def test_compare_reports(tmp_path):
    a, b = make_report("svd-llm", 0.2, 50.0), make_report("asvd", 0.4, 900.0)
    b.achieved_ratio = 0.41
    write_report(a, tmp_path / "run_a", plots=False)
    write_report(b, tmp_path / "run_b", plots=False)
    text = compare_reports(
        [tmp_path / "run_a", tmp_path / "run_b" / "report.json"], out_dir=tmp_path / "cmp"
    )
    assert "svd-llm" in text and "asvd" in text and "run_a" in text and "run_b" in text
    assert "50.000" in text and "900.000" in text and "20.000" in text  # dense row
    assert "ppl wiki_test.txt" in text and "acc goal" in text
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith(text)
    assert_png(tmp_path / "cmp" / "ppl_vs_ratio.png")
    assert "asvd" in compare_reports([a, b])  # Report objects work too


def test_compare_reports_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such report"):
        compare_reports([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no report.json"):
        compare_reports([tmp_path / "empty"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FormatError):
        compare_reports([tmp_path / "bad.json"])
    with pytest.raises(ConfigError):
        compare_reports([])
