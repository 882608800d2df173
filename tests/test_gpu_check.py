"""benchmarks/gpu_check.sh --dry-run: the GPU check's code path (recipes, both trainers, checks, table) on the CPU."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_passes(tmp_path):
    env = {**os.environ, "LORAPLEX_HOME": str(tmp_path / "loraplex-home")}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    final = re.fullmatch(r"gpu_check: (\d+) passed, 0 failed", out.strip().splitlines()[-1])
    assert final and int(final.group(1)) > 0, out
    assert re.search(r"^\S+\s+LoRA\s+loraplex\s+2\s", out, re.M), out
    assert re.search(r"^\S+\s+QLoRA\s+loraplex\s+2\s", out, re.M) or re.search(r"^SKIP\s+QLoRA: \S", out, re.M), out
    for check in ("isolation", "loss falls", "held-out"):
        assert re.search(rf"^PASS\s+\S+ LoRA {check}: ", out, re.M), out
    assert not re.search(r"^FAIL", out, re.M), out
