"""The short strategy names mmgrow registers are known to the CLI: ``--trainer.strategy fsdp2`` and
``context_parallel`` resolve to mmgrow's strategies (an import missing from the CLI made ``fsdp2`` an
"invalid strategy name" while the class path worked). Checked in a fresh interpreter that imports only
what the CLI imports."""

import json
import subprocess
import sys

PROBE = """
import json
from mmgrow.training.cli import _make_cli_class
_make_cli_class([])
from lightning.pytorch.strategies import StrategyRegistry
out = {}
for name in ("fsdp2", "context_parallel"):
    s = StrategyRegistry.get(name)
    out[name] = [type(s).__module__ + "." + type(s).__name__, getattr(s, "fsdp", None)]
print(json.dumps(out))
"""


def test_cli_registers_fsdp2_and_context_parallel():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["fsdp2"] == ["mmgrow.parallel.model_parallel.MeshParallelStrategy", True]
    assert got["context_parallel"][0] == "mmgrow.parallel.strategy.ContextParallelStrategy"
