"""docs/performance.md's FLOP table is what `python -m load_tests.count_flops` prints (SD2 on the meta device)."""

from __future__ import annotations

import re
from pathlib import Path

from load_tests import count_flops

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
BLOCK = re.compile(r"<!-- count_flops table: begin -->\n(.*?)\n<!-- count_flops table: end -->", re.DOTALL)


def test_the_documented_table_is_the_counted_one() -> None:
    unet8, unet4, vae = count_flops.build()
    counts = [count_flops.count(r, unet8, unet4, vae) for r in (512, 768)]
    documented = BLOCK.search(DOC.read_text(encoding="utf-8"))
    assert documented, "docs/performance.md lost its count_flops table markers"
    assert documented.group(1).strip() == count_flops.table(counts)
    assert count_flops.params(unet8) == 865_922_244  # SD2's UNet, as docs/performance.md says (865.9 M)
    # The ceiling docs/benchmarks.md and load_tests/gpu_check.py quote: 10.5 TFLOP at 768 px.
    assert round(counts[1].single_step / 1e12, 1) == 10.5
