"""What a run records for scaling-law fits: the parameter split, tokens per step, lr, FLOPs, the validation
history (kept across a resume), and validation noise drawn from a fixed seed."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from mmgrow.data.collate import pad_collate
from mmgrow.data.sequence import SequenceBuilder
from mmgrow.objectives.flow_matching import FlowMatchingObjective
from mmgrow.protocols import Segment, Tokenizer
from mmgrow.tokenizers.text import ByteTokenizer
from mmgrow.training.cli import build_cli
from mmgrow.training.module import MMGrowModule
from mmgrow.training.scaling_record import flops_per_token, scaling_fields, split_parameters

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.dim", "32", "--model.depth", "2", "--data.num_train", "48", "--data.num_val", "8",
        "--data.dataset_args", "{frames: 2, size: 32}", "--data.codec_args", "{video: {grid: 4}}",
        "--data.batch_size", "4", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", "[]"]


def test_split_parameters_counts_embedding_tables_apart_and_shared_tensors_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)                 # 40 embedding parameters
            self.position = nn.Embedding(3, 4)               # 12
            self.block = nn.Linear(4, 4)                     # 20 non-embedding
            self.head = nn.Linear(4, 10, bias=False)         # tied to embed: counted once, as embedding
            self.head.weight = self.embed.weight

    assert split_parameters(Tied()) == (20, 52)
    assert flops_per_token(1000, depth=2, context=64, dim=8) == 6 * 1000 + 6 * 2 * 64 * 8


def _fit(root, *extra):
    return build_cli(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), *TINY,
                      "--trainer.default_root_dir", str(root), *extra])


def test_summary_records_what_a_scaling_fit_needs_and_resume_keeps_the_history(tmp_path):
    first = tmp_path / "a"
    cli = _fit(first, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--model.lr", "0.002",
               "--model.min_lr_ratio", "1.0")
    s = json.loads((first / "summary.json").read_text())
    non_emb, emb = split_parameters(cli.model.model)
    assert (s["non_embedding_parameters"], s["embedding_parameters"]) == (non_emb, emb)
    assert non_emb + emb == s["parameters"] and emb == cli.model.model.embed.weight.numel()
    assert s["lr"] == 0.002 and s["lr_schedule"]["kind"] == "constant" and s["lr_schedule"]["min_lr_ratio"] == 1.0
    assert s["batch_size_tokens"] == s["tokens_seen"] / 4
    assert s["flops_per_token"] == 6 * non_emb + 6 * 2 * s["seq_len"] * 32
    assert s["flops"] == s["flops_per_token"] * s["tokens_seen"]
    history = s["val_history"]
    assert [h["step"] for h in history] == [2, 4]
    assert history[-1]["tokens"] == s["tokens_seen"] and 0 < history[0]["tokens"] < history[1]["tokens"]
    assert history[-1]["loss"] == pytest.approx(s["final_val_loss"])
    # resume to step 6: the two earlier validations stay, a third is added
    second = tmp_path / "b"
    _fit(second, "--trainer.max_steps", "6", "--trainer.val_check_interval", "2",
         "--ckpt_path", str(first / "checkpoints" / "last.ckpt"))
    resumed = json.loads((second / "summary.json").read_text())
    assert [h["step"] for h in resumed["val_history"]] == [2, 4, 6]
    assert resumed["val_history"][:2] == history
    assert resumed["lr_schedule"]["kind"] == "constant"  # the resumed run keeps the checkpoint's hyperparameters


def test_schedule_kind_follows_min_lr_ratio_and_the_step_limit():
    model = nn.Linear(2, 2)
    hp = {"lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 5}
    assert scaling_fields(model, hp, 100, 10, 8, max_steps=50)["lr_schedule"]["kind"] == "cosine"
    assert scaling_fields(model, hp, 100, 10, 8, max_steps=-1)["lr_schedule"]["kind"] == "constant"
    fields = scaling_fields(model, {**hp, "min_lr_ratio": 1.0}, 100, 0, 8, max_steps=50)
    assert fields["lr_schedule"]["kind"] == "constant" and fields["batch_size_tokens"] is None
    assert fields["flops"] == 6 * 6 * 100  # no width/depth hyperparameters: 6 N per token


class GivenLatents(Tokenizer):
    modality, kind, latent_dim = "video", "continuous", 4

    def encode(self, raw):
        return raw.float()

    def block_ids(self, tokens):
        return torch.zeros(tokens.shape[0], dtype=torch.long)


def _flow_module(eval_seed):
    b = SequenceBuilder({"text": ByteTokenizer(), "video": GivenLatents()})
    g = torch.Generator().manual_seed(0)
    batch = pad_collate([b.build([Segment("text", f"clip {r}", "input"),
                                  Segment("video", torch.randn(6, 4, generator=g), "target")]) for r in range(3)])
    module = MMGrowModule(vocab=dict(b.token_space.sizes), dim=16, depth=1, continuous={"video": 4},
                          modulation={"kind": "adaln_zero", "cond_dim": 16}, eval_seed=eval_seed,
                          objective=FlowMatchingObjective(condition_dropout=0.0))
    module.configure_model()
    with torch.no_grad():  # leave the zero-initialised head: a non-zero velocity makes the loss depend on the noise
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module, batch


def test_validation_noise_comes_from_the_seed_and_leaves_the_global_rng_alone():
    module, batch = _flow_module(eval_seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        torch.manual_seed(123)
        state = torch.get_rng_state()
        first = module.validation_step(batch, 0)
        assert torch.equal(torch.get_rng_state(), state)
        torch.manual_seed(999)  # a different global state: the same loss
        assert torch.equal(module.validation_step(batch, 0), first)
        assert torch.equal(module.test_step(batch, 0), first)
        assert not torch.equal(module.validation_step(batch, 1), first)  # each batch its own draw
        unseeded, _ = _flow_module(eval_seed=None)
        unseeded.load_state_dict(module.state_dict())
        draws = {float(unseeded.validation_step(batch, 0)) for _ in range(3)}
    assert len(draws) == 3


def test_eval_seed_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="eval_seed"):
        MMGrowModule(vocab={"text": 259}, eval_seed=-1)
