"""The one LightningModule: builds the unified model, runs any objective, exports weights.

Baselines and target systems differ only in what the recipe injects here (``mixer`` factories, the
objective); there is no per-model training script.

Context parallelism: when the trainer's strategy exposes a ``context_parallel_handle`` with world
size > 1 (:class:`~mmgrow.parallel.strategy.ContextParallelStrategy`), training, validation and test
steps pad, shard and run this rank's slice of the sequence
(:func:`~mmgrow.parallel.context_batch.context_parallel_loss`); the logged loss and metrics are then
those of the whole sequence on every rank of the group, and ``tokens_seen`` counts the tokens of
this rank's shard, so its sum over all ranks counts every token once. ``predict`` runs the whole
sequence on every rank (its mixers see no handle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from mmgrow.batch import TokenBatch
from mmgrow.checks import finite_number, int_at_least, positive_int
from mmgrow.growth.base import strategy_from_spec
from mmgrow.models.cross_condition import CrossAttentionConfig
from mmgrow.models.factories import factory_from_spec, spec_from_factory
from mmgrow.models.gated_memory import MemoryPlacement
from mmgrow.models.modulation import ModulationConfig
from mmgrow.protocols import ContextParallel, GrowthStrategy, Objective, SequenceMixer
from mmgrow.rundir import CHECKPOINT_CONFIG_KEY, CheckpointError, check_checkpoint_file, is_lightning_checkpoint
from mmgrow.training.growth_stage import GrowthStage, prepare_stage

MixerFactoryArg = Callable[[int, int], SequenceMixer]
MixerArg = list[MixerFactoryArg] | MixerFactoryArg | None
"""A mixer factory or a list of them. The list comes first on purpose: jsonargparse tries a union's
members in order when it saves ``config.yaml``, and its ``Callable`` serializer never refuses a value
(a list becomes the string "Unable to serialize instance ..."), so a list must be tried as a list first."""


class MMGrowModule(pl.LightningModule):
    """Train a :class:`~mmgrow.models.unified.UnifiedModel` with an :class:`~mmgrow.protocols.Objective`.

    Args:
        vocab: modality -> vocabulary size, in token-space order. Linked from ``data.vocab`` by the CLI.
        dim, depth: backbone width and number of blocks.
        mixer: a mixer factory (``class_path`` + ``init_args`` in YAML; ``dim`` and ``layer_idx`` are
            supplied per layer) or a list of them cycled over layers. Default: full attention.
        mlp_ratio: SwiGLU hidden size as a multiple of ``dim`` (None = the model's default).
        mlp_chunk: blockwise feed-forward: run each MLP over this many tokens at a time with
            recomputation (None = whole sequences).
        objective: the training objective (default: autoregressive with LWM's modality weights).
        lr, weight_decay, betas: AdamW settings (no decay on norms, biases and embeddings).
        warmup_steps, min_lr_ratio: linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at
            ``trainer.max_steps`` (constant after warm-up when ``max_steps`` is not set).
        init_from: a ``model.safetensors`` file, a run directory holding one, or a Lightning
            ``.ckpt`` of an mmgrow run (its model weights and config); loaded after the
            model is built. The model section must describe the checkpoint's architecture before
            this stage's growth (checked against its ``model.yaml``; growth the checkpoint went
            through is replayed first).
        growth: growth strategies applied after ``init_from`` is loaded, in order (``class_path`` +
            ``init_args``; registered names such as ``insert_depth`` work). See ``docs/growth.md``.
        train_parameters: ``"all"``, ``"new"`` (only parameters growth created) or a regular
            expression over parameter names; the rest are frozen.
        measure_growth_jump: on the first training batch after growth, log the loss of the model
            before and after growth (``growth/loss_before``, ``growth/loss_after``,
            ``growth/loss_jump``; 0 for function-preserving growth). Keeps a copy of the pre-growth
            model until then.
        memory: a memory factory (``class_path: ttt_mlp`` + ``init_args``, or any mixer) added to blocks as a
            gated branch ``x + tanh(alpha) * memory(norm(x))``; None = no memory.
        memory_placement: which blocks get it and how (``layers``, ``gate_init``, ``bidirectional``,
            ``modality_gates``; :class:`~mmgrow.models.gated_memory.MemoryPlacement`).
        cross_attention: cross-attention branches on the batch's condition (text-encoder
            embeddings from ``data.condition_encoder``): ``cond_dim``, ``num_heads``, ``layers``,
            ``gated`` ... (:class:`~mmgrow.models.cross_condition.CrossAttentionConfig`); None = none.
        modulation: adaLN modulation of every block from the diffusion timestep (a DiT):
            ``{kind: adaln_zero, cond_dim: 128}`` (:class:`~mmgrow.models.modulation.ModulationConfig`);
            None = none. Use with the ``flow_matching`` objective.
        continuous: ``{modality: latent_dim}`` of continuous codecs (linked from ``data.continuous``).
        input_encoders: ``{modality: {class_path, init_args}}`` trainable encoders of continuous codecs that
            ship one (e.g. ``timm_image``; linked from ``data.input_encoders``).
        modality_embeddings: add a learned embedding of each position's modality (UnIVAL).
        head: ``"per_modality"`` (a head per modality, LWM) or ``"shared"`` (one head and one softmax over
            the whole token space, UnIVAL).
        eval_seed: validation and test batches draw an objective's noise (flow matching's timesteps and
            noise) from ``torch.manual_seed(eval_seed + batch_idx)`` in a forked RNG, so the validation
            loss is a deterministic function of the weights: comparable across steps and runs (a
            learning-rate sweep reads differences of a fraction of a percent), and training's random
            stream is untouched by validation. None = draw from the global RNG.
        activation_checkpointing: recompute every block in the backward instead of keeping its
            activations (:mod:`mmgrow.parallel.activation_checkpoint`); same gradients, less memory.
        compile_blocks: ``torch.compile`` each block: ``false``, ``true`` (torch's defaults) or a mapping
            of ``torch.compile`` keyword arguments such as ``{backend: aot_eager}``
            (:mod:`mmgrow.parallel.compile`).
    """

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        dim: int = 256,
        depth: int = 4,
        mixer: MixerArg = None,
        mlp_ratio: float | None = None,
        mlp_chunk: int | None = None,
        objective: Objective | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        init_from: str | None = None,
        memory: MixerFactoryArg | None = None,
        memory_placement: MemoryPlacement | None = None,
        cross_attention: CrossAttentionConfig | None = None,
        growth: list[GrowthStrategy] | None = None,
        train_parameters: str = "all",
        measure_growth_jump: bool = True,
        modulation: ModulationConfig | None = None,
        continuous: dict[str, int] | None = None,
        input_encoders: dict[str, dict] | None = None,
        modality_embeddings: bool = False,
        head: str = "per_modality",
        eval_seed: int | None = 0,
        activation_checkpointing: bool = False,
        compile_blocks: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        if vocab is None:
            raise ValueError("MMGrowModule needs `vocab` (modality -> vocabulary size); the CLI links it from "
                             "data.vocab — when building the module by hand pass e.g. vocab=datamodule.vocab")
        if init_from is not None and not Path(init_from).exists():
            raise CheckpointError(f"init_from path does not exist: {init_from} (expected a model.safetensors "
                                  "file or a run directory containing one)")
        if init_from is not None and is_lightning_checkpoint(init_from):
            check_checkpoint_file(init_from, what="init_from")
        positive_int("MMGrowModule", "dim", dim)
        positive_int("MMGrowModule", "depth", depth)
        if mlp_ratio is not None:
            finite_number("MMGrowModule", "mlp_ratio", mlp_ratio, low=0, low_open=True)
        if mlp_chunk is not None:
            positive_int("MMGrowModule", "mlp_chunk", mlp_chunk)
        check_optimizer_hparams("MMGrowModule", lr, weight_decay, betas, warmup_steps, min_lr_ratio)
        if eval_seed is not None:
            int_at_least("MMGrowModule", "eval_seed", eval_seed, 0)
        from mmgrow.parallel.compile import compile_options

        compile_options(compile_blocks, "MMGrowModule: compile_blocks")  # a typo fails here, not at step 1
        self.save_hyperparameters(ignore=["objective", "growth"])
        self.growth = [strategy_from_spec(s) for s in growth or []]  # bad specs fail here, not mid-setup
        self.vocab = dict(vocab)
        self.mixer = factory_from_spec(mixer) if isinstance(mixer, (dict, list)) else mixer
        self.memory = factory_from_spec(memory) if isinstance(memory, dict) else memory
        if isinstance(memory_placement, dict):
            memory_placement = MemoryPlacement(**memory_placement)
        self.memory_placement = memory_placement
        if isinstance(cross_attention, dict):
            cross_attention = CrossAttentionConfig(**cross_attention)
        self.cross_attention = cross_attention
        if isinstance(modulation, dict):
            modulation = ModulationConfig(**modulation)
        self.modulation = modulation
        self.continuous = dict(continuous or {})
        self.input_encoders = {m: dict(spec) for m, spec in (input_encoders or {}).items()}
        from mmgrow.models.unified import HEADS

        if head not in HEADS:
            raise ValueError(f"MMGrowModule: head must be one of {HEADS}, got {head!r}")
        if objective is None:
            from mmgrow.objectives.autoregressive import AutoregressiveObjective

            objective = AutoregressiveObjective()
        self.objective = objective
        self.model: torch.nn.Module | None = None
        self.growth_stage: GrowthStage | None = None
        self.growth_summary: dict[str, Any] | None = None  # for summary.json
        self._tokens_seen = torch.zeros((), dtype=torch.long)  # a tensor: counted without a host sync
        self.last_step_tokens = torch.zeros((), dtype=torch.long)  # non-padding tokens of the last training step

    # ------------------------------------------------------------------ model
    def model_config(self) -> dict[str, Any]:
        """What ``model.yaml`` stores: enough to rebuild the model without the recipe."""
        cfg: dict[str, Any] = {"token_space": self.vocab, "dim": self.hparams.dim, "depth": self.hparams.depth,
                               "mixer": spec_from_factory(self.mixer)}
        if self.hparams.mlp_ratio is not None:
            cfg["mlp_ratio"] = self.hparams.mlp_ratio
        if self.hparams.mlp_chunk is not None:
            cfg["mlp_chunk"] = self.hparams.mlp_chunk
        if self.memory is not None:
            cfg["memory"] = spec_from_factory(self.memory)
            if self.memory_placement is not None:
                cfg["memory_placement"] = dataclasses.asdict(self.memory_placement)
        if self.cross_attention is not None:
            cfg["cross_attention"] = dataclasses.asdict(self.cross_attention)
        if self.modulation is not None:
            cfg["modulation"] = dataclasses.asdict(self.modulation)
        if self.continuous:
            cfg["continuous"] = dict(self.continuous)
        cfg.update(self._unival_options())
        if self.growth_stage is not None and self.growth_stage.history:
            cfg["growth"] = self.growth_stage.history
        return cfg

    def _unival_options(self) -> dict[str, Any]:
        """The UnIVAL model options that differ from the defaults (so older ``model.yaml`` files stay as they were)."""
        out: dict[str, Any] = {}
        if self.input_encoders:
            out["input_encoders"] = {m: {"class_path": s["class_path"], "init_args": dict(s.get("init_args") or {})}
                                     for m, s in self.input_encoders.items()}
        if self.hparams.modality_embeddings:
            out["modality_embeddings"] = True
        if self.hparams.head != "per_modality":
            out["head"] = self.hparams.head
        return out

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from mmgrow.models.unified import UnifiedModel

        kwargs = {"token_space": self.vocab, "dim": self.hparams.dim, "depth": self.hparams.depth,
                  "mixer": self.mixer}
        if self.hparams.mlp_ratio is not None:
            kwargs["mlp_ratio"] = self.hparams.mlp_ratio
        if self.hparams.mlp_chunk is not None:
            kwargs["mlp_chunk"] = self.hparams.mlp_chunk
        if self.memory is not None:
            kwargs["memory"] = self.memory
            kwargs["memory_placement"] = self.memory_placement
        if self.cross_attention is not None:
            kwargs["cross_attention"] = self.cross_attention
        if self.modulation is not None:
            kwargs["modulation"] = self.modulation
        if self.continuous:
            kwargs["continuous"] = self.continuous
        kwargs.update(self._unival_options())
        plan = self._parallel_plan()
        meta = bool(getattr(self._strategy(), "meta_init", False))
        if meta and (self.hparams.init_from is not None or self.growth):
            raise ValueError("meta_init builds the model without weights; it cannot start from init_from or apply "
                             "growth strategies (load the weights into a normally built model instead)")
        with torch.device("meta") if meta else contextlib.nullcontext():
            self.model = UnifiedModel(**kwargs)
        bind = getattr(self.objective, "bind", None)
        if callable(bind):
            bind(self.model.token_space)
        hp = self.hparams
        self.growth_stage = prepare_stage(self.model, self.model_config(), hp.init_from, self.growth,
                                          hp.train_parameters, keep_before=hp.measure_growth_jump)
        # train_parameters sets requires_grad on every parameter; modules that keep part of themselves fixed
        # (a frozen timm image encoder) freeze it again.
        for sub in self.model.modules():
            if callable(getattr(sub, "restore_frozen", None)):
                sub.restore_frozen()
        stage = self.growth_stage
        self.growth_summary = {
            "history": stage.history, "frozen_parameters": len(stage.frozen),
            "reports": [{"preserves": r.preserves, "notes": r.notes, "new_parameters": len(r.new_parameters)}
                        for r in stage.reports]} if stage.history else None
        # Not a submodule: the pre-growth copy must stay out of state_dict, optimiser and device moves.
        self.__dict__["_before_growth"] = self.growth_stage.before
        self.growth_stage.before = None
        if plan is not None:
            from mmgrow.parallel.parallelize import parallelize

            self.parallel_summary = parallelize(self.model, plan)
        if meta:
            from mmgrow.parallel.meta_init import materialize

            materialize(self.model, self._strategy().root_device, seed=torch.initial_seed())

    def _strategy(self) -> Any:
        trainer = self._trainer
        return trainer.strategy if trainer is not None else None

    def _parallel_plan(self) -> Any:
        """The strategy's :class:`~mmgrow.parallel.parallelize.ParallelPlan` (FSDP / TP on its mesh) with
        this module's activation checkpointing and compile options; None when there is nothing to apply."""
        from mmgrow.parallel.parallelize import ParallelPlan

        make = getattr(self._strategy(), "parallel_plan", None)
        plan = make() if callable(make) else ParallelPlan()
        plan.activation_checkpointing = bool(self.hparams.get("activation_checkpointing", False))
        plan.compile_blocks = self.hparams.get("compile_blocks", False) or False
        if plan.mesh is None and not (plan.activation_checkpointing or plan.compile_blocks):
            return None
        return plan

    def inference_model(self) -> torch.nn.Module:
        """The model as one process can run it alone (sampling, evaluation, export on rank 0).

        Unsharded strategies: :attr:`model` itself. Under a strategy whose ``shards_parameters`` is True
        (FSDP2 / TP) running :attr:`model` is a collective, so a plain single-device copy is built from the
        gathered full state dict -- **every rank must call this** (the gather is a collective); ranks
        other than 0 get :attr:`model` back. The copy is cached until the next training step."""
        if not getattr(self._strategy(), "shards_parameters", False):
            return self.model
        step = int(self.trainer.global_step)
        cached = self.__dict__.get("_inference_copy")
        if cached is not None and cached[0] == step:
            return cached[1]
        from mmgrow.parallel.gather import full_state_dict

        state = full_state_dict(self.model)  # collective; full tensors on rank 0 only
        copy = self.model  # every rank caches, so that every rank skips the gather next time alike
        if self.trainer.is_global_zero:
            from mmgrow.training.export import build_model

            copy = build_model(self.model_config())
            copy.load_state_dict(state)
            copy.to(self.device)
        self.__dict__["_inference_copy"] = (step, copy)
        return copy

    # ------------------------------------------------------------------ steps
    def context_parallel(self) -> ContextParallel | None:
        """The strategy's context-parallel handle when it shards the sequence (world size > 1), else None."""
        trainer = self._trainer
        handle = getattr(trainer.strategy, "context_parallel_handle", None) if trainer is not None else None
        return handle if handle is not None and handle.world_size > 1 else None

    def _step(self, batch: TokenBatch, stage: str) -> torch.Tensor:
        cp = self.context_parallel()
        if cp is None:
            loss, metrics = self.objective.step(self.model, batch)
            tokens = batch.token_count()
        else:
            from mmgrow.parallel.context_batch import context_parallel_loss

            loss, metrics, tokens = context_parallel_loss(self.model, self.objective, batch, cp)
        if stage == "train":
            if not getattr(self._strategy(), "counts_tokens", True):
                tokens = torch.zeros_like(tokens)  # a tensor-parallel replica: its tp rank 0 counts these tokens
            self.last_step_tokens = tokens  # this rank's share (its shard under context parallelism)
            self._tokens_seen = self._tokens_seen.to(tokens.device) + tokens
        bs = batch.input_ids.shape[0]
        on_step = stage == "train"
        # Epoch-level (validation/test) values are averaged over data-parallel ranks; per-step
        # training values stay local, so logging costs no collective on the hot path.
        kw = {"on_step": on_step, "on_epoch": not on_step, "batch_size": bs, "sync_dist": not on_step}
        self.log(f"{stage}/loss", loss, prog_bar=True, **kw)
        for k, v in metrics.items():
            if k != "loss":
                self.log(f"{stage}/{k}", v, **kw)
        if stage != "train" and getattr(self.objective, "loss_is_nll_nats", False):
            self._log_bits(stage, loss, metrics, kw)
        return loss

    def _log_bits(self, stage: str, loss: torch.Tensor, metrics: dict[str, Any], kw: dict[str, Any]) -> None:
        """``<stage>/bits_per_token = <stage>/loss / ln 2`` (and ``bits_per_token_<modality>`` from each
        ``loss_<modality>``), logged with the loss's own batch size so the epoch means agree: the objective
        declares its loss a negative log-likelihood in nats (``loss_is_nll_nats``). Several modalities: the
        total is the modality-weighted mean the loss is, the per-modality values are each modality's own."""
        self.log(f"{stage}/bits_per_token", loss.detach() / math.log(2.0), **kw)
        for k, v in metrics.items():
            if k.startswith("loss_"):
                self.log(f"{stage}/bits_per_token_{k[len('loss_'):]}", torch.as_tensor(v) / math.log(2.0), **kw)

    def configure_callbacks(self) -> list[pl.Callback]:
        """The growth-mask ramp when a strategy of this stage added masked structures (MSG)."""
        from mmgrow.training.growth_ramp import GrowthMaskRamp

        ramp = GrowthMaskRamp.from_strategies(self.growth)
        return [ramp] if ramp is not None else []

    def training_step(self, batch: TokenBatch, batch_idx: int) -> torch.Tensor:
        if self.__dict__.get("_before_growth") is not None:
            self._log_growth_jump(batch)
        return self._step(batch, "train")

    @torch.no_grad()
    def _log_growth_jump(self, batch: TokenBatch) -> None:
        """Loss of the pre-growth and the grown model on this batch (eval mode: no dropout)."""
        before = self.__dict__.pop("_before_growth").to(self.device)
        if self.context_parallel() is not None:
            return  # the copy would need its own sharded step; not measured under context parallelism
        losses = {}
        for name, model in (("before", before), ("after", self.model)):
            was_training = model.training
            model.eval()
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(0)  # an objective that draws noise (flow matching) draws the same for both
                losses[name] = self.objective.step(model, batch)[0]
            model.train(was_training)
        values = {"growth/loss_before": float(losses["before"]), "growth/loss_after": float(losses["after"]),
                  "growth/loss_jump": float(losses["after"] - losses["before"])}
        # Straight to the loggers: a step-0 value would be dropped by log_every_n_steps.
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)
        self.growth_summary["loss_jump"] = values

    def validation_step(self, batch: TokenBatch, batch_idx: int) -> torch.Tensor:
        return self._seeded_step(batch, batch_idx, "val")

    def test_step(self, batch: TokenBatch, batch_idx: int) -> torch.Tensor:
        return self._seeded_step(batch, batch_idx, "test")

    def _seeded_step(self, batch: TokenBatch, batch_idx: int, stage: str) -> torch.Tensor:
        """An evaluation step whose random draws depend only on ``eval_seed`` and the batch (see ``eval_seed``)."""
        seed = self.hparams.get("eval_seed", 0)  # absent from the hyperparameters of older checkpoints
        if seed is None:
            return self._step(batch, stage)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(int(seed) + int(batch_idx))
            return self._step(batch, stage)

    def predict_step(self, batch: TokenBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        """The objective's loss and metrics of each batch (e.g. held-out loss per modality)."""
        loss, metrics = self.objective.step(self.model, batch)
        return {"loss": loss.detach(), **{k: torch.as_tensor(v).detach() for k, v in metrics.items()}}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        return adamw_warmup_cosine(self, decay, no_decay)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, except for sharded parameters on several device meshes (FSDP x tensor
        parallelism), whose norm :func:`mmgrow.parallel.grad_norm.clip_grad_norm` takes mesh by mesh."""
        if gradient_clip_val and getattr(self._strategy(), "shards_parameters", False):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"gradient_clip_algorithm={gradient_clip_algorithm!r} is not supported with sharded "
                                 "parameters; use 'norm'")
            from mmgrow.parallel.grad_norm import clip_grad_norm

            clip_grad_norm(self.model.parameters(), float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    @property
    def tokens_seen(self) -> int:
        """Non-padding training tokens this process has seen (kept across resumes)."""
        return int(self._tokens_seen)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmgrow_tokens_seen"] = self.tokens_seen
        checkpoint[CHECKPOINT_CONFIG_KEY] = self.model_config()  # so init_from can start from a .ckpt

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        self.__dict__.pop("_before_growth", None)  # a resumed run: growth happened before the checkpoint
        self._tokens_seen = torch.tensor(int(checkpoint.get("mmgrow_tokens_seen", 0)))


def check_optimizer_hparams(owner: str, lr: Any, weight_decay: Any, betas: Any, warmup_steps: Any,
                            min_lr_ratio: Any) -> None:
    """The arguments of :func:`adamw_warmup_cosine`, checked at construction with the field named."""
    finite_number(owner, "lr", lr, low=0, low_open=True)
    finite_number(owner, "weight_decay", weight_decay, low=0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{owner}: betas must be two numbers in [0, 1), got {betas!r}")
    for i, beta in enumerate(betas):
        finite_number(owner, f"betas[{i}]", beta, low=0, high=1)
        if beta == 1:
            raise ValueError(f"{owner}: betas[{i}] must be < 1 (AdamW divides by 1 - beta), got {beta!r}")
    int_at_least(owner, "warmup_steps", warmup_steps, 0)
    finite_number(owner, "min_lr_ratio", min_lr_ratio, low=0, high=1)


def adamw_warmup_cosine(module: pl.LightningModule, decay: list, no_decay: list) -> dict[str, Any]:
    """AdamW over two parameter groups (weight decay on ``decay`` only) with :func:`warmup_cosine` per step,
    from the module's ``lr``, ``weight_decay``, ``betas``, ``warmup_steps``, ``min_lr_ratio`` hyperparameters."""
    hp = module.hparams
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas))
    trainer = module._trainer
    total = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=warmup_cosine(hp.warmup_steps, total, hp.min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def warmup_cosine(warmup: int, total: int | None, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: ``(s+1)/warmup`` during warm-up, then cosine from 1 to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if total is None or total <= warmup:
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor
