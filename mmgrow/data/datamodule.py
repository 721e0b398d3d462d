"""The LightningDataModule of mmgrow recipes: sources (dataset + task) -> mixture -> codecs -> TokenBatch.

Only training code imports this module (it imports lightning at the top). Everything in the
signature is a plain type, so LightningCLI / jsonargparse can fill it from YAML, and the attributes
the model needs (``token_space``, ``vocab``) exist right after ``__init__`` for instantiate-time links
such as ``data.vocab -> model.vocab``.

Pipeline. A *source* is a registered dataset (plugin kind ``datasets``,
:func:`mmgrow.data.datasets.dataset_class`) read through one task (:mod:`mmgrow.data.mixture`). The
training loader's sampler (:class:`~mmgrow.data.mixture_sampler.MixtureSampler`) yields one key per
batch -- which example of which source, drawn with the mixture weights of the batch's curriculum stage
-- and the loader dataset (:class:`~mmgrow.data.batch_builder.BatchBuilder`) builds and collates the
examples in the loader workers: padded (one example per row) or packed (``packing: {length: L}``,
:mod:`mmgrow.data.packing`). Without ``sources``, the ``tasks`` list over ``dataset`` is one source per
task over the *same* dataset instance, with equal weights (a task named twice gets weight 2).

Curriculum (:mod:`mmgrow.data.curriculum`): ``curriculum`` stages set the batch size, mixture and
length of the batches of their steps; batch ``k`` belongs to step ``k // accumulate_grad_batches``.
The schedule is :attr:`MMDataModule.curriculum` (the curriculum callback reads RoPE theta and the
learning-rate scale from it). Evaluation loaders (validation, test, predict) use the data module's
``batch_size`` and the longest length over the stages, and read every source's evaluation split in
order (sources sharing one dataset take its items round-robin: item ``i`` goes to the ``i % n``-th).

Conditioning. With a ``condition_encoder`` (e.g. a frozen
:class:`~mmgrow.tokenizers.text_encoder.FrozenTextEncoder`), every batch also carries the embeddings
of each example's condition text as ``TokenBatch.condition`` / ``condition_mask``, which the objective
passes on to cross-attention through ``SeqContext``. The encoder runs in the collate step: in the main
process with the default ``num_workers=0``, in each loader worker otherwise (each with its own copy and
cache; the encoder is deterministic, so the batches are the same).

Resumable: the mixture stream position and the training RNG stream are checkpoint state, so a run
resumed from any checkpoint sees the batches and draws the noise of the uninterrupted run
(:class:`~mmgrow.data.resumable_data.ResumableTrainData`), also in the middle of a curriculum stage.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

import mmgrow
from mmgrow.batch import TokenBatch
from mmgrow.checks import int_at_least, positive_int
from mmgrow.data.batch_builder import BatchBuilder, identity
from mmgrow.data.collate import ConditionEncoder
from mmgrow.data.curriculum import CurriculumSchedule
from mmgrow.data.datasets import dataset_class
from mmgrow.data.mixture import SourceSpec, check_stage_weights, main_weights, parse_mixture, parse_sources
from mmgrow.data.mixture_sampler import BatchKey, EvalSampler, MixtureSampler
from mmgrow.data.resumable_data import ResumableTrainData
from mmgrow.data.sequence import SequenceBuilder
from mmgrow.protocols import Task

DEFAULT_CODECS: dict[str, str] = {"text": "bytes", "video": "pixels"}
SPLITS = ("train", "val", "heldout")


class MMDataModule(ResumableTrainData, pl.LightningDataModule):
    """Sources + mixture + curriculum + codecs -> padded or packed :class:`~mmgrow.batch.TokenBatch` es.

    Args:
        tasks: registered task names (``mmgrow.available("tasks")``) over ``dataset``, equal weights;
            ignored when ``sources`` is given.
        codecs: ``{modality: tokenizer name}``; default ``{"text": "bytes", "video": "pixels"}``. The
            order fixes the token-space offsets and ``modality_ids``.
        codec_args: ``{modality: {kwarg: value}}`` for the codecs (e.g. ``{"video": {"grid": 4}}``).
        dataset: a registered dataset name (``mmgrow plugins list --kind datasets``; the default of every
            source).
        dataset_args: extra keyword arguments of the dataset class (e.g. ``{"frames": 4}``); a source's
            own ``dataset_args`` are merged over them.
        num_train, num_val: samples in the ``"train"`` and ``"val"`` splits (defaults of every source);
            ``num_val`` also sizes the ``"heldout"`` split used by ``test_dataloader`` / ``predict_dataloader``.
        seq_len: without packing, pad every batch to this length (an example longer than it is an
            error), or None to pad each batch to its longest example.
        batch_size: examples per batch and replica (a curriculum stage may change it).
        eval_batch_size: examples per validation/test batch (None = ``batch_size``). A scaling sweep fixes it so
            that runs with different training batch sizes are validated on identical batches (with the
            module's seeded evaluation noise, identical draws too).
        num_workers: DataLoader workers (they build and collate the batches).
        seed: seeds the dataset splits, the source orders and the mixture draws.
        condition_encoder: an object with ``latent_dim`` and ``encode(list[str]) -> (emb [B, S, C],
            mask [B, S])`` (:class:`~mmgrow.data.collate.ConditionEncoder`); None = no conditioning.
            Its output width is :attr:`condition_dim` (link it to the model's cross-attention).
        sources: ``[{name, dataset, dataset_args, task, task_args, weight | every, num_train, num_val}, ...]``
            (:mod:`mmgrow.data.mixture`); None = one source per entry of ``tasks``.
        mixture: ``{temperature: T}``: sources without a ``weight`` are balanced by size^(1/T).
        packing: ``{length: L, mode, algorithm, weighting}`` (``PackingConfig``); None = one example per row.
        curriculum: a list of stages (:mod:`mmgrow.data.curriculum`); None = one stage.
    """

    def __init__(
        self,
        tasks: list[str] = ["text_to_video"],  # noqa: B006 - never mutated; a plain default for jsonargparse
        codecs: dict[str, str] | None = None,
        codec_args: dict[str, dict] | None = None,
        dataset: str = "shapes",
        dataset_args: dict | None = None,
        num_train: int = 2048,
        num_val: int = 64,
        seq_len: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        condition_encoder: ConditionEncoder | None = None,
        sources: list[dict] | None = None,
        mixture: dict | None = None,
        packing: dict | None = None,
        curriculum: list[dict] | None = None,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        # The encoder object (possibly a whole frozen language model) stays out of the hyperparameters
        # that Lightning pickles into every checkpoint; the recipe's config.yaml records how it was built.
        self.save_hyperparameters(ignore=["condition_encoder"])
        if sources is None and (isinstance(tasks, str) or not tasks):
            raise ValueError(f"MMDataModule: tasks must be a non-empty list of task names, got {tasks!r}")
        dataset_class(dataset)  # an unknown name: ValueError listing the registered datasets
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"MMDataModule: seq_len must be a positive int or None, got {seq_len!r}")
        positive_int("MMDataModule", "batch_size", batch_size)
        if eval_batch_size is not None:
            positive_int("MMDataModule", "eval_batch_size", eval_batch_size)
        self.eval_batch_size = eval_batch_size
        positive_int("MMDataModule", "num_train", num_train)
        positive_int("MMDataModule", "num_val", num_val)  # also sizes the held-out split: an empty one breaks test
        int_at_least("MMDataModule", "num_workers", num_workers, 0)
        codecs = dict(DEFAULT_CODECS if codecs is None else codecs)
        codec_args = dict(codec_args or {})
        unknown = sorted(set(codec_args) - set(codecs))
        if unknown:
            raise ValueError(f"MMDataModule: codec_args given for {unknown} which have no codec; codecs: {sorted(codecs)}")

        self.codecs = {m: mmgrow.create("tokenizers", name, **codec_args.get(m, {})) for m, name in codecs.items()}
        self.builder = SequenceBuilder(self.codecs)
        self.token_space = self.builder.token_space
        self.vocab: dict[str, int] = self.token_space.to_dict()
        self.continuous: dict[str, int] = dict(self.builder.continuous)
        """``{modality: latent_dim}`` of the continuous codecs (linked into ``model.continuous``)."""
        self.input_encoders: dict[str, dict] = {
            m: c.input_encoder_spec() for m, c in self.codecs.items()
            if m in self.continuous and callable(getattr(c, "input_encoder_spec", None))}
        """``{modality: {class_path, init_args}}`` of the continuous codecs that ship a trainable input encoder
        (linked into ``model.input_encoders``)."""

        if condition_encoder is not None and not isinstance(condition_encoder, ConditionEncoder):
            raise TypeError(f"MMDataModule: condition_encoder must have latent_dim and encode(list[str]) -> "
                            f"(embeddings, mask), got {type(condition_encoder).__name__}")
        self.condition_encoder = condition_encoder
        self.condition_dim: int | None = None if condition_encoder is None else int(condition_encoder.latent_dim)
        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed

        if sources is None:  # the `tasks` list: one source per task over the same dataset, equal weights
            counts = Counter(tasks)
            specs = [SourceSpec(name=t, dataset=dataset, task=t, weight=float(counts[t])) for t in counts]
        else:
            specs = parse_sources(sources, dataset)
        self.sources: list[SourceSpec] = specs
        self.tasks: list[Task] = [mmgrow.create("tasks", s.task, **s.task_args) for s in specs]
        """One task per source (source order)."""
        for spec, task in zip(specs, self.tasks):
            missing = [m for m in task.modalities if m not in self.codecs]
            if missing:
                raise ValueError(f"MMDataModule: task {spec.task!r} needs codecs for {missing}; codecs: "
                                 f"{sorted(self.codecs)}")
        self._build_datasets(dataset_args or {}, num_train, num_val)

        self.packing = None
        if packing is not None:
            from mmgrow.data.packing import PackingConfig

            self.packing = PackingConfig.from_config(packing)
        length = self.packing.length if self.packing is not None else seq_len
        sizes = {s.name: len(ds) for s, ds in zip(specs, self.source_sets["train"])}
        self.weights: dict[str, float] = main_weights(specs, sizes, parse_mixture(mixture))
        """The declared weights of the main sources (before any curriculum stage)."""
        self.curriculum = CurriculumSchedule(curriculum, batch_size=batch_size, length=length, mixture=self.weights)
        """The resolved stages (a single open stage without ``curriculum``)."""
        extras = [s.name for s in specs if s.is_extra]
        for stage in self.curriculum.stages:
            check_stage_weights(stage.mixture, list(self.weights), f"curriculum stage {stage.index}")
            unknown = sorted(set(stage.every) - set(extras))
            if unknown:
                raise ValueError(f"curriculum stage {stage.index}: every names {unknown}, which are not extra sources "
                                 f"(sources with `every`); extras: {extras}")
        lengths = [s.length for s in self.curriculum.stages]
        self.eval_length: int | None = None if None in lengths else max(lengths)
        """Row length of the evaluation batches: the longest over the stages (None = pad to the longest)."""

    # -- datasets ----------------------------------------------------------------------------------------
    def _build_datasets(self, dataset_args: dict, num_train: int, num_val: int) -> None:
        """``self.source_sets[split]``: one dataset per source; sources with the same dataset settings
        share one instance per split (the ``tasks`` list always does)."""
        cache: dict[tuple, Any] = {}
        self.source_sets: dict[str, list[Any]] = {split: [] for split in SPLITS}
        for spec in self.sources:
            args = {**dataset_args, **spec.dataset_args}
            sizes = {"train": spec.num_train or num_train, "val": spec.num_val or num_val}
            sizes["heldout"] = sizes["val"]
            for split in SPLITS:
                key = (spec.dataset, json.dumps(args, sort_keys=True, default=repr), split, sizes[split])
                if key not in cache:
                    cache[key] = dataset_class(spec.dataset)(num_samples=sizes[split], seed=self.seed, split=split,
                                                             **args)
                self.source_sets[split].append(cache[key])
        self.train_set = self.source_sets["train"][0]
        self.val_set = self.source_sets["val"][0]
        # `mmgrow test` / `predict` run on the held-out combinations: never seen in train or val.
        self.test_set = self.source_sets["heldout"][0]

    def skipped_files(self) -> list[dict]:
        """The files the datasets skipped (``{path, reason}`` each; datasets without a ``skipped`` list add none)."""
        seen, out = set(), []
        for split in SPLITS:
            for ds in self.source_sets[split]:
                if id(ds) not in seen:
                    seen.add(id(ds))
                    out.extend(getattr(ds, "skipped", []) or [])
        return out

    def source_for(self, modality: str) -> int | None:
        """Index of the first source whose task generates ``modality`` (its ``target_modalities``), or None.
        Sample writers read that source's datasets (:meth:`split_of`): in a mixture of needle text and
        shapes video, the videos to sample come from shapes whatever the order of the sources."""
        return next((i for i, task in enumerate(self.tasks) if modality in task.target_modalities), None)

    def split_of(self, split: str, modality: str | None = None) -> Any:
        """The ``split`` dataset (train / val / heldout) of :meth:`source_for` ``(modality)`` (the first
        source when ``modality`` is None or no task generates it)."""
        index = None if modality is None else self.source_for(modality)
        return self.source_sets[split][index or 0]

    def heldout_prompts(self, modality: str | None = None) -> list[tuple[str, dict]]:
        """``(caption, meta)`` of the held-out combinations of the source generating ``modality`` (never seen
        in train / val)."""
        dataset = self.split_of("train", modality)
        prompts = getattr(dataset, "heldout_prompts", None)
        if prompts is None:
            raise NotImplementedError(f"dataset {type(dataset).__name__} declares no held-out prompts")
        return prompts()

    # -- training order ----------------------------------------------------------------------------------
    def batch_builder(self, split: str) -> BatchBuilder:
        """The loader dataset of ``split`` (``train``, ``val`` or ``heldout``)."""
        return BatchBuilder(self.source_sets[split], self.tasks, self.builder, self.curriculum, self.eval_length,
                            self.packing, self.condition_encoder)

    def new_train_sampler(self, num_replicas: int = 1, rank: int = 0) -> MixtureSampler:
        names = [s.name for s in self.sources]
        trainer = getattr(self, "trainer", None)
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        # an epoch ~ one pass over the distinct training datasets of the main sources
        distinct = {id(ds): len(ds) for s, ds in zip(self.sources, self.source_sets["train"]) if not s.is_extra}
        per_epoch = math.ceil(sum(distinct.values()) / (self.batch_size * num_replicas))
        stage_weights = [[0.0 if s.is_extra else stage.mixture.get(s.name, 0.0) for s in self.sources]
                         for stage in self.curriculum.stages]
        return MixtureSampler(names, [len(ds) for ds in self.source_sets["train"]], self.stage_every(), stage_weights,
                              self.curriculum, per_epoch, seed=self.seed, num_replicas=num_replicas, rank=rank,
                              accumulate=accumulate)

    def stage_every(self) -> list[dict[int, int]]:
        """Per curriculum stage, ``{source position: cnt}`` of the extras (a stage's ``every`` over the
        sources' declared rates; 0 = off in that stage)."""
        return [{i: stage.every.get(s.name, s.every) for i, s in enumerate(self.sources) if s.is_extra}
                for stage in self.curriculum.stages]

    def train_sampler(self) -> MixtureSampler:
        sampler = super().train_sampler()
        trainer = getattr(self, "trainer", None)
        if trainer is not None:  # batch k belongs to step k // accumulate
            sampler.accumulate = int(trainer.accumulate_grad_batches)
        return sampler

    def advance_train_position(self, sampler: MixtureSampler) -> None:
        sampler.advance()

    def eval_keys(self, split: str) -> list[BatchKey]:
        """The evaluation batches of ``split``: every source's items in order, ``eval_batch_size`` (else
        ``batch_size``) per batch (sources sharing one dataset instance take its items round-robin)."""
        groups: dict[int, list[int]] = {}
        for position, ds in enumerate(self.source_sets[split]):
            groups.setdefault(id(ds), []).append(position)
        items = []
        for members in groups.values():
            ds = self.source_sets[split][members[0]]
            items.extend((members[i % len(members)], i) for i in range(len(ds)))
        size = self.eval_batch_size or self.batch_size
        return [BatchKey(-1, None, tuple(items[i:i + size])) for i in range(0, len(items), size)]

    # -- loaders -----------------------------------------------------------------------------------------
    def _loader(self, split: str, sampler: Any) -> DataLoader:
        return DataLoader(self.batch_builder(split), batch_size=None, sampler=sampler,
                          generator=self.loader_generator(), num_workers=self.num_workers, collate_fn=identity,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Batches of the mixture stream (:class:`~mmgrow.data.mixture_sampler.MixtureSampler`), continuing
        from the position of a resumed checkpoint."""
        return self._loader("train", self.train_sampler())

    def eval_sampler(self, split: str) -> EvalSampler:
        """:meth:`eval_keys` sharded over the trainer's data-parallel ranks (whole batches per rank)."""
        trainer = getattr(self, "trainer", None)
        kwargs = dict(getattr(trainer, "distributed_sampler_kwargs", None) or {})
        return EvalSampler(self.eval_keys(split), kwargs.get("num_replicas", 1), kwargs.get("rank", 0))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_sampler("val"))

    def test_dataloader(self) -> DataLoader:
        """The ``"heldout"`` split (``num_val`` samples per source): the loss on compositions never trained on."""
        return self._loader("heldout", self.eval_sampler("heldout"))

    def predict_dataloader(self) -> DataLoader:
        return self._loader("heldout", self.eval_sampler("heldout"))

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # TokenBatch.to moves every field in one call and re-runs its shape checks.
        if isinstance(batch, TokenBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
