"""The batch-at-once corruption gives what ``corruption.corrupt_sample`` gives sample by sample (same draws), and
its generator shortcuts give what numpy gives."""
import dataclasses

import numpy as np
import pytest

from mvptr_ds.data import corruption
from mvptr_ds.data.batch_corruption import Flat, corrupt_batch
from mvptr_ds.data.batching import BatchContext, Collator
from mvptr_ds.data.sample_streams import mix_seeds, raw_outputs, seed_states
from mvptr_ds.data.types import Example
from mvptr_ds.data.vocab import VocabInfo

EDGE_SEEDS = [0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, 2 ** 64 - 1]


def _seeds(n, seed=0):
    return EDGE_SEEDS + [int(x) for x in np.random.default_rng(seed).integers(0, 2 ** 63, n)]


def test_seed_states_and_raw_outputs_are_numpys():
    seeds = _seeds(300)
    states = seed_states(np.array(seeds, np.uint64))
    for s, got in zip(seeds, states):
        assert np.array_equal(got, np.random.SeedSequence(s).generate_state(4, np.uint64)), s
    raw = raw_outputs(seeds[:60], 37)
    for s, got in zip(seeds[:60], raw):
        assert np.array_equal(got, np.random.PCG64(s).random_raw(37)), s
    assert raw_outputs([5], 0).shape == (1, 0)


def test_mix_seeds_is_mix_seed_row_by_row():
    ids = [0, 1, 7, 2 ** 40, -3, 2 ** 64 - 1]
    got = mix_seeds(1, 9, [0, 0, 1, 2, 3, 4], ids)
    assert got.tolist() == [corruption.mix_seed(1, 9, e, i) for e, i in zip([0, 0, 1, 2, 3, 4], ids)]
    assert mix_seeds(2, -5, 3).tolist() == [corruption.mix_seed(2, -5, 3)]


def _random_batch(rng, B, word_hi, concept_range):
    lengths = [rng.integers(0, 14, B) for _ in range(3)]
    lengths[0][:3] = 0, 1, 2                            # empty captions, odd lengths and held halves
    w, c, t = (Flat(rng.integers(0, max(hi, 1), int(n.sum())).astype(np.int64), n.astype(np.int64))
               for n, hi in zip(lengths, (word_hi, max(concept_range[1], 1), word_hi)))
    links = [list(rng.integers(-2, 16, rng.integers(0, 4))) for _ in range(len(c.ids))]   # some cut or negative
    return w, c, links, t


@pytest.mark.parametrize("word_hi,concept_range", [
    (30522, (30522, 40000)),      # BERT-like: Lemire rejections almost never
    (1_000_003, (5, 5)),          # no concept range (kept), rare rejections (that sample redone by corrupt_sample)
    (2 ** 31 + 1, (7, 8)),        # a rejection in about half the draws; a one-value concept range draws nothing
])
def test_corrupt_batch_equals_corrupt_sample(word_hi, concept_range):
    vocab = VocabInfo(vocab_size=10 ** 10, only_word_size=word_hi, pad_id=0, cls_id=2, sep_id=3, mask_id=4,
                      concept_range=concept_range, word_range=(5, word_hi))
    rng = np.random.default_rng(word_hi)
    for trial, (mlm, mcr) in enumerate([(True, True), (True, False), (False, True), (False, False)] * 3):
        w, c, links, t = _random_batch(rng, 48, word_hi, concept_range)
        seeds = [int(s) for s in rng.integers(0, 2 ** 63, 48)]
        got = corrupt_batch(w, c, links, t, seeds, vocab, 0.4, mlm, mcr)
        for b, seed in enumerate(seeds):
            ws, cs, ts = (slice(f.starts[b], f.starts[b] + f.lengths[b]) for f in (w, c, t))
            ref = corruption.corrupt_sample(w.ids[ws], c.ids[cs], links[cs], t.ids[ts],
                                            np.random.Generator(np.random.PCG64(seed)), vocab, 0.4, mlm, mcr)
            assert np.array_equal(got.words[ws], ref.caption_ids), (trial, b)
            assert np.array_equal(got.mlm_labels[ws], ref.mlm_labels), (trial, b)
            assert np.array_equal(got.concepts[cs], ref.concept_ids), (trial, b)
            assert np.array_equal(got.tags[ts], ref.tag_ids) and np.array_equal(got.mcr_labels[ts], ref.mcr_labels)
        assert got.words is not w.ids and np.array_equal(w.ids, w.ids)          # the inputs are not written


def _per_sample_collate(collator: Collator, examples, ctx: BatchContext):
    """The text and tag rows as the collator laid them out sample by sample, with ``corrupt_sample``."""
    v, text, tags = collator.vocab, [], []
    for ex in examples:
        words = np.asarray(ex.caption_ids[:collator.max_words], np.int64)
        slots = collator.max_phrases + collator.max_words - len(words)
        gen = corruption.sample_generator(ctx.seed, ctx.epoch, ex.sample_id)
        out = corruption.corrupt_sample(words, np.asarray(ex.concept_ids[:slots], np.int64),
                                        ex.concept_word_links[:slots],
                                        np.asarray(ex.tag_ids[:collator.max_tags], np.int64), gen, v,
                                        collator.mask_prob, collator.mlm, collator.mcr)
        text.append(([v.cls_id, *out.caption_ids, *out.concept_ids, v.sep_id],
                     [-1, *out.mlm_labels, *[-1] * (len(out.concept_ids) + 1)]))
        tags.append(([v.cls_id, *out.tag_ids, v.sep_id], [-1, *out.mcr_labels, -1]))
    return text, tags


def test_collated_rows_are_the_per_sample_ones():
    vocab = VocabInfo(vocab_size=400, only_word_size=300, pad_id=0, cls_id=2, sep_id=3, mask_id=4,
                      concept_range=(300, 400), word_range=(5, 300))
    rng = np.random.default_rng(3)
    examples = []
    for sid in range(40):
        n, k = int(rng.integers(0, 12)), int(rng.integers(0, 6))
        examples.append(Example(sid * 7, sid // 2, rng.integers(5, 300, n).tolist(), rng.integers(300, 400, k).tolist(),
                                [rng.integers(0, 12, 2).tolist() for _ in range(k)], rng.integers(5, 300, 9).tolist(),
                                np.zeros((3, 4), np.float32)))
    examples[5] = dataclasses.replace(examples[5], caption_ids=np.asarray(examples[5].caption_ids, np.int32))
    collator = Collator(vocab, ("mlm", "mcr"), max_seq_length=10, max_phrases=2, max_tag_length=8)
    ctx = BatchContext(seed=4, epoch=2, position=64)
    batch = collator(examples, ctx)
    text, tags = _per_sample_collate(collator, examples, ctx)
    for b, ((ids, labels), (tag_ids, mcr)) in enumerate(zip(text, tags)):
        assert batch.text_ids[b, :len(ids)].tolist() == ids and batch.mlm_labels[b, :len(ids)].tolist() == labels
        assert batch.tag_ids[b, :len(tag_ids)].tolist() == tag_ids and batch.mcr_labels[b].tolist()[:len(mcr)] == mcr
        assert int(batch.text_mask[b].sum()) == len(ids) and not batch.text_ids[b, len(ids):].any()
