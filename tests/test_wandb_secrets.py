"""Issue 15, item 8: W&B (offline, real) receives no command line and no environment."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import cli_env

SECRET = "s3cr3t-argv-value-7f3a"
SCRIPT = f"""
import sys, os
from pathlib import Path
from types import SimpleNamespace
sys.argv = ["ftcluster train", "+parallel.deepspeed_overrides.comet.api_key={SECRET}"]  # as a rank sees it
os.environ["MY_API_KEY"] = "{SECRET}"
from ftcluster.metrics import start_wandb
cfg = SimpleNamespace(project="p", entity=None, group=None, tags=[], name=None, mode="offline")
run, rid = start_wandb(run_dir=Path(os.environ["RUN_DIR"]), logger_cfg=cfg,
                       run_name="r", run_id=None, config={{"optim": {{"lr": 1e-3}}, "api_key": "<redacted>"}})
run.log({{"loss": 1.0}}, step=1)
run.finish()
"""


def test_offline_wandb_files_hold_no_argv_or_environment_secret(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=cli_env(RUN_DIR=str(tmp_path)), capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.suffix == ".wandb" for f in files), files
    leaked = [str(f) for f in files if SECRET.encode() in f.read_bytes()]
    assert not leaked, f"the secret is in {leaked}"
