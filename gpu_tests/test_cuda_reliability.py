"""CUDA checks of issue 18's guarantees where the GPU path differs from the CPU one.

* The divergence guard under ``bf16-mixed`` autocast: a huge learning rate stops training with
  :class:`DivergenceError` before the bad update, so every parameter stays finite.
* The mixer dtype check (:func:`mmgrow.protocols.check_mixer_input`) lets bf16 autocast and a bf16
  model through, and names the layer when a float32 input meets a bf16 model.

Run on a GPU machine with ``PYTHONPATH=. python -m pytest -p no:logging gpu_tests`` (outside the CPU
suite's ``testpaths``); without CUDA the module skips itself.
"""

from __future__ import annotations

import pytest
import torch

from mmgrow.layers.attention import FullAttention
from mmgrow.layers.mamba2 import Mamba2
from mmgrow.protocols import SeqContext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("cls", [FullAttention, Mamba2])
def test_dtype_check_passes_bf16_autocast_and_bf16_models_and_names_a_mismatch(cls):
    kwargs = {"num_heads": 2} if cls is FullAttention else {}
    mixer = cls(dim=64, layer_idx=3, **kwargs).cuda()
    x = torch.randn(2, 48, 64, device="cuda")
    ctx = SeqContext.simple(2, 48, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = mixer(x, ctx)  # float32 parameters, bf16 compute: allowed under autocast
    assert torch.isfinite(y).all()
    mixer = mixer.to(torch.bfloat16)
    y, _ = mixer(x.to(torch.bfloat16), ctx)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    with pytest.raises(TypeError, match=rf"{cls.__name__} \(layer 3\): x has dtype torch.float32"):
        mixer(x, ctx)


def test_divergence_guard_stops_bf16_mixed_training_before_the_bad_update(tmp_path):
    import lightning.pytorch as pl

    from mmgrow.data.datamodule import MMDataModule
    from mmgrow.training.divergence import DivergenceError, DivergenceGuard
    from mmgrow.training.module import MMGrowModule

    dm = MMDataModule(num_train=64, num_val=8, batch_size=8, dataset_args={"frames": 2, "size": 32},
                      codec_args={"video": {"grid": 4}})
    module = MMGrowModule(vocab=dm.vocab, dim=64, depth=2, lr=1e6, warmup_steps=0)
    guard = DivergenceGuard()
    trainer = pl.Trainer(accelerator="cuda", devices=1, precision="bf16-mixed", max_steps=20, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[guard],
                         default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
    with pytest.raises(DivergenceError) as info:
        trainer.fit(module, datamodule=dm)
    d = info.value.divergence
    assert d.step == trainer.global_step  # the step that was about to be taken was not taken
    assert d.last_finite_loss is not None or d.step == 0
    for name, p in module.model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} went non-finite: the bad update was applied"
