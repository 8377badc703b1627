"""scripts/profile_decode.py: it profiles a real decode and counts the operators that a GPU launches one by one."""

from __future__ import annotations

import torch
from script_loading import load_script


def test_tiled_decode_runs_more_operators_than_untiled_and_the_table_names_them():
    script = load_script("profile_decode")
    cpu = torch.device("cpu")
    untiled, table = script.profile_decode("tiny", 64, None, torch.float32, cpu, rows=10)
    tiled, _ = script.profile_decode("tiny", 64, 4, torch.float32, cpu, rows=10)
    assert 0 < untiled < tiled
    assert "convolution" in table
