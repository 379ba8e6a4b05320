"""Assemble docs/benchmarks.md from the per-benchmark tables in docs/benchmarks/*.md.

Each benchmark writes its JSON and a markdown table beside it; this script only
concatenates the tables under one introduction, in a fixed order.
"""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
ORDER = ["fedavg_scale", "split_overhead", "split_accuracy", "ko_table4", "features", "dedup", "gpu_check"]
COMBINED = {"split"}  # split.md is split_overhead.md + split_accuracy.md again (benchmarks/split_accuracy.py)

INTRO = """# Benchmarks

Measured on this project's development machine: 2 CPU cores, 24 GB, no GPU, Python 3.11,
torch 2.14.1 (CPU), flwr 1.41.0. Other work shared the two cores during some of these runs;
each table says how it was produced. Re-run any of them with the command in its section; the
raw figures are in `docs/benchmarks/<name>.json`.
"""


def demoted(markdown: str) -> str:
    """Each report's headings one level down, so that its title is a section of benchmarks.md."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def relinked(markdown: str) -> str:
    """Images beside a report (``](x.png)``) seen from docs/benchmarks.md."""
    return re.sub(r"\]\((?![a-z]+:|/)([^)/]+\.png)\)", r"](benchmarks/\1)", markdown)


def main() -> None:
    tables = [p for p in (DOCS / "benchmarks").glob("*.md") if p.stem not in COMBINED]
    tables.sort(key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    parts = [INTRO] + [relinked(demoted(path.read_text().strip())) + "\n" for path in tables]
    (DOCS / "benchmarks.md").write_text("\n".join(parts))
    print(f"wrote {DOCS / 'benchmarks.md'} from {[p.name for p in tables]}")


if __name__ == "__main__":
    main()
