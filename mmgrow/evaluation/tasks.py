"""Per-task evaluation of a multitask model: every scored task's metrics on its own evaluation split.

A task with ``scored = True`` (:class:`~mmgrow.protocols.Task`) ends its segments with its one target
(the answer, the caption, the box ...). The model sees the other segments, opens the target with its
codec's ``generation_prefix`` and decodes greedily (:func:`~mmgrow.training.generation.sample_discrete`)
for at most ``len(encode(target)) - len(prefix) + 1`` tokens (one of slack; examples with prompts of one
length decode as one batch), cut at the codec's
``generation_length`` and decoded to a raw item (a string, a box ...); ``task.score(prediction, sample,
target)`` turns it into metrics in ``[0, 1]`` (exact match for questions and matching, attribute
match for captions, IoU for grounding). The budget comes from the true target's length, which keeps
decoding short; it cannot make a wrong prediction right (a text answer that runs on has no ``eos``
and fails exact match).

:func:`evaluate_tasks` scores every scored source of a data module on the first ``num_samples`` items
of the source's ``split`` dataset and averages each metric: ``{source: {"task", "samples", metric:
mean}}``. :func:`tasks_table` renders results as a Markdown table (one row per split and source).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmgrow.protocols import Sample, Segment, Task


def split_target(task: Task, sample: Sample) -> tuple[list[Segment], Segment]:
    """``(prompt segments, target segment)`` of a scored example: its segments must end in its one target."""
    segments = task.segments(sample)
    targets = [i for i, s in enumerate(segments) if s.role == "target"]
    if targets != [len(segments) - 1]:
        raise ValueError(f"task {task.name!r} is scored but its segments do not end in exactly one target "
                         f"(roles {[s.role for s in segments]}); a scored task's last segment is what the model "
                         "decodes and is scored on")
    return segments[:-1], segments[-1]


def target_budget(codec: Any, target: Segment) -> int:
    """Tokens decoded for ``target``: ``len(encode(target)) - len(prefix) + 1`` (one of slack), at least 1."""
    return max(len(codec.encode(target.raw)) - len(codec.generation_prefix()) + 1, 1)


def decode_targets(model: Any, objective: Any, builder: Any, examples: list[tuple[list[Segment], Segment]],
                   condition_texts: list[str | None] | None = None, condition_encoder: Any = None,
                   batch_size: int = 64) -> list[Any]:
    """The model's greedy predictions of each example's target after its prompt (module docstring), decoded,
    in order. Examples whose prompts encode to the same length and whose targets share a modality decode
    together in batches of up to ``batch_size`` rows (no padding, so each row gets what it would alone)."""
    from mmgrow.training.generation import SamplerSettings, sample_discrete_batch

    texts = list(condition_texts or [None] * len(examples))
    groups: dict[tuple[str, int], list[int]] = {}
    encoded = []
    for i, (prompt, target) in enumerate(examples):
        codec = builder.codecs.get(target.modality)
        if codec is None or getattr(codec, "kind", "discrete") != "discrete":
            raise ValueError(f"cannot decode a {target.modality!r} target: scored tasks need a discrete codec for "
                             f"their target modality (codecs: {sorted(builder.codecs)})")
        encoded.append(builder.build(prompt))  # once: grouped by length, then decoded
        groups.setdefault((target.modality, len(encoded[-1])), []).append(i)
    out: list[Any] = [None] * len(examples)
    for (modality, _), members in groups.items():
        codec = builder.codecs[modality]
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            decoded = sample_discrete_batch(
                model, objective, builder, [examples[i][0] for i in chunk], modality,
                [target_budget(codec, examples[i][1]) for i in chunk], condition_texts=[texts[i] for i in chunk],
                condition_encoder=condition_encoder, settings=SamplerSettings(greedy=True),
                encoded=[encoded[i] for i in chunk])
            for i, item in zip(chunk, decoded):
                out[i] = item
    return out


def evaluate_task(model: Any, objective: Any, builder: Any, task: Task, dataset: Any, num_samples: int,
                  condition_encoder: Any = None, batch_size: int = 64) -> dict[str, Any]:
    """Mean of ``task.score`` over the first ``num_samples`` items of ``dataset``:
    ``{"task": name, "samples": n, <metric>: mean, ...}`` (a metric a sample does not report is
    averaged over the samples that do). Decoding is batched (:func:`decode_targets`)."""
    n = min(int(num_samples), len(dataset))
    if n < 1:
        raise ValueError(f"evaluate_task: no samples to score for task {task.name!r} (dataset of {len(dataset)}, "
                         f"num_samples={num_samples})")
    samples = [dataset[i] for i in range(n)]
    examples = [split_target(task, s) for s in samples]
    texts = [task.condition_text(s, prompt) for s, (prompt, _) in zip(samples, examples)]
    predictions = decode_targets(model, objective, builder, examples, texts, condition_encoder, batch_size)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for sample, (_, target), prediction in zip(samples, examples, predictions):
        for name, value in task.score(prediction, sample, target).items():
            sums[name] = sums.get(name, 0.0) + float(value)
            counts[name] = counts.get(name, 0) + 1
    return {"task": task.name, "samples": n, **{k: sums[k] / counts[k] for k in sums}}


def evaluate_tasks(model: Any, objective: Any, datamodule: Any, split: str = "val",
                   num_samples: int = 32) -> dict[str, dict[str, Any]]:
    """Every scored source of ``datamodule`` (an :class:`~mmgrow.data.datamodule.MMDataModule`) on its
    ``split`` dataset: ``{source name: evaluate_task(...)}`` in source order; sources whose task is
    not scored (text-to-video, plain text ...) are left out."""
    if split not in datamodule.source_sets:
        raise ValueError(f"evaluate_tasks: unknown split {split!r}; expected one of {sorted(datamodule.source_sets)}")
    results: dict[str, dict[str, Any]] = {}
    encoder = getattr(datamodule, "condition_encoder", None)
    for spec, task, dataset in zip(datamodule.sources, datamodule.tasks, datamodule.source_sets[split]):
        if getattr(task, "scored", False):
            results[spec.name] = evaluate_task(model, objective, datamodule.builder, task, dataset, num_samples,
                                               encoder)
    return results


def main_metric(result: Mapping[str, Any]) -> tuple[str, float] | None:
    """The headline metric of one :func:`evaluate_task` result: ``accuracy`` when present, else the first."""
    metrics = [(k, v) for k, v in result.items() if k not in ("task", "samples")]
    if not metrics:
        return None
    return next(((k, v) for k, v in metrics if k == "accuracy"), metrics[0])


def tasks_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """``{split: {source: result}}`` as a Markdown table: split, source, task, samples, then every metric
    (columns: the union of metric names, in first-seen order; ``-`` where a task has none)."""
    names: list[str] = []
    for per_split in results.values():
        for result in per_split.values():
            names.extend(k for k in result if k not in ("task", "samples") and k not in names)
    lines = ["| split | source | task | samples | " + " | ".join(names) + " |",
             "|---|---|---|---:|" + "---:|" * len(names)]
    for split, per_split in results.items():
        for source, result in per_split.items():
            cells = [f"{result[k]:.3f}" if k in result else "-" for k in names]
            lines.append(f"| {split} | {source} | {result['task']} | {result['samples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
