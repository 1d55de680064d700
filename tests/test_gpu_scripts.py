"""The GPU check's scripts, run on CPU in their --smoke mode: a GPU run is scarce (one call of a
few minutes, DESIGN.md section 7), so a script that fails must fail here first."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)


def test_bench_loop_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_loop.py"), "--smoke", "--budget", "1", "16",
                           "--repeats", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "loop_bench.json").read_text())["rows"]
    assert [r["n"] for r in rows] == [1, 16]
    for r in rows:
        # 16 new tokens, no stop ids: every row ends at the limit; a round emits >= 1 token.
        assert r["new_tokens"] == 16 and 1 <= r["rounds"] <= 16 and r["tau"] >= 1 and r["round_ms"] > 0
    assert rows[0]["rounds"] == 16  # AR: one token per round
    assert "| 16 |" in (tmp_path / "loop_bench.md").read_text()
