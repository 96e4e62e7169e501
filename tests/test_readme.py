"""The README's figures come from recorded runs, not from typing."""
from __future__ import annotations

import json
from pathlib import Path

from fastssl.demo import _summary_text

ROOT = Path(__file__).resolve().parents[1]


def test_readme_demo_block_is_the_recorded_summary():
    recorded = sorted((ROOT / "bench" / "results").glob("demo_summary_*.json"))[-1]
    text = _summary_text(json.loads(recorded.read_text()))
    readme = (ROOT / "README.md").read_text()
    assert recorded.name in readme, "the README must name the recorded run it quotes"
    quoted = [line for line in text.splitlines()[3:] if not line.startswith("Everything is under")]
    assert quoted and all(line in readme for line in quoted), (
        "README's demo block differs from " + recorded.name + "; paste the summary of a recorded run")
