"""Synthetic tones: an embedded, seeded text-audio dataset (nothing downloaded).

Each sample is a short mono waveform ``float32 [N]`` in ``[-1, 1]`` (``N = round(seconds * sample_rate)``)
of one tone, described by three attributes, with a caption naming them::

    pitch     low (220 Hz), mid (440 Hz), high (880 Hz) centre frequency, detuned by up to +-2 semitones
    waveform  sine, square, triangle, sawtooth
    pattern   steady | rising | falling (a glide over one octave, geometric, centred on the pitch)
              | beeps (two or three equal beeps with silence between them)

    "a low sine tone rising", "a mid triangle tone held steady", "a high square tone, two beeps"

Every sample also carries questions about itself (``meta["questions"]``, :func:`questions`), one per
attribute, answered in one word (the beeps question only for the beeps pattern)::

    pitch     "what pitch is the tone?"     low | mid | high
    waveform  "what waveform is the tone?"  sine | square | triangle | sawtooth
    pattern   "what does the tone do?"      rising | falling | steady | beeps
    beeps     "how many beeps?"             two | three

The frequency track ``f(t)`` is integrated into a phase ``phi(t) = 2 pi sum_{s <= t} f(s) / sr``
(so glides have no discontinuities), the waveform is a function of the phase fraction
``u = phi / 2 pi mod 1``, and a 5 ms linear fade at every onset and offset avoids clicks. The peak
amplitude is drawn from ``[0.5, 0.9]``.

Held-out combinations (:data:`HELDOUT_COMBOS`) never occur in ``"train"`` / ``"val"`` while each of
their pitches, waveforms and patterns does; ``split="heldout"`` yields only them. Samples are random
access and deterministic per ``(seed, split, index)``. Plain torch (float64 synthesis), no torchaudio.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from mmgrow.data.synthetic.combinations import choose_names, split_combinations
from mmgrow.protocols import Dataset, Sample

PITCHES: dict[str, float] = {"low": 220.0, "mid": 440.0, "high": 880.0}
"""Pitch class -> centre frequency in Hz (before the random detune)."""

WAVEFORMS: tuple[str, ...] = ("sine", "square", "triangle", "sawtooth")
PATTERNS: tuple[str, ...] = ("steady", "rising", "falling", "beeps")
BEEP_COUNTS: tuple[int, ...] = (2, 3)
NUMBER_WORDS = {2: "two", 3: "three"}

HELDOUT_COMBOS: tuple[tuple[str, str, str], ...] = (
    ("low", "square", "rising"),
    ("mid", "sine", "beeps"),
    ("high", "sawtooth", "falling"),
    ("high", "triangle", "steady"),
    ("mid", "square", "falling"),
)
"""(pitch, waveform, pattern) triples that appear only in the ``"heldout"`` split."""

QUESTIONS: dict[str, str] = {
    "pitch": "what pitch is the tone?",
    "waveform": "what waveform is the tone?",
    "pattern": "what does the tone do?",
    "beeps": "how many beeps?",
}
"""Question kind -> question text, in the order :func:`questions` asks them."""

SPLITS = ("train", "val", "heldout")
DETUNE_SEMITONES = 2.0
GLIDE_OCTAVES = 1.0
FADE_SECONDS = 0.005
BEEP_DUTY = 0.6
"""Fraction of each beep's slot that sounds; the rest is silence."""
AMPLITUDE_RANGE = (0.5, 0.9)


def caption(pitch: str, waveform: str, pattern: str, beeps: int = 0) -> str:
    """``"a low sine tone rising"``, ``"a mid triangle tone held steady"``, ``"a high square tone, two beeps"``."""
    if pattern == "beeps":
        return f"a {pitch} {waveform} tone, {NUMBER_WORDS[beeps]} beeps"
    if pattern == "steady":
        return f"a {pitch} {waveform} tone held steady"
    return f"a {pitch} {waveform} tone {pattern}"


def parse_caption(text: str) -> dict[str, str | None]:
    """Read ``{"pitch", "waveform", "pattern"}`` back from a caption slot by slot, so a caption that is
    partly wrong still yields the attributes it states correctly.

    The grammar of :func:`caption` is ``"a <pitch> <waveform> <tail>"``. The stripped text is split on
    single spaces; ``pitch`` is word 2 and ``waveform`` word 3 when they are valid names, and ``pattern``
    is read from the rest (words 4 onwards joined by spaces): ``"tone rising"`` / ``"tone falling"`` ->
    that pattern, ``"tone held steady"`` -> ``"steady"``, ``"tone, two beeps"`` / ``"tone, three beeps"``
    -> ``"beeps"``. A slot holding anything else is None. (The beep count is not an attribute here.)

    ``parse_caption("a high sine tone, two beeps")`` -> ``{"pitch": "high", "waveform": "sine", "pattern": "beeps"}``;
    ``parse_caption("a loud sine tone rising")`` -> ``{"pitch": None, "waveform": "sine", "pattern": "rising"}``.
    """
    words = str(text).strip().split(" ")
    tails = {"tone rising": "rising", "tone falling": "falling", "tone held steady": "steady"}
    tails.update({f"tone, {NUMBER_WORDS[b]} beeps": "beeps" for b in BEEP_COUNTS})
    return {"pitch": words[1] if len(words) > 1 and words[1] in PITCHES else None,
            "waveform": words[2] if len(words) > 2 and words[2] in WAVEFORMS else None,
            "pattern": tails.get(" ".join(words[3:]))}


def questions(meta: dict) -> list[tuple[str, str, str]]:
    """``(kind, question, answer)`` for every :data:`QUESTIONS` kind that applies to a tone with this meta
    (``{"pitch", "waveform", "pattern", "beeps"}``): pitch, waveform and pattern always, in that order, then
    beeps (answered ``"two"`` / ``"three"``) only when the pattern is ``"beeps"``.

    ``questions({"pitch": "low", "waveform": "sine", "pattern": "beeps", "beeps": 2})[-1]``
    -> ``("beeps", "how many beeps?", "two")``.
    """
    missing = [k for k in ("pitch", "waveform", "pattern") if k not in meta]
    if missing:
        raise KeyError(f"tones.questions: meta lacks {missing}; expected a tones meta with pitch, waveform, pattern "
                       f"(and beeps for the beeps pattern), got keys {sorted(meta)}")
    out = [(kind, QUESTIONS[kind], str(meta[kind])) for kind in ("pitch", "waveform", "pattern")]
    if meta["pattern"] == "beeps":
        if meta.get("beeps") not in NUMBER_WORDS:
            raise ValueError(f"tones.questions: a beeps tone needs meta 'beeps' in {sorted(NUMBER_WORDS)}, "
                             f"got {meta.get('beeps')!r}")
        out.append(("beeps", QUESTIONS["beeps"], NUMBER_WORDS[meta["beeps"]]))
    return out


def oscillator(waveform: str, phase_fraction: Tensor) -> Tensor:
    """Waveform value of each phase fraction ``u in [0, 1)``, in ``[-1, 1]``:
    sine ``sin(2 pi u)``, square ``+1`` for ``u < 1/2`` else ``-1``, triangle ``4 |u - 1/2| - 1``,
    sawtooth ``2 u - 1``."""
    u = phase_fraction
    if waveform == "sine":
        return torch.sin(2 * math.pi * u)
    if waveform == "square":
        return torch.where(u < 0.5, 1.0, -1.0).to(u.dtype)
    if waveform == "triangle":
        return 4 * (u - 0.5).abs() - 1
    if waveform == "sawtooth":
        return 2 * u - 1
    raise ValueError(f"unknown waveform {waveform!r}; expected one of {WAVEFORMS}")


def frequency_track(pattern: str, centre: float, num_samples: int) -> Tensor:
    """``float64 [N]`` instantaneous frequency in Hz: constant for steady and beeps, a geometric glide
    from ``centre * 2^(-1/2)`` to ``centre * 2^(1/2)`` (rising) or back (falling)."""
    if pattern in ("steady", "beeps"):
        return torch.full((num_samples,), centre, dtype=torch.float64)
    t = torch.linspace(-0.5, 0.5, num_samples, dtype=torch.float64) * GLIDE_OCTAVES
    return centre * torch.pow(2.0, t if pattern == "rising" else -t)


def envelope(num_samples: int, sample_rate: int, beeps: int = 0) -> Tensor:
    """``float64 [N]`` gain in ``[0, 1]``: one sounding span over the whole item (``beeps == 0``) or
    ``beeps`` equal slots, each sounding for its first :data:`BEEP_DUTY`; every span fades linearly in
    and out over :data:`FADE_SECONDS` (at most a quarter of the span)."""
    gain = torch.zeros(num_samples, dtype=torch.float64)
    spans = [(0, num_samples)] if beeps == 0 else [
        (round(k * num_samples / beeps), round(k * num_samples / beeps + BEEP_DUTY * num_samples / beeps))
        for k in range(beeps)]
    for start, end in spans:
        length = end - start
        if length <= 0:
            continue
        fade = max(1, min(round(FADE_SECONDS * sample_rate), length // 4))
        i = torch.arange(length, dtype=torch.float64)
        # distance (in samples) to the nearer edge of the span, +1 so the edge samples are not silent
        ramp = torch.minimum(i + 1, length - i).clamp(max=fade) / fade
        gain[start:end] = ramp
    return gain


class ToneDataset(Dataset):
    """Random-access dataset of :class:`~mmgrow.protocols.Sample` s.

    ``ds[i].media["audio"]`` is ``float32 [N]`` in ``[-1, 1]``, ``ds[i].text`` the caption and
    ``ds[i].meta`` ``{"pitch", "waveform", "pattern", "beeps", "frequency", "amplitude", "questions"}``
    (``beeps`` is 0 unless the pattern is ``"beeps"``; ``frequency`` is the detuned centre in Hz;
    ``questions`` is :func:`questions` as ``[{"kind", "question", "answer"}, ...]``).

    Args:
        num_samples: length of the dataset.
        seconds: duration of every item; ``N = round(seconds * sample_rate)`` samples.
        sample_rate: samples per second (the highest centre frequency with its glide and detune must
            stay below the Nyquist frequency ``sample_rate / 2``).
        seed: base seed; samples depend on ``(seed, split, index)`` only.
        split: ``"train"`` / ``"val"`` (all combinations except the held-out ones, uniformly) or
            ``"heldout"`` (cycles through the held-out combinations).
        pitches, waveforms, patterns: the names drawn, subsets of :data:`PITCHES`, :data:`WAVEFORMS`,
            :data:`PATTERNS`; None = all. An unknown name is an error listing the valid ones.
        heldout: held-out (pitch, waveform, pattern) triples; default :data:`HELDOUT_COMBOS` restricted
            to the chosen names.
    """

    name: ClassVar[str] = "tones"
    modalities: ClassVar[tuple[str, ...]] = ("audio",)

    def __init__(
        self,
        num_samples: int = 1024,
        seconds: float = 0.5,
        sample_rate: int = 8000,
        seed: int = 0,
        split: str = "train",
        pitches: Sequence[str] | None = None,
        waveforms: Sequence[str] | None = None,
        patterns: Sequence[str] | None = None,
        heldout: Sequence[Sequence[str]] | None = None,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"ToneDataset: num_samples must be an int >= 0, got {num_samples!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
            raise ValueError(f"ToneDataset: sample_rate must be a positive int, got {sample_rate!r}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
            raise ValueError(f"ToneDataset: seconds must be a positive number, got {seconds!r}")
        if split not in SPLITS:
            raise ValueError(f"ToneDataset: unknown split {split!r}; expected one of {SPLITS}")
        self.num_samples, self.seconds, self.sample_rate = num_samples, seconds, sample_rate
        self.seed, self.split = seed, split
        self.skipped: list[dict[str, str]] = []  # a generator never skips anything
        self.length = round(seconds * sample_rate)
        if self.length < 4 * max(BEEP_COUNTS):
            raise ValueError(f"ToneDataset: seconds * sample_rate = {self.length} samples is too short; "
                             f"expected at least {4 * max(BEEP_COUNTS)}")
        self.pitches = choose_names("ToneDataset", "pitches", pitches, tuple(PITCHES))
        self.waveforms = choose_names("ToneDataset", "waveforms", waveforms, WAVEFORMS)
        self.patterns = choose_names("ToneDataset", "patterns", patterns, PATTERNS)
        top = max(PITCHES[p] for p in self.pitches) * 2 ** (DETUNE_SEMITONES / 12 + GLIDE_OCTAVES / 2)
        if top >= sample_rate / 2:
            raise ValueError(f"ToneDataset: the highest tone reaches {top:.0f} Hz, above the Nyquist frequency "
                             f"{sample_rate / 2:.0f} Hz of sample_rate={sample_rate}; use sample_rate > {2 * top:.0f}")

        self.seen, self.heldout = split_combinations(
            "ToneDataset", {"pitches": self.pitches, "waveforms": self.waveforms, "patterns": self.patterns},
            HELDOUT_COMBOS, heldout)
        if split == "heldout" and not self.heldout:
            raise ValueError("ToneDataset: split='heldout' but no held-out combination uses only the chosen "
                             "pitches, waveforms and patterns; pass heldout=[[pitch, waveform, pattern], ...]")

    def __len__(self) -> int:
        return self.num_samples

    def heldout_prompts(self) -> list[tuple[str, dict[str, str]]]:
        """``(caption, {"pitch", "waveform", "pattern"})`` for each held-out combination (beeps: two)."""
        return [(caption(*c, beeps=BEEP_COUNTS[0]), dict(zip(("pitch", "waveform", "pattern"), c)))
                for c in self.heldout]

    def __getitem__(self, index: int) -> Sample:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"ToneDataset index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        # A str seed is hashed with SHA-512 by `random`, so samples do not depend on PYTHONHASHSEED.
        rng = random.Random(f"tones/{self.seed}/{self.split}/{index}")
        if self.split == "heldout":
            pitch, waveform, pattern = self.heldout[index % len(self.heldout)]
        else:
            pitch, waveform, pattern = rng.choice(self.seen)
        beeps = rng.choice(BEEP_COUNTS) if pattern == "beeps" else 0
        centre = PITCHES[pitch] * 2 ** (rng.uniform(-DETUNE_SEMITONES, DETUNE_SEMITONES) / 12)
        amplitude = rng.uniform(*AMPLITUDE_RANGE)
        start_phase = rng.random()
        audio = self.synthesize(waveform, pattern, centre, amplitude, beeps, start_phase)
        meta = {"pitch": pitch, "waveform": waveform, "pattern": pattern, "beeps": beeps,
                "frequency": centre, "amplitude": amplitude}
        # JSON-friendly (a list of plain dicts), so data inspect and run records can write it as is
        meta["questions"] = [{"kind": k, "question": q, "answer": a} for k, q, a in questions(meta)]
        return Sample(media={"audio": audio}, text=caption(pitch, waveform, pattern, beeps), meta=meta)

    def synthesize(self, waveform: str, pattern: str, centre: float, amplitude: float = 0.8, beeps: int = 0,
                   start_phase: float = 0.0) -> Tensor:
        """``float32 [N]``: ``amplitude * envelope(t) * osc(u(t))`` with
        ``u(t) = start_phase + sum_{s <= t} f(s) / sample_rate  (mod 1)``."""
        freq = frequency_track(pattern, centre, self.length)
        phase = (start_phase + torch.cumsum(freq, 0) / self.sample_rate) % 1.0
        wave = amplitude * envelope(self.length, self.sample_rate, beeps) * oscillator(waveform, phase)
        return wave.to(torch.float32)
