"""Training under several processes (gloo on CPU): gradients of every trainable part are synchronised."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def test_two_processes_end_with_identical_weights(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(Path(__file__).with_name("ddp_worker.py")), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between ranks"
    sys.path.insert(0, str(Path(__file__).parent))
    from ddp_worker import TwoParts
    init = TwoParts().state_dict()
    assert not torch.equal(a["adapter.0.weight"], init["adapter.0.weight"])  # trained
    assert not torch.equal(a["resampler.weight"], init["resampler.weight"])  # every trainable part synced and trained
    assert torch.equal(a["frozen.weight"], init["frozen.weight"])  # frozen stays frozen
