"""Run a training script's ``main`` in two gloo DDP ranks on CPU and report what each rank ended with.

``accelerate launch --cpu --num_processes 2`` silently starts one process on these machines
(docs/MACHINE_FACTS.md); ``--multi_gpu`` with ``ACCELERATE_USE_CPU=true`` starts two gloo ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAUNCHER = textwrap.dedent(
    """
    import hashlib, importlib, json, os, sys
    script = importlib.import_module(sys.argv[1])
    import torch
    result = script.main(script.parse_args(sys.argv[2:]))
    parts = getattr(result, "components", {"model": result})  # a pipeline: every network in it
    modules = [parts[name] for name in sorted(parts) if isinstance(parts[name], torch.nn.Module)]
    tensors = [v for module in modules for v in module.state_dict().values()]
    digest = hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in tensors)).hexdigest()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = os.path.join(sys.argv[sys.argv.index("--output_dir") + 1], f"rank{rank}.json")
    json.dump({"world_size": world, "sha256": digest}, open(out, "w"))
    """
)


def run_two_ranks(tmp_path: Path, module: str, args: list[str]) -> list[dict]:
    """``{"world_size", "sha256" of the returned model's (or pipeline's) weights}`` per rank; fails with stderr."""
    launcher = tmp_path / "launch_train.py"
    launcher.write_text(LAUNCHER)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
               "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no", str(launcher), module,
               *args]
    # the repository on the path, so that ranks can import callables from tests (a --rater module:function)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    output_dir = Path(args[args.index("--output_dir") + 1])
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
