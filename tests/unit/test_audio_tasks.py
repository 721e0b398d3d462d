"""Audio tasks and text_lm: tones questions per pattern, the caption grammar, golden prompt / target
strings on fixed tones samples, the documented SHA-256 question choice, scores, named errors, and
audio_caption through SequenceBuilder with the spectrogram codec (latents at the audio positions)."""

import collections
import hashlib
import itertools
import json

import pytest
import torch

from mmgrow import registry
from mmgrow.data.audio_tasks import AudioCaption, AudioQA
from mmgrow.data.sequence import SequenceBuilder
from mmgrow.data.synthetic.tones import (
    BEEP_COUNTS,
    NUMBER_WORDS,
    PATTERNS,
    PITCHES,
    WAVEFORMS,
    ToneDataset,
    caption,
    parse_caption,
    questions,
)
from mmgrow.data.tasks import TextLM
from mmgrow.protocols import Sample, Segment
from mmgrow.testing.conformance import run_checks
from mmgrow.tokenizers.spectrogram import SpectrogramCodec
from mmgrow.tokenizers.text import ByteTokenizer


def fixed(i: int) -> Sample:
    """Fixed tones samples: 0 "a high triangle tone falling", 3 "a high sawtooth tone, two beeps",
    7 "a high sawtooth tone held steady", 8 "a mid square tone, three beeps", 6 "a low sawtooth tone rising"."""
    return ToneDataset(num_samples=12, seconds=0.1, seed=0)[i]


@pytest.mark.parametrize("meta, expected", [
    ({"pitch": "low", "waveform": "sine", "pattern": "rising", "beeps": 0},
     [("pitch", "what pitch is the tone?", "low"), ("waveform", "what waveform is the tone?", "sine"),
      ("pattern", "what does the tone do?", "rising")]),
    ({"pitch": "high", "waveform": "sawtooth", "pattern": "falling", "beeps": 0},
     [("pitch", "what pitch is the tone?", "high"), ("waveform", "what waveform is the tone?", "sawtooth"),
      ("pattern", "what does the tone do?", "falling")]),
    ({"pitch": "mid", "waveform": "triangle", "pattern": "steady", "beeps": 0},
     [("pitch", "what pitch is the tone?", "mid"), ("waveform", "what waveform is the tone?", "triangle"),
      ("pattern", "what does the tone do?", "steady")]),
    ({"pitch": "mid", "waveform": "square", "pattern": "beeps", "beeps": 3},
     [("pitch", "what pitch is the tone?", "mid"), ("waveform", "what waveform is the tone?", "square"),
      ("pattern", "what does the tone do?", "beeps"), ("beeps", "how many beeps?", "three")]),
    ({"pitch": "low", "waveform": "sine", "pattern": "beeps", "beeps": 2},
     [("pitch", "what pitch is the tone?", "low"), ("waveform", "what waveform is the tone?", "sine"),
      ("pattern", "what does the tone do?", "beeps"), ("beeps", "how many beeps?", "two")]),
])
def test_questions_of_every_pattern(meta, expected):
    assert questions(meta) == expected


def test_samples_carry_their_questions_as_json():
    ds = ToneDataset(num_samples=40, seconds=0.05, seed=1)
    patterns = set()
    for i in range(len(ds)):
        meta = ds[i].meta
        patterns.add(meta["pattern"])
        assert meta["questions"] == [{"kind": k, "question": q, "answer": a} for k, q, a in questions(meta)]
        assert json.loads(json.dumps(meta["questions"])) == meta["questions"]
        assert len(meta["questions"]) == (4 if meta["pattern"] == "beeps" else 3)
    assert patterns == set(PATTERNS)


def test_questions_need_a_tones_meta():
    with pytest.raises(KeyError, match=r"meta lacks \['waveform'\]"):
        questions({"pitch": "low", "pattern": "steady"})
    with pytest.raises(ValueError, match=r"a beeps tone needs meta 'beeps' in \[2, 3\], got 0"):
        questions({"pitch": "low", "waveform": "sine", "pattern": "beeps", "beeps": 0})


def test_parse_caption_inverts_every_caption_and_reads_slots_independently():
    for p, w, pat in itertools.product(PITCHES, WAVEFORMS, PATTERNS):
        for b in (BEEP_COUNTS if pat == "beeps" else (0,)):
            assert parse_caption(caption(p, w, pat, b)) == {"pitch": p, "waveform": w, "pattern": pat}
    assert parse_caption(" a loud sine tone rising ") == {"pitch": None, "waveform": "sine", "pattern": "rising"}
    assert parse_caption("a low sine tone, four beeps") == {"pitch": "low", "waveform": "sine", "pattern": None}
    assert parse_caption("a low") == {"pitch": "low", "waveform": None, "pattern": None}
    assert parse_caption("") == {"pitch": None, "waveform": None, "pattern": None}
    assert NUMBER_WORDS == {2: "two", 3: "three"}


@pytest.mark.parametrize("index, target", [(0, "a high triangle tone falling"), (3, "a high sawtooth tone, two beeps"),
                                           (7, "a high sawtooth tone held steady"), (6, "a low sawtooth tone rising")])
def test_audio_caption_golden_segments(index, target):
    sample = fixed(index)
    segs = AudioCaption().segments(sample)
    assert [(s.modality, s.role) for s in segs] == [("audio", "input"), ("text", "input"), ("text", "target")]
    assert segs[0].raw is sample.media["audio"]
    assert segs[1].raw == "what does the audio describe?" == AudioCaption.prompt_template
    assert segs[2].raw == target


@pytest.mark.parametrize("index, kind, question, answer", [
    (8, "pitch", "what pitch is the tone?", "mid"),
    (8, "waveform", "what waveform is the tone?", "square"),
    (8, "pattern", "what does the tone do?", "beeps"),
    (8, "beeps", "how many beeps?", "three"),
    (3, "beeps", "how many beeps?", "two"),
    (0, "pattern", "what does the tone do?", "falling"),
    (7, "pattern", "what does the tone do?", "steady"),
    (6, "pattern", "what does the tone do?", "rising"),
])
def test_audio_qa_golden_segments_per_kind(index, kind, question, answer):
    segs = AudioQA(kinds=[kind]).segments(fixed(index))
    assert [(s.modality, s.role) for s in segs] == [("audio", "input"), ("text", "input"), ("text", "target")]
    assert (segs[1].raw, segs[2].raw) == (question, answer)
    assert AudioQA.prompt_template == "{question}"


def test_audio_qa_question_is_the_documented_sha256_choice_and_kinds_share():
    ds = ToneDataset(num_samples=160, seconds=0.02, seed=4)
    task, counts = AudioQA(), collections.Counter()
    for i in range(len(ds)):
        s = ds[i]
        h = hashlib.sha256(s.text.encode())
        for key in sorted(s.meta):
            h.update(f"\n{key}={s.meta[key]}".encode())
        h.update(s.media["audio"].numpy().tobytes())
        entry = s.meta["questions"][int.from_bytes(h.digest()[:8], "big") % len(s.meta["questions"])]
        kind, question, answer = task.question_answer(s)
        assert (kind, question, answer) == (entry["kind"], entry["question"], entry["answer"])
        assert task.question_answer(ToneDataset(num_samples=160, seconds=0.02, seed=4)[i]) == (kind, question, answer)
        counts[kind] += 1
    # pitch / waveform / pattern: ~ (1/3 of non-beeps + 1/4 of beeps clips) each; beeps ~ 1/4 of beeps clips
    assert set(counts) == {"pitch", "waveform", "pattern", "beeps"}
    assert all(30 <= counts[k] <= 70 for k in ("pitch", "waveform", "pattern")), counts
    assert 3 <= counts["beeps"] <= 20, counts


def test_audio_caption_scores():
    task, sample = AudioCaption(), fixed(3)  # a high sawtooth tone, two beeps
    target = task.segments(sample)[-1]
    assert task.score(" a high sawtooth tone, two beeps\n", sample, target) == {"accuracy": 1.0, "attributes": 1.0}
    assert task.score("a high sawtooth tone, three beeps", sample, target) == {"accuracy": 0.0, "attributes": 1.0}
    assert task.score("a low sawtooth tone, two beeps", sample, target) == {"accuracy": 0.0, "attributes": 2 / 3}
    assert task.score("a low sine tone rising", sample, target) == {"accuracy": 0.0, "attributes": 0.0}
    assert task.score("", sample, target) == {"accuracy": 0.0, "attributes": 0.0}
    # ground truth from the meta, not the target text ...
    relabelled = Sample(media=sample.media, text=sample.text, meta=dict(sample.meta, pitch="low"))
    assert task.score("a high sawtooth tone, two beeps", relabelled, target)["attributes"] == pytest.approx(2 / 3)
    # ... from the target caption without one, and only accuracy when neither gives the attributes
    bare = Sample(media=sample.media, text="a mid sine tone rising", meta={})
    assert task.score("a mid square tone rising", bare, task.segments(bare)[-1]) == {"accuracy": 0.0,
                                                                                     "attributes": 2 / 3}
    free = Sample(media=sample.media, text="a dog barks", meta={})
    assert task.score("a dog barks", free, task.segments(free)[-1]) == {"accuracy": 1.0}


def test_audio_qa_scores_by_exact_match():
    task, sample = AudioQA(kinds=["beeps"]), fixed(8)
    target = task.segments(sample)[-1]
    assert task.score("three ", sample, target) == {"accuracy": 1.0}
    assert task.score("3", sample, target) == {"accuracy": 0.0}


def test_named_errors():
    sample = fixed(7)  # held steady: no beeps question
    no_audio = Sample(media={"video": torch.zeros(2, 4, 4, 3, dtype=torch.uint8)}, text=sample.text, meta=sample.meta)
    for task in (AudioCaption(), AudioQA()):
        with pytest.raises(KeyError, match=r"expected an audio sample \(media 'audio' float32 \[N\]\); got media "
                                           r"\['video'\]"):
            task.segments(no_audio)
        with pytest.raises(KeyError, match=r"got shape \(2, 800\)"):
            task.segments(Sample(media={"audio": torch.zeros(2, 800)}, text=sample.text, meta=sample.meta))
        with pytest.raises(TypeError, match="expected an mmgrow.protocols.Sample"):
            task.segments({"audio": sample.media["audio"]})
    with pytest.raises(KeyError, match="has no meta 'questions'"):
        AudioQA().segments(Sample(media=sample.media, text=sample.text, meta={"pitch": "high"}))
    with pytest.raises(ValueError, match="dict of str kind, question and answer; got 'what\\?'"):
        AudioQA().segments(Sample(media=sample.media, text=sample.text, meta={"questions": ["what?"]}))
    with pytest.raises(ValueError, match=r"kinds \['pitch', 'waveform', 'pattern'\] but the task asks only \['beeps'\]"):
        AudioQA(kinds=["beeps"]).segments(sample)
    with pytest.raises(ValueError, match="unknown: \\['loudness'\\]"):
        AudioQA(kinds=["loudness"])
    with pytest.raises(ValueError, match="caption is empty"):
        AudioCaption().segments(Sample(media=sample.media, text=" ", meta={}))


def test_text_lm():
    segs = TextLM().segments(Sample(media={}, text="hello world", meta={}))
    assert segs == [Segment("text", "hello world", "target")]
    assert (TextLM.name, tuple(TextLM.modalities), tuple(TextLM.target_modalities)) == ("text_lm", ("text",), ("text",))
    assert TextLM.prompt_template == "" and TextLM.scored is False
    for bad in ("", "  \n"):
        with pytest.raises(ValueError, match="text_lm: the sample's text is empty"):
            TextLM().segments(Sample(media={}, text=bad, meta={}))


@pytest.mark.parametrize("name, cls", [("audio_caption", AudioCaption), ("audio_qa", AudioQA), ("text_lm", TextLM)])
def test_registered_tasks(name, cls):
    assert registry.load_plugin("tasks", name) is cls
    results = run_checks("tasks", cls)
    assert results and all(r.passed for r in results), results
    assert cls.scored is (name != "text_lm")


def test_sequence_builder_puts_spectrogram_latents_at_the_audio_positions():
    codec, text = SpectrogramCodec(), ByteTokenizer()
    builder = SequenceBuilder({"audio": codec, "text": text})
    sample = fixed(0)
    seq, spans = builder.build_with_spans(AudioCaption().segments(sample))
    frames = codec.num_frames(sample.media["audio"].shape[0])
    assert spans[0] == slice(0, frames)
    assert seq.latents.shape == (len(seq), 32)
    assert torch.equal(seq.latents[spans[0]], codec.encode(sample.media["audio"]))
    assert not seq.latents[frames:].any()
    audio_slot = builder.token_space.to_global(torch.zeros(1, dtype=torch.long), "audio")
    assert bool((seq.input_ids[spans[0]] == audio_slot).all())
    assert not bool((seq.input_ids[frames:] == audio_slot).any())
    offset = builder.token_space.offset("text")
    assert text.decode(seq.input_ids[spans[1]] - offset) == "what does the audio describe?"
    assert text.decode(seq.input_ids[spans[2]] - offset) == "a high triangle tone falling"
    assert seq.loss_mask.tolist() == [0.0] * spans[2].start + [1.0] * (len(seq) - spans[2].start)


def test_data_module_batches_audio_tasks_with_latents():
    from mmgrow.data.datamodule import MMDataModule

    dm = MMDataModule(tasks=["audio_caption", "audio_qa", "text_lm"], codecs={"text": "bytes", "audio": "spectrogram"},
                      dataset="tones", dataset_args={"seconds": 0.1}, num_train=6, num_val=3, batch_size=6)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    audio = batch.modality_ids == dm.builder.token_space.index("audio")
    frames = SpectrogramCodec().num_frames(800)
    # every example of audio_caption / audio_qa opens with its clip's frames; text_lm has none
    per_row = audio.sum(1).tolist()
    assert set(per_row) <= {0, frames} and frames in per_row, per_row
    assert batch.latents.shape == (*batch.input_ids.shape, 32)
    assert bool((batch.latents[~audio] == 0).all()) and bool((batch.latents[audio] != 0).any())
    assert not bool((batch.loss_mask[audio] != 0).any()) and bool((batch.loss_mask[~audio] != 0).any())
