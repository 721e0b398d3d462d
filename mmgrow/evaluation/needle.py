"""Needle-retrieval accuracy over a grid of context lengths and depths (LWM's long-context probe).

For each context length ``L`` (in **tokens of the run's codecs**) and depth ``d``, ``samples``
needle examples (:class:`~mmgrow.data.synthetic.needle.NeedleDataset`, split ``heldout``, the
given seed) are answered by greedy decoding and scored by exact match (:mod:`mmgrow.evaluation.qa`).

**Tokens -> haystack size.** The prompt the model reads is the haystack segment followed by the
question segment, each encoded by its codec (special tokens included: ``bos``/``eos`` for text,
``bov``/``eof``/``eov`` for pixel video). The haystack size ``n`` used for ``L`` (characters for
text, frames for video) is the largest ``n`` whose prompt has at most ``L`` tokens, found by
encoding a haystack of each candidate size (doubling, then bisection), so any codec is measured as
it really encodes. A length too short for the needle and the question alone is an error naming the
smallest length that fits.

The results are ``{"lengths", "depths", "accuracy": [[acc per depth] per length], "samples",
"kind", "checkpoint", "haystack_sizes": [n per length], "unit": "characters" | "frames"}``; the
heat map (:func:`plot_needle_heatmap`) draws them as LWM does: context length across, depth down,
colour = accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmgrow.data.needle_task import NeedleTask
from mmgrow.data.synthetic.needle import TEXT_NEEDLE_LEN, VIDEO_NEEDLE_LEN, NeedleDataset
from mmgrow.evaluation import qa

UNITS = {"text": "characters", "video": "frames"}


def prompt_tokens(builder: Any, dataset: NeedleDataset, task: NeedleTask | None = None) -> int:
    """Tokens of the prompt (haystack + question) of ``dataset[0]`` under ``builder``'s codecs."""
    example = qa.qa_example(task or NeedleTask(), dataset[0])
    return len(builder.build(example.prompt))


def haystack_size(builder: Any, length: int, kind: str, make: Callable[[int], NeedleDataset]) -> int:
    """The largest haystack size whose prompt fits in ``length`` tokens (module docstring).

    ``make(n)`` builds a needle dataset with haystack size ``n``. Prompt length grows with ``n``
    for every codec, so doubling then bisection finds the size."""
    low = TEXT_NEEDLE_LEN if kind == "text" else VIDEO_NEEDLE_LEN
    smallest = prompt_tokens(builder, make(low))
    if smallest > length:
        raise ValueError(f"--lengths {length}: too short for a {kind} needle; the smallest haystack ({low} "
                         f"{UNITS[kind]}) and the question take {smallest} tokens of the run's codecs; use lengths "
                         f">= {smallest}")
    high = low * 2
    while prompt_tokens(builder, make(high)) <= length:  # invariant: fits(low), grow until high does not fit
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if prompt_tokens(builder, make(mid)) <= length:
            low = mid
        else:
            high = mid
    return low


def video_frame_args(builder: Any, trained: dict | None = None) -> dict[str, int]:
    """:class:`NeedleDataset` ``size`` / ``grid`` for video haystacks drawn like a run's training videos:
    ``size`` and ``grid`` of its ``dataset_args`` (``trained``), the video codec's ``grid`` when it has
    one (then ``size`` defaults to 4 pixels per cell)."""
    args = {k: (trained or {})[k] for k in ("size", "grid") if k in (trained or {})}
    grid = getattr(builder.codecs.get("video"), "grid", None)
    if isinstance(grid, int) and not isinstance(grid, bool):
        args["grid"] = grid
        args.setdefault("size", grid * 4)
    return args


def check_needle_codecs(builder: Any, kind: str) -> None:
    """A ``kind`` needle needs discrete codecs for text (question, answer) and, for video, video."""
    needed = ["text"] + (["video"] if kind == "video" else [])
    missing = [m for m in needed if m not in builder.codecs or builder.codecs[m].kind != "discrete"]
    if missing:
        have = {m: type(c).__name__ for m, c in builder.codecs.items()}
        raise ValueError(f"a {kind} needle needs discrete codecs for {needed}; the run's codecs are {have}"
                         + (" (try --kind text)" if missing == ["video"] else ""))


def evaluate_needle(model: Any, objective: Any, builder: Any, *, lengths: Sequence[int], depths: Sequence[float],
                    samples: int, kind: str = "text", seed: int = 0, dataset_args: dict | None = None,
                    condition_encoder: Any = None, checkpoint: str | None = None) -> dict[str, Any]:
    """Accuracy of needle retrieval for every ``(length, depth)`` (module docstring for the result).

    ``dataset_args`` go to :class:`NeedleDataset` (e.g. ``size`` / ``grid`` of video frames). Example
    ``i`` of every cell comes from the same random stream, so across depths it keeps its code (or
    colour) and filler and only the needle moves."""
    check_needle_codecs(builder, kind)
    args = dict(dataset_args or {})

    def make(size: int, depth: float = 0.5, n: int = 1) -> NeedleDataset:
        return NeedleDataset(num_samples=n, kind=kind, length=size, depth=depth, seed=seed, split="heldout", **args)

    task = NeedleTask()
    sizes = [haystack_size(builder, int(length), kind, make) for length in lengths]
    accuracy = []
    for size in sizes:
        row = []
        for depth in depths:
            dataset = make(size, float(depth), samples)
            examples = [qa.qa_example(task, dataset[i]) for i in range(samples)]
            row.append(qa.greedy_answer_accuracy(model, objective, builder, examples, condition_encoder))
        accuracy.append(row)
    return {"lengths": [int(v) for v in lengths], "depths": [float(d) for d in depths], "accuracy": accuracy,
            "samples": int(samples), "kind": kind, "checkpoint": checkpoint, "haystack_sizes": sizes,
            "unit": UNITS[kind]}


def plot_needle_heatmap(result: dict[str, Any], out_png: str | Path) -> Path:
    """LWM-style heat map of ``result["accuracy"]`` into ``out_png`` (atomic write): x = context length
    (tokens), y = needle depth (0 at the top), colour = accuracy from red (0) to green (1), each
    cell labelled with its value. matplotlib is imported here, on an explicit Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mmgrow.evaluation.media import atomic_write

    lengths, depths = result["lengths"], result["depths"]
    grid = [[result["accuracy"][i][j] for i in range(len(lengths))] for j in range(len(depths))]  # [depth][length]
    fig = Figure(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.6 * len(depths)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for j, row in enumerate(grid):
        for i, value in enumerate(row):
            ax.text(i, j, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(v) for v in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{result.get('kind', '')} needle retrieval ({result.get('samples')} samples per cell)")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    atomic_write(out_png, lambda f: fig.savefig(f, format="png"))
    return Path(out_png)


def next_eval_dir(run: str | Path, name: str = "needle") -> Path:
    """``<run>/eval/<name>-<n>`` with the first free ``n`` (earlier evaluations are kept)."""
    n = 0
    while (Path(run) / "eval" / f"{name}-{n}").exists():
        n += 1
    return Path(run) / "eval" / f"{name}-{n}"


def write_needle_results(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``out_dir/needle.json`` (strict JSON, atomic) and ``out_dir/needle.png``; returns both paths."""
    from mmgrow.rundir import atomic_write_bytes, strict_json

    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "needle.json", strict_json(result))
    return out_dir / "needle.json", plot_needle_heatmap(result, out_dir / "needle.png")
