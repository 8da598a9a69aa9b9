"""The two-level corpus blend: proportions, file shares, determinism, caching, sample contents, splits and
re-weighting without repeats.  Each file's tokens lie in its own id range, so a token names its file."""

import time

import numpy as np
import pytest
import torch

from megatron_ext.data import blend as blend_mod
from megatron_ext.data.blend import BlendSpec, CorpusBlend, cache_key, split_range
from megatron_ext.data.indexed import IndexedDatasetWriter

SEQ = 32
VOCAB = 1000
# (weight, corpus, documents): web's files differ in size and weight per token.
LAYOUT = [(0.10, "web", 200), (0.25, "web", 400), (0.15, "web", 150), (0.30, "code", 300), (0.20, "books", 250)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(0)
    files, docs = [], {}
    for i, (weight, corpus, n) in enumerate(LAYOUT):
        prefix = str(root / f"{corpus}_{i}")
        docs[prefix] = [rng.integers(i * 100, i * 100 + 100, size=int(rng.integers(1, 120))) for _ in range(n)]
        with IndexedDatasetWriter(prefix, VOCAB) as writer:
            for doc in docs[prefix]:
                writer.add_document(doc)
            writer.finalize()
        files.append((weight, prefix, corpus))
    return root, tuple(files), docs


@pytest.fixture(autouse=True)
def small_epochs(monkeypatch):
    """Tiny test corpora would otherwise make 2**18-document epochs of hundreds of passes."""
    monkeypatch.setattr(blend_mod, "MIN_EPOCH_DOCS", 2000)


def _spec(files, **kw) -> BlendSpec:
    return BlendSpec(files, seq_length=kw.pop("seq_length", SEQ), seed=kw.pop("seed", 7), **kw)


def test_corpus_proportions_within_one_percent(data, tmp_path):
    _, files, _ = data
    ds = CorpusBlend(_spec(files), 30_000, tmp_path)
    assert ds.weights == pytest.approx({"web": 0.5, "code": 0.3, "books": 0.2})
    cid = np.load(ds.cache_path / "blend_corpus.npy")
    for start in (0, 7_777, 20_000):  # any window of 10,000 consecutive samples
        window = np.bincount(cid[start : start + 10_000], minlength=3) / 10_000
        for j, corpus in enumerate(ds.corpora):
            assert abs(window[j] - ds.weights[corpus]) < 0.01
    assert [ds.corpus_of(i) for i in range(5)] == [ds.corpora[c] for c in cid[:5]]


def test_file_shares_follow_file_weights(data, tmp_path):
    _, files, _ = data
    ds = CorpusBlend(_spec(files), 6_000, tmp_path)
    web = [i for i in range(len(ds)) if ds.corpus_of(i) == "web"]
    tokens = np.concatenate([ds.sample_tokens(i)[:-1] for i in web])
    shares = np.bincount(tokens // 100, minlength=3)[:3] / len(tokens)
    np.testing.assert_allclose(shares, np.array([0.10, 0.25, 0.15]) / 0.5, atol=0.02)


def test_deterministic_and_seed_dependent(data, tmp_path):
    _, files, _ = data
    a = CorpusBlend(_spec(files), 2_000, tmp_path / "a")
    b = CorpusBlend(_spec(files), 2_000, tmp_path / "b")
    c = CorpusBlend(_spec(files, seed=8), 2_000, tmp_path / "c")
    for name in ("blend_corpus.npy", "blend_draw.npy", "c0_pool.npy", "c1_pos.npy", "c2_off.npy"):
        np.testing.assert_array_equal(np.load(a.cache_path / name), np.load(b.cache_path / name))
    same = [np.array_equal(a.sample_tokens(i), b.sample_tokens(i)) for i in range(0, 2_000, 97)]
    differ = [np.array_equal(a.sample_tokens(i), c.sample_tokens(i)) for i in range(0, 2_000, 97)]
    assert all(same) and not any(differ)


def test_cache_reused_and_keyed_by_weights(data, tmp_path):
    _, files, _ = data
    first = CorpusBlend(_spec(files), 5_000, tmp_path)
    t0 = time.perf_counter()
    second = CorpusBlend(_spec(files), 5_000, tmp_path)
    warm = time.perf_counter() - t0
    assert first.built and not second.built and second.cache_path == first.cache_path and warm < 0.5
    assert [p.name for p in tmp_path.iterdir()] == [first.cache_path.name]  # no temporaries left behind
    reweighted = ((0.5,) + files[0][1:],) + files[1:]
    keys = {cache_key(_spec(f), n) for f, n in ((files, 5_000), (reweighted, 5_000), (files, 5_001))}
    keys |= {cache_key(_spec(files, seed=1), 5_000), cache_key(_spec(files, split="90,10,0"), 5_000)}
    assert len(keys) == 5


def test_samples_match_token_stream(data, tmp_path):
    _, files, docs = data
    ds = CorpusBlend(_spec(files), 3_000, tmp_path)
    for c, corpus in enumerate(ds.corpora):
        info = ds.meta["files"][corpus]
        # Every corpus document by id, rebuilt from the documents the test wrote.
        by_id = []
        for prefix, start, lo, hi in zip(info["prefixes"], info["seq_start"], info["doc_start"], info["doc_start"][1:]):
            by_id += docs[prefix][start : start + hi - lo]
        pool = np.load(ds.cache_path / f"c{c}_pool.npy")
        stream = np.concatenate([by_id[d] for d in pool])
        bounds = np.concatenate([[0], np.cumsum([len(by_id[d]) for d in pool])])
        pos = np.load(ds.cache_path / f"c{c}_pos.npy")
        off = np.load(ds.cache_path / f"c{c}_off.npy")
        starts = bounds[pos] + off
        assert np.all(starts % SEQ == 0) and len(np.unique(starts)) == len(starts)  # packed, none repeated
        members = [i for i in range(len(ds)) if ds.corpus_of(i) == corpus]
        for i in members[:: max(1, len(members) // 6)]:
            k = int(np.load(ds.cache_path / "blend_draw.npy", mmap_mode="r")[i])
            expected = stream[starts[k] : starts[k] + SEQ + 1]
            sample = ds[i]
            torch.testing.assert_close(sample["tokens"], torch.from_numpy(expected[:-1]).long())
            torch.testing.assert_close(sample["labels"], torch.from_numpy(expected[1:]).long())
            torch.testing.assert_close(sample["loss_mask"], torch.ones(SEQ))
            torch.testing.assert_close(sample["position_ids"], torch.arange(SEQ))


def test_same_sample_format_as_megatron_core(data, tmp_path):
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    _, files, _ = data

    class Tok:
        eod, pad, vocab_size, unique_identifiers = 0, -1, VOCAB, {"class": "Tok"}

    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=SEQ,
        blend=([files[0][1]], None),
        split="1,0,0",
        tokenizer=Tok(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    low = IndexedDataset(files[0][1])
    ref = GPTDataset(low, files[0][1], np.arange(len(low)), 10, Split.train, config)[0]
    ours = CorpusBlend(_spec(files), 10, tmp_path)[0]
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and ours[key].shape == ref[key].shape


def test_split_selects_disjoint_document_ranges(data, tmp_path):
    _, files, docs = data
    used = {}
    for index in (0, 1):
        ds = CorpusBlend(_spec(files, split="80,20,0", split_index=index), 3_000, tmp_path)
        used[index] = set()
        for c, corpus in enumerate(ds.corpora):
            info = ds.meta["files"][corpus]
            pool = np.load(ds.cache_path / f"c{c}_pool.npy")
            doc_start = np.asarray(info["doc_start"])
            f = np.searchsorted(doc_start, pool, side="right") - 1
            seq = np.asarray(info["seq_start"])[f] + pool - doc_start[f]
            for fi, prefix in enumerate(info["prefixes"]):
                lo, hi = split_range("80,20,0", index, len(docs[prefix]))
                mine = seq[f == fi]
                assert mine.min() >= lo and mine.max() < hi
                used[index] |= {(prefix, int(s)) for s in np.unique(mine)}
    assert used[0] and used[1] and not used[0] & used[1]
    assert [split_range("969,30,1", i, 1000) for i in range(3)] == [(0, 969), (969, 999), (999, 1000)]


def test_reweighting_continues_without_repeats(data, tmp_path):
    _, files, _ = data
    news = (0.4, files[3][1], "news")  # a new corpus (reusing code's file under another name)
    k_consumed = 1_500
    phase_a = CorpusBlend(_spec(files), 2_000, tmp_path)
    offsets = phase_a.consumed_per_corpus(k_consumed)
    assert offsets == {c: sum(phase_a.corpus_of(i) == c for i in range(k_consumed)) for c in phase_a.corpora}
    # Phase B: books removed, web up-weighted, news added.
    files_b = tuple((w * 3, p, c) for w, p, c in files if c == "web") + (files[3], news)
    phase_b = CorpusBlend(_spec(files_b), 2_000, tmp_path, start_offsets=offsets)
    assert phase_b.corpora == ["code", "news", "web"]
    seen_a = [phase_a.sample_of(i) for i in range(k_consumed)]
    seen_b = [phase_b.sample_of(i) for i in range(len(phase_b))]
    assert len(set(seen_a + seen_b)) == len(seen_a) + len(seen_b)
    for corpus in phase_b.corpora:
        numbers = [k for c, k in seen_b if c == corpus]
        assert numbers == list(range(offsets.get(corpus, 0), offsets.get(corpus, 0) + len(numbers)))
    after = phase_b.consumed_per_corpus(len(phase_b))
    assert after["books"] == offsets["books"] and after["news"] == sum(c == "news" for c, _ in seen_b)
    # Corpus samples do not depend on the blend: B's web sample k is the web sample k of a longer A-like run.
    long_a = CorpusBlend(_spec(files), 8_000, tmp_path)
    where = {long_a.sample_of(i): i for i in range(len(long_a))}
    checked = 0
    for i, key in enumerate(seen_b):
        if key[0] == "web" and key in where and checked < 20:
            np.testing.assert_array_equal(phase_b.sample_tokens(i), long_a.sample_tokens(where[key]))
            checked += 1
    assert checked == 20


def test_consumed_per_corpus_across_count_blocks(data, tmp_path, monkeypatch):
    _, files, _ = data
    monkeypatch.setattr(blend_mod, "COUNT_BLOCK", 256)
    ds = CorpusBlend(_spec(files), 3_000, tmp_path, start_offsets={"web": 5, "gone": 9})
    cid = np.load(ds.cache_path / "blend_corpus.npy")
    for i in (0, 255, 256, 1_000, 2_999, 3_000):
        counts = np.bincount(cid[:i], minlength=3)
        expected = {"gone": 9} | {c: int(n) + (5 if c == "web" else 0) for c, n in zip(ds.corpora, counts)}
        assert ds.consumed_per_corpus(i) == expected


def test_losing_a_build_race_uses_the_winners_cache(data, tmp_path, monkeypatch):
    _, files, _ = data
    real = blend_mod.build_cache

    def racing(spec, num_samples, folder, offsets):
        meta = real(spec, num_samples, folder, offsets)
        real(spec, num_samples, folder.parent / f"blend-{cache_key(spec, num_samples, offsets)}", offsets)
        return meta  # another job published the same cache while this one was building

    monkeypatch.setattr(blend_mod, "build_cache", racing)
    ds = CorpusBlend(_spec(files), 500, tmp_path)
    assert not ds.built and [p.name for p in tmp_path.iterdir()] == [ds.cache_path.name]
    assert len(ds[0]["tokens"]) == SEQ
