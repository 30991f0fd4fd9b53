"""Copy the latest quality table of bench/results/ into README.md (between the BENCH markers)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- BENCH:START -->", "<!-- BENCH:END -->"


def main(name: str | None = None) -> None:
    results = ROOT / "bench" / "results"
    tables = sorted(results.glob("quality-*.md"), key=lambda p: p.stat().st_mtime)
    if name:
        tables = [results / name]
    if not tables:
        sys.exit("no bench/results/quality-*.md yet: run python bench/quality.py")
    table = tables[-1]
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{START}\nFrom `bench/results/{table.name}`:\n\n{table.read_text().strip()}\n{END}"
    if START in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.replace("BENCH_TABLE_PLACEHOLDER", block)
    readme.write_text(text)
    print(f"README.md updated from {table}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
