"""Mixtures: temperature weights, sampled shares (chi-squared bound), UnIVAL "every" extras, curriculum
switches on the data side, exact resume of the stream (also with a loader worker), legacy `tasks`."""

import math
from collections import Counter

import pytest
import torch

from mmgrow.data.curriculum import CurriculumSchedule
from mmgrow.data.datamodule import MMDataModule
from mmgrow.data.mixture import SourceSpec, expected_shares, main_weights, parse_mixture, parse_sources
from mmgrow.data.mixture_sampler import MixtureSampler


def chi2_quantile(q: float, df: int) -> float:
    """The ``q``-quantile of chi^2 with an even ``df``: survival ``exp(-x/2) sum_{i<df/2} (x/2)^i / i!``,
    solved by bisection (closed form, so the bound is computed, not looked up)."""
    assert df % 2 == 0

    def survival(x):
        return math.exp(-x / 2) * sum((x / 2) ** i / math.factorial(i) for i in range(df // 2))

    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if survival(mid) > 1 - q else (lo, mid)
    return hi


def test_chi2_quantile_helper():
    assert chi2_quantile(0.95, 2) == pytest.approx(-2 * math.log(0.05), rel=1e-9)  # df=2: closed form
    assert chi2_quantile(0.999, 4) == pytest.approx(18.4668, rel=1e-4)  # a standard table value


def sampler(weights, every=None, batch_size=8, sizes=None, curriculum=None, seed=0, **kw):
    names = list(weights) + list(every or {})
    every = {names.index(n): c for n, c in (every or {}).items()}
    schedule = curriculum or CurriculumSchedule(None, batch_size=batch_size)
    stage_weights = [[float(weights.get(n, 0.0)) for n in names] for _ in schedule.stages]
    return MixtureSampler(names, sizes or [50] * len(names), every, stage_weights, schedule, batches_per_epoch=7,
                          seed=seed, **kw)


def stream(s: MixtureSampler, batches: int) -> list[tuple[int, int]]:
    items, position = [], s.position
    for _ in range(batches):
        batch, _, position = s.step(position)
        items += batch
    return items


def test_temperature_weights():
    specs = parse_sources([{"name": n, "task": "text_to_video"} for n in "abc"], "shapes")
    sizes = {"a": 100, "b": 400, "c": 1600}
    for T in (1.0, 2.0, 4.0):
        w = main_weights(specs, sizes, T)
        total = sum(w.values())
        raw = {k: v ** (1 / T) for k, v in sizes.items()}
        for k in sizes:  # p_k = size_k^(1/T) / sum_j size_j^(1/T)
            assert w[k] / total == pytest.approx(raw[k] / sum(raw.values()), rel=1e-12)
    assert main_weights(specs, sizes, None) == {"a": 1.0, "b": 1.0, "c": 1.0}
    # an explicit weight keeps its value; the two free sources share 2 units by sqrt(size): 2*10/30, 2*20/30
    specs[0] = SourceSpec(name="a", dataset="shapes", task="text_to_video", weight=5.0)
    assert main_weights(specs, sizes, 2.0) == pytest.approx({"a": 5.0, "b": 2 * 20 / 60, "c": 2 * 40 / 60})
    assert parse_mixture({"temperature": 2}) == 2.0 and parse_mixture(None) is None
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        parse_mixture({"temperature": 0})
    with pytest.raises(ValueError, match=r"unknown keys \['temp'\]"):
        parse_mixture({"temp": 2})


def test_expected_shares_with_extras():
    shares = expected_shares({"a": 1.0, "b": 3.0}, {"x": 4, "y": 2})
    extra = 1 / 4 + 1 / 2
    assert shares == pytest.approx({"a": 0.25 / (1 + extra), "b": 0.75 / (1 + extra), "x": 0.25 / (1 + extra),
                                    "y": 0.5 / (1 + extra)})
    assert sum(shares.values()) == pytest.approx(1.0)


def test_sampled_shares_match_the_declaration_within_a_chi2_bound():
    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    items = stream(sampler(weights), 500)  # 4000 draws
    counts = Counter(s for s, _ in items)
    n, total = len(items), sum(weights.values())
    expected = [n * w / total for w in weights.values()]
    chi2 = sum((counts[i] - e) ** 2 / e for i, e in enumerate(expected))
    assert chi2 < chi2_quantile(0.999, 2), (counts, expected)  # fails a correct sampler 1 time in 1000
    # and the bound has teeth: the counts of a uniform sampler are far outside it
    uniform = Counter(s for s, _ in stream(sampler({"a": 1.0, "b": 1.0, "c": 1.0}), 500))
    assert sum((uniform[i] - e) ** 2 / e for i, e in enumerate(expected)) > chi2_quantile(0.999, 2)


def test_every_inserts_one_extra_after_every_cnt_main_items():
    s = sampler({"a": 1.0, "b": 1.0}, every={"x": 3, "y": 5}, batch_size=7)
    items = stream(s, 40)
    sources = [src for src, _ in items]
    main = 0
    for i, src in enumerate(sources):
        if src in (0, 1):
            main += 1
            due = [e for e, cnt in ((2, 3), (3, 5)) if main % cnt == 0]
            following = sources[i + 1:i + 1 + len(due)]
            assert following == due[:len(following)], (i, main, due)  # the extras come right after, in order
    K = sum(src in (0, 1) for src in sources)
    for extra, cnt in ((2, 3), (3, 5)):
        assert K // cnt - 1 <= sources.count(extra) <= K // cnt  # the last ones may be pending at the cut


def test_every_source_pass_reads_each_sample_once():
    s = sampler({"a": 1.0}, sizes=[13], batch_size=4)
    indices = [i for _, i in stream(s, 13)]  # 52 items = 4 passes over 13 samples
    passes = [indices[13 * p:13 * (p + 1)] for p in range(4)]
    assert all(sorted(p) == list(range(13)) for p in passes) and passes[0] != passes[1]


def test_ranks_split_the_global_batch():
    shards = [sampler({"a": 1.0, "b": 1.0}, batch_size=3, num_replicas=2, rank=r) for r in (0, 1)]
    whole, _, _ = shards[0].step(shards[0].position)
    keys = [s.key(s.position)[0] for s in shards]
    assert len(whole) == 6 and keys[0].items == tuple(whole[0::2]) and keys[1].items == tuple(whole[1::2])


def small_dm(**kw):
    args = {"num_train": 12, "num_val": 4, "batch_size": 2, "tasks": ["text_to_video", "video_to_text"],
            "dataset_args": {"frames": 2, "size": 16}, "codec_args": {"video": {"grid": 4}}}
    args.update(kw)
    return MMDataModule(**args)


def target_modalities(dm, batch):
    """Per row, the modality name of the loss targets."""
    names = {dm.token_space.index(m): m for m in dm.codecs}
    return [names[int(batch.modality_ids[r][batch.loss_mask[r] > 0][0])] for r in range(batch.input_ids.shape[0])]


def test_curriculum_switches_batch_size_length_and_mixture_at_the_declared_step():
    stages = [{"until": {"step": 2}, "batch_size": 2, "length": 200, "mixture": {"text_to_video": 1, "video_to_text": 0}},
              {"batch_size": 3, "length": 256, "mixture": {"text_to_video": 0, "video_to_text": 1}}]
    dm = small_dm(curriculum=stages)
    sampler = dm.train_sampler()
    sampler.accumulate = 2  # step = batch // 2: the switch is at batch 4
    batches = []
    for _ in range(2):  # two loader epochs (6 batches each) are one stream
        for batch in dm.train_dataloader():
            batches.append(batch)
            dm.advance_train_position(sampler)
    assert [tuple(b.input_ids.shape) for b in batches[:5]] == [(2, 200)] * 4 + [(3, 256)]
    assert all(tuple(b.input_ids.shape) == (3, 256) for b in batches[4:])
    assert all(target_modalities(dm, b) == ["video"] * 2 for b in batches[:4])
    assert all(target_modalities(dm, b) == ["text"] * 3 for b in batches[4:])
    assert dm.eval_length == 256 and next(iter(dm.val_dataloader())).input_ids.shape == (2, 256)
    with pytest.raises(ValueError, match=r"curriculum stage 1: mixture names \['t2v'\], which are not main sources"):
        small_dm(curriculum=[{"until": {"step": 2}}, {"mixture": {"t2v": 1}}])


def test_a_stage_turns_an_extra_on_or_changes_its_rate_at_the_declared_step():
    # UnIVAL: stage 1 image-text only, stage 2 adds video at cnt 1. Here the extra `cap` (video_to_text) is off
    # for steps [0, 3), then follows every main item; the sampler's counts obey floor(K / cnt) per stage.
    sources = [{"name": "t2v", "task": "text_to_video"}, {"name": "cap", "task": "video_to_text", "every": 4}]
    stages = [{"until": {"step": 3}, "every": {"cap": 0}}, {"every": {"cap": 1}}]
    dm = small_dm(sources=sources, curriculum=stages, batch_size=4)
    assert dm.stage_every() == [{1: 0}, {1: 1}]
    sampler = dm.train_sampler()
    position, per_batch = sampler.position, []
    for _ in range(8):
        items, stage, position = sampler.step(position)
        per_batch.append((stage, [src for src, _ in items]))
    assert all(sources == [0] * 4 for stage, sources in per_batch if stage == 0) and per_batch[2][0] == 0
    later = [src for stage, sources in per_batch if stage == 1 for src in sources]
    assert per_batch[3][0] == 1 and later == [0, 1] * (len(later) // 2)  # one extra right after each main item
    with pytest.raises(ValueError, match=r"curriculum stage 1: every names \['t2v'\], which are not extra sources"):
        small_dm(sources=sources, curriculum=[{"until": {"step": 2}}, {"every": {"t2v": 2}}])
    with pytest.raises(ValueError, match=r"every\['cap'\] must be an int >= 0"):
        small_dm(sources=sources, curriculum=[{"every": {"cap": -1}}])


def run_stream(dm, batches, stop=None, num_workers=0):
    """Batches a training loop takes (advancing the loop-side position like on_before_batch_transfer); with
    ``stop`` also the data module's state after ``stop`` batches."""
    out, state, sampler = [], None, dm.train_sampler()
    while len(out) < batches:
        for batch in dm.train_dataloader():
            out.append(batch)
            dm.advance_train_position(sampler)
            if len(out) == stop:
                state = {"sampler": dm.state_dict()["sampler"]}
            if len(out) == batches:
                break
    return out, state


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.loss_mask, y.loss_mask)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_mid_stage_gives_the_identical_batch_sequence(num_workers):
    stages = [{"until": {"step": 3}, "batch_size": 2}, {"until": {"step": 7}, "batch_size": 3,
                                                       "mixture": {"text_to_video": 3}}, {"batch_size": 1}]
    kw = {"curriculum": stages, "sources": [{"task": "text_to_video"}, {"task": "video_to_text", "weight": 2},
                                            {"name": "extra", "task": "text_to_video", "every": 3}]}
    straight, _ = run_stream(small_dm(**kw), 12)
    # stop after batch 5: in the middle of stage 1, with a loader worker running ahead
    first, state = run_stream(small_dm(num_workers=num_workers, **kw), 8, stop=5)
    assert same_batches(first, straight[:8])
    resumed = small_dm(num_workers=num_workers, **kw)
    resumed.load_state_dict(state)
    second, _ = run_stream(resumed, 7)
    assert same_batches(straight[:5] + second, straight)
    other = small_dm(seed=1, **kw)
    with pytest.raises(ValueError, match="the checkpoint's data position has seed=0, this run has seed=1"):
        other.load_state_dict(state)


def test_tasks_list_is_one_source_per_task_over_one_dataset():
    dm = small_dm(tasks=["text_to_video", "video_to_text", "text_to_video"])
    assert [s.name for s in dm.sources] == ["text_to_video", "video_to_text"]
    assert dm.weights == {"text_to_video": 2.0, "video_to_text": 1.0}  # named twice: twice the weight
    assert dm.source_sets["train"][0] is dm.source_sets["train"][1] is dm.train_set
    with pytest.raises(ValueError, match=r"names \['a'\] are used twice"):
        small_dm(sources=[{"name": "a", "task": "text_to_video"}, {"name": "a", "task": "video_to_text"}])
    with pytest.raises(ValueError, match="give either weight"):
        small_dm(sources=[{"task": "text_to_video", "weight": 1, "every": 2}])
    with pytest.raises(ValueError, match="at least one main source"):
        small_dm(sources=[{"task": "text_to_video", "every": 2}])


def test_eval_batches_read_every_source_and_shard_whole_batches_over_ranks():
    from mmgrow.data.mixture_sampler import EvalSampler

    dm = small_dm(sources=[{"task": "text_to_video"}, {"task": "video_to_text"},
                           {"name": "qa", "task": "video_to_text", "every": 2, "num_val": 3}], num_val=4)
    keys = dm.eval_keys("val")
    items = [item for key in keys for item in key.items]
    # the two sources sharing the 4-sample dataset take it round-robin, then the 3-sample extra in order
    assert items == [(0, 0), (1, 1), (0, 2), (1, 3), (2, 0), (2, 1), (2, 2)]
    assert [len(k.items) for k in keys] == [2, 2, 2, 1] and all(k.stage is None for k in keys)
    shards = [list(EvalSampler(keys, 3, r)) for r in range(3)]  # 4 batches padded to 6 by wrapping around
    assert shards == [[keys[0], keys[3]], [keys[1], keys[0]], [keys[2], keys[1]]]


def test_skipped_files_of_every_distinct_dataset_once():
    dm = small_dm(sources=[{"task": "text_to_video"}, {"task": "video_to_text"},
                           {"name": "b", "task": "video_to_text", "num_train": 5}])
    assert dm.skipped_files() == []
    dm.source_sets["train"][0].skipped = [{"path": "a.mp4", "reason": "zero-length file"}]  # shared by 2 sources
    dm.source_sets["train"][2].skipped = [{"path": "b.wav", "reason": "truncated"}]
    dm.source_sets["val"][2].skipped = [{"path": "c.png", "reason": "unsupported"}]
    assert [f["path"] for f in dm.skipped_files()] == ["a.mp4", "b.wav", "c.png"]


def test_task_args_configure_a_source_task():
    dm = small_dm(sources=[{"name": "t2v", "task": "text_to_video"},
                           {"name": "colour", "task": "video_qa", "task_args": {"kinds": ["colour"]}}])
    assert dm.tasks[1].kinds == ("colour",)
    assert {dm.tasks[1].kind_of(dm.source_sets["val"][1][i]) for i in range(4)} == {"colour"}
    with pytest.raises(ValueError, match=r"data.sources\[0\]: task_args must be a mapping"):
        small_dm(sources=[{"task": "video_qa", "task_args": ["colour"]}])
    with pytest.raises(ValueError, match="kinds"):
        small_dm(sources=[{"task": "video_qa", "task_args": {"kinds": ["smell"]}}])
