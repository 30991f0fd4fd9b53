"""Copy the latest quality table of bench/results/ into README.md (between the BENCH markers)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- BENCH:START -->", "<!-- BENCH:END -->"


def main(names: list[str]) -> None:
    """Copy the named tables (default: every bench/results/quality-*.md, oldest first)."""
    results = ROOT / "bench" / "results"
    tables = [results / n for n in names] or sorted(
        results.glob("quality-*.md"), key=lambda p: p.stat().st_mtime
    )
    if not tables:
        sys.exit("no bench/results/quality-*.md yet: run python bench/quality.py")
    readme = ROOT / "README.md"
    text = readme.read_text()
    parts = [f"From `bench/results/{t.name}`:\n\n{t.read_text().strip()}" for t in tables]
    block = START + "\n" + "\n\n".join(parts) + "\n" + END
    if START in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.replace("BENCH_TABLE_PLACEHOLDER", block)
    readme.write_text(text)
    print(f"README.md updated from {', '.join(t.name for t in tables)}")


if __name__ == "__main__":
    main(sys.argv[1:])
