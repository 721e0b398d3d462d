"""The short strategy names mmgrow registers are known to the CLI: ``--trainer.strategy fsdp2`` and
``context_parallel`` resolve to mmgrow's strategies (an import missing from the CLI made ``fsdp2`` an
"invalid strategy name" while the class path worked)."""

from mmgrow.training.cli import _make_cli_class


def test_cli_registers_fsdp2_and_context_parallel():
    from lightning.pytorch.strategies import StrategyRegistry

    from mmgrow.parallel.model_parallel import MeshParallelStrategy
    from mmgrow.parallel.strategy import ContextParallelStrategy

    _make_cli_class([])
    fsdp2 = StrategyRegistry.get("fsdp2")
    assert isinstance(fsdp2, MeshParallelStrategy)
    assert (fsdp2.context_parallel, fsdp2.tensor_parallel, fsdp2.fsdp) == (1, 1, True)
    assert isinstance(StrategyRegistry.get("context_parallel"), ContextParallelStrategy)
