"""scripts/profile_decode.py: it profiles a real decode and counts the operators that a GPU launches one by one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("profile_decode", REPO / "scripts" / "profile_decode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tiled_decode_runs_more_operators_than_untiled_and_the_table_names_them():
    script = load_script()
    cpu = torch.device("cpu")
    untiled, table = script.profile_decode("tiny", 64, None, torch.float32, cpu, rows=10)
    tiled, _ = script.profile_decode("tiny", 64, 4, torch.float32, cpu, rows=10)
    assert 0 < untiled < tiled
    assert "convolution" in table
