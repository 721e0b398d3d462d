"""Exact-match accuracy of greedy text answers: the scorer of ``video_qa`` and needle retrieval.

An example is a task's segments split at its one text target: the inputs are the prompt, the
target's text is the answer (:func:`qa_example`). The model answers by greedy decoding with the
objective's token sampler (:func:`~mmgrow.training.generation.sample_discrete`): the prompt, the
text codec's ``generation_prefix`` (``bos``), then at most ``len(encode(answer)) - len(prefix) + 1``
tokens, cut at the codec's ``generation_length`` (its first ``eos``) and decoded. An answer is right
when the decoded text, stripped of surrounding whitespace, equals the answer exactly, so a model
that goes on after the answer (no ``eos``) is wrong. The token budget comes from the answer's length
(one token of slack), which keeps decoding short; it cannot turn a wrong answer into a right one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmgrow.protocols import Sample, Segment, Task


@dataclass
class QAExample:
    """One question: ``prompt`` (input segments, in order), the ``answer`` text, the condition text for a
    model with cross-attention (or None) and the sample's ``meta`` (for grouping scores)."""

    prompt: list[Segment]
    answer: str
    condition_text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def qa_example(task: Task, sample: Sample) -> QAExample:
    """``task.segments(sample)`` as a :class:`QAExample`: it must end in exactly one text target."""
    segments = task.segments(sample)
    targets = [i for i, s in enumerate(segments) if s.role == "target"]
    if targets != [len(segments) - 1] or segments[-1].modality != "text" or not isinstance(segments[-1].raw, str):
        raise ValueError(f"qa_example: task {task.name!r} must end its segments with exactly one text target "
                         f"(the answer); got roles {[s.role for s in segments]} and modalities "
                         f"{[s.modality for s in segments]}")
    prompt = segments[:-1]
    return QAExample(prompt, segments[-1].raw, task.condition_text(sample, prompt), dict(sample.meta))


def decode_answer(model: Any, objective: Any, builder: Any, example: QAExample, condition_encoder: Any = None) -> str:
    """The model's greedy answer to ``example`` (module docstring), decoded to text."""
    return answers(model, objective, builder, [example], condition_encoder)[0]


def is_correct(predicted: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace from the prediction."""
    return predicted.strip() == answer


def answers(model: Any, objective: Any, builder: Any, examples: Iterable[QAExample],
            condition_encoder: Any = None) -> list[str]:
    """:func:`decode_answer` for each example, in order (prompts of one length decode as one batch:
    :func:`mmgrow.evaluation.tasks.decode_targets`)."""
    from mmgrow.evaluation.tasks import decode_targets

    examples = list(examples)
    pairs = [(e.prompt, Segment("text", e.answer, "target")) for e in examples]
    return decode_targets(model, objective, builder, pairs, [e.condition_text for e in examples], condition_encoder)


def greedy_answer_accuracy(model: Any, objective: Any, builder: Any, examples: Sequence[QAExample],
                           condition_encoder: Any = None) -> float:
    """Fraction of ``examples`` answered exactly (:func:`is_correct`); an empty list is an error."""
    if not examples:
        raise ValueError("greedy_answer_accuracy: no examples to score")
    predicted = answers(model, objective, builder, examples, condition_encoder)
    return sum(is_correct(p, e.answer) for p, e in zip(predicted, examples)) / len(examples)


def video_qa_accuracy(model: Any, objective: Any, builder: Any, dataset: Any, num_samples: int | None = None,
                      task: Task | None = None, condition_encoder: Any = None) -> dict[str, Any]:
    """Video-QA accuracy on the first ``num_samples`` (default all) samples of a shapes ``dataset``.

    Returns ``{"accuracy": float, "per_kind": {kind: accuracy}, "counts": {kind: n}, "samples": n}``;
    ``task`` defaults to :class:`~mmgrow.data.video_qa.VideoQA` with all question kinds.
    """
    from mmgrow.data.video_qa import VideoQA

    task = task or VideoQA()
    n = len(dataset) if num_samples is None else min(int(num_samples), len(dataset))
    if n < 1:
        raise ValueError(f"video_qa_accuracy: no samples to score (dataset of {len(dataset)}, num_samples={num_samples})")
    samples = [dataset[i] for i in range(n)]
    examples = [qa_example(task, s) for s in samples]
    kinds = [task.kind_of(s) for s in samples]
    predicted = answers(model, objective, builder, examples, condition_encoder)
    right = [is_correct(p, e.answer) for p, e in zip(predicted, examples)]
    counts = {k: kinds.count(k) for k in task.kinds if k in kinds}
    per_kind = {k: sum(r for r, kk in zip(right, kinds) if kk == k) / c for k, c in counts.items()}
    return {"accuracy": sum(right) / n, "per_kind": per_kind, "counts": counts, "samples": n}
