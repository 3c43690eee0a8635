"""edgeagent's kernel choices give a token the same logits, bit for bit, whatever shares its
step and whether its cells were cached or computed again.

Stronger than comparing greedy answers (tests/test_batching.py): a rounding difference that
does not flip a token there still shows here. The prompt is long enough (600 tokens) that the
attention reaches past 512 cells, where llama.cpp's kernels change paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scripts.kernel_probe import AGAIN, CASES, CONTROL, DECODED, ROLES, probe


@pytest.mark.parametrize(
    "config", [{}, ROLES], ids=["default", "GGML_CPU_TILED_MM=1 (calls split by role)"]
)
def test_kernels_give_bitwise_identical_logits_alone_batched_and_read_again(
    model_file: Path, config: dict[str, Any]
) -> None:
    result = probe(config, model_file)
    assert len(result) == len(CASES) + 2
    for chunk, beside in CASES:
        case = f"{chunk}-token chunks beside {beside}"
        assert result[case] == [True] * (1 + DECODED), case
    # A conversation's earlier answer, read again because no cache held its cells, gives the
    # cells its decoding gave (with the split, an assistant turn's text is read row by row).
    assert result[AGAIN] == [True]
    assert CONTROL in result
