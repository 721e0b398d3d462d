"""``mmgrow generate --checkpoint RUN (--prompt TEXT ... | --storyboard FILE.json)``: videos from a trained run.

The run directory of ``mmgrow fit`` holds everything needed: ``model.safetensors`` + ``model.yaml``
(the model, growth replayed) and ``config.yaml`` (the data section rebuilds the codecs, the condition
encoder and the tasks; the model section names the objective, whose sampler is used). For each
prompt it writes ``NN_<prompt>.gif`` and ``.mp4`` into ``--out`` (default ``RUN/generated``) plus
``generate.json`` with the prompts, the settings and the files. Relative paths in the run's config
(a codec checkpoint, ``pretrained/...``) are read from the current directory, as during training.
Classes named in ``config.yaml`` are imported only when trusted (:mod:`mmgrow.trust`): a run directory
from elsewhere cannot make this command import or call arbitrary code.

A prompt is turned into segments by the run's first task that targets video, with a black
placeholder video of ``--frames`` frames (default: the training clips' length). A storyboard is a JSON
list of scenes (``{"text": ..., "requires_scene_transition": bool}``) and needs a run trained on
storyboards (the ``storyboard_to_video`` task; one sequence, sampled jointly).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import yaml

from mmgrow.cli_text import plain_text


def instantiate(spec: Any, key: str = "config.yaml", base: type = object) -> Any:
    """``{class_path, init_args}`` (nested ones too) -> the object; anything else is returned as is.

    Each ``class_path`` must be a trusted class (:func:`mmgrow.trust.trusted_class`, checked before
    import; ``base`` for the outermost one); otherwise an :class:`~mmgrow.trust.UntrustedClassError`
    names ``key`` (e.g. ``config.yaml: data.condition_encoder.class_path``) and nothing is imported."""
    from mmgrow.trust import trusted_class

    if isinstance(spec, dict) and "class_path" in spec:
        cls = trusted_class(str(spec["class_path"]), base, f"{key}.class_path")
        args = spec.get("init_args") or {}
        return cls(**{k: instantiate(v, f"{key}.init_args.{k}") for k, v in args.items()})
    return spec


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:50] or "sample"


MAX_PROMPT_CHARS = 1000
"""Default bound on a prompt's length. The models are trained on captions of tens of characters; the
sampler's memory grows with the square of the sequence (a 96,000-character prompt took 17 GB), so a
longer prompt is refused before anything is allocated. ``--max-prompt-chars`` raises the bound."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgrow generate", description=plain_text(__doc__.split("\n\n")[0]))
    p.add_argument("--checkpoint", required=True, help="run directory of `mmgrow fit` (model.safetensors, config.yaml)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", help="a caption; repeat for several videos")
    what.add_argument("--storyboard", help="JSON file: a list of scenes {text, requires_scene_transition}")
    p.add_argument("--out", help="output directory (default RUN/generated)")
    p.add_argument("--frames", type=int, help="frames per video (per segment for storyboards: the training length)")
    p.add_argument("--steps", type=int, default=25, help="ODE steps of the flow-matching sampler")
    p.add_argument("--solver", default="euler", choices=("euler", "heun"))
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--temperature", type=float, default=1.0, help="token sampling temperature (token models)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=4)
    p.add_argument("--max-prompt-chars", type=int, default=MAX_PROMPT_CHARS,
                   help=f"longest prompt (or storyboard scene text) accepted, in characters (default {MAX_PROMPT_CHARS})")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Checks that need no model: every bad value fails before the run is loaded or anything sampled."""
    from mmgrow.checks import finite_number, int_at_least, positive_int, utf8_argument

    owner = ""  # the option names are the subject: "--frames must be a positive int, got 0"
    if args.frames is not None:
        positive_int(owner, "--frames", args.frames)
    positive_int(owner, "--steps", args.steps)
    positive_int(owner, "--max-prompt-chars", args.max_prompt_chars)
    finite_number(owner, "--fps", args.fps, low=0, low_open=True)
    finite_number(owner, "--temperature", args.temperature, low=0, low_open=True)
    finite_number(owner, "--guidance", args.guidance)
    if args.top_k is not None:
        int_at_least(owner, "--top-k", args.top_k, 1)
    for prompt in args.prompt or []:
        utf8_argument("--prompt", prompt)
        if not prompt.strip():
            raise ValueError("--prompt is empty; give a caption such as 'a red square moves left'")
        check_prompt_length("--prompt", prompt, args.max_prompt_chars)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is an existing file; give a directory for the videos")


def check_prompt_length(what: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise ValueError(f"{what} has {len(text):,} characters; at most {limit:,} are accepted (--max-prompt-chars): "
                         "the sampler's memory grows with the square of the sequence")


def read_run_config(run: Path) -> tuple[Path, dict[str, Any]]:
    """``(path, parsed config.yaml)`` of a run directory of ``mmgrow fit`` (a named error otherwise)."""
    config = run / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: --checkpoint must be the run directory of `mmgrow fit` "
                                "(it holds config.yaml, model.safetensors and model.yaml)")
    return config, yaml.safe_load(config.read_text()) or {}


def run_objective(config: Path, cfg: dict[str, Any], model: Any) -> Any:
    """The run's objective (``model.objective`` of its config, autoregressive by default), bound to the
    model's token space."""
    from mmgrow.protocols import Objective

    objective = instantiate((cfg.get("model") or {}).get("objective"), f"{config.name}: model.objective", Objective)
    if objective is None:
        from mmgrow.objectives.autoregressive import AutoregressiveObjective

        objective = AutoregressiveObjective()
    bind = getattr(objective, "bind", None)
    if callable(bind):
        bind(model.token_space)
    return objective


def load_run_data(run: Path, num_val: int | None = None) -> Any:
    """The data module of a run directory's recipe, for evaluation (one training sample; ``num_val``:
    evaluation split size, default the run's own)."""
    from mmgrow.data.datamodule import MMDataModule

    config, cfg = read_run_config(run)
    data_cfg = {k: instantiate(v, f"{config.name}: data.{k}") for k, v in (cfg.get("data") or {}).items()}
    data_cfg.update(num_train=1, num_val=max(1, int(num_val or data_cfg.get("num_val") or 1)))
    return MMDataModule(**data_cfg)


def load_run(run: Path, num_val: int | None = None) -> tuple[Any, Any, Any]:
    """``(model, objective, data module)`` of a run directory (``num_val`` as :func:`load_run_data`)."""
    from mmgrow.training.export import load_model

    config, cfg = read_run_config(run)
    dm = load_run_data(run, num_val)
    model = load_model(run)
    model.eval()
    return model, run_objective(config, cfg, model), dm


def generate_main(argv: list[str]) -> int:
    """Bad input raises (reported in one line by :func:`mmgrow.cli_errors.run_command`)."""
    args = build_parser().parse_args(argv)
    check_arguments(args)
    written = run_generate(args)
    print("\n".join(str(p) for p in written))
    return 0


def run_generate(args: argparse.Namespace) -> list[Path]:
    import torch

    from mmgrow.protocols import Sample
    from mmgrow.rundir import atomic_write_bytes
    from mmgrow.training.generation import SamplerSettings, sample_discrete, write_video_files
    from mmgrow.training.samples import generate_video

    run = Path(args.checkpoint)
    model, objective, dm = load_run(run)
    out = Path(args.out) if args.out else run / "generated"
    settings = SamplerSettings(steps=args.steps, solver=args.solver, guidance=args.guidance,
                               temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    video_tasks = [t for t in dm.tasks if "video" in t.target_modalities]
    if not video_tasks or "video" not in dm.codecs:
        raise ValueError(f"the run's tasks {[t.name for t in dm.tasks]} generate no video")
    task, codec = video_tasks[0], dm.codecs["video"]
    example = dm.train_set[0]
    frames = args.frames if args.frames is not None else int(example.media["video"].shape[0])
    requests: list[tuple[str, Sample]] = []
    if args.storyboard:
        segment_frames = args.frames if args.frames is not None else int(example.meta.get("segment_frames", frames))
        requests.append(("storyboard", storyboard_request(Path(args.storyboard), example, segment_frames,
                                                          args.max_prompt_chars)))
    else:
        for prompt in args.prompt:
            shape = (frames, *example.media["video"].shape[1:])
            requests.append((prompt, Sample(media={"video": torch.zeros(shape, dtype=torch.uint8)}, text=prompt)))
    records, written = [], []
    for i, (name, sample) in enumerate(requests):
        if codec.kind == "continuous":
            video = generate_video(model, objective, dm.builder, task, sample, "video", dm.condition_encoder, settings)
        else:
            if args.storyboard:
                raise ValueError("storyboards need a run with a continuous video codec (a DiT on latents)")
            segments = task.segments(sample)
            prompt = segments[: next(j for j, s in enumerate(segments) if s.role == "target")]
            constraint = codec.generation_constraint(frames) if hasattr(codec, "generation_constraint") else None
            video = sample_discrete(model, objective, dm.builder, prompt, "video",
                                    codec.num_tokens(frames) - len(codec.generation_prefix()), constraint=constraint,
                                    condition_text=task.condition_text(sample, segments),
                                    condition_encoder=dm.condition_encoder, settings=settings)
        files = write_video_files(video, out / f"{i:02d}_{_slug(name if name != 'storyboard' else sample.text)}",
                                  fps=args.fps)
        written += files
        records.append({"prompt": sample.text, "frames": int(video.shape[0]), "files": [f.name for f in files]})
    summary = {"checkpoint": str(run), "settings": vars(settings), "samples": records}
    atomic_write_bytes(out / "generate.json", json.dumps(summary, indent=2).encode())
    return written + [out / "generate.json"]


def storyboard_request(path: Path, example: Any, segment_frames: int, max_chars: int = MAX_PROMPT_CHARS) -> Any:
    """A storyboard file -> a placeholder :class:`~mmgrow.protocols.Sample` (black frames, each scene's
    ``segments`` of ``segment_frames`` frames) that the ``storyboard_to_video`` task segments."""
    import torch

    from mmgrow.checks import read_utf8
    from mmgrow.data.synthetic.storyboard import parse_storyboard
    from mmgrow.protocols import Sample

    if not path.exists():
        raise FileNotFoundError(f"storyboard file not found: {path}")
    try:
        scenes = parse_storyboard(json.loads(read_utf8(path, f"storyboard {path}")))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    for i, scene in enumerate(scenes):
        check_prompt_length(f"storyboard {path} scene {i} text", scene.text, max_chars)
    frames = sum(scene.segments for scene in scenes) * segment_frames
    video = torch.zeros(frames, *example.media["video"].shape[1:], dtype=torch.uint8)
    return Sample(media={"video": video}, text=". ".join(scene.text for scene in scenes),
                  meta={"scenes": [scene.to_dict() for scene in scenes], "segment_frames": segment_frames})
