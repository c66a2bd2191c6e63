"""Scoring mode (prefill only, no KV cache) equals HF's own forward pass (fp32, CPU): per-token
log-probs and greedy flags of mixed-length (context, continuation) pairs, and rolling
log-likelihoods, under policies that put weights on disk, activations on the CPU and blocks of
several micro-batches."""
from __future__ import annotations

import pytest
import torch

from hf_flexgen import FlexGenForCausalLM, Policy
from hf_flexgen.scoring import rolling_windows

from tiny_models import VOCAB

POLICIES = {
    "device-2x3": Policy(gpu_batch_size=2, num_gpu_batches=3),
    "weights-disk-overlap": Policy(gpu_batch_size=3, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=0,
                                   cache_gpu_percent=0, cache_cpu_percent=100, overlap=True),
    "mixed": Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=20, w_cpu_percent=30,
                    cache_gpu_percent=0, cache_cpu_percent=50, act_gpu_percent=50, act_cpu_percent=50),
}


def random_pairs(count: int, seed: int, max_context: int = 20, max_continuation: int = 6):
    g = torch.Generator().manual_seed(seed)

    def tokens(low, high):
        n = int(torch.randint(low, high + 1, (1,), generator=g))
        return torch.randint(4, VOCAB, (n,), generator=g).tolist()

    return [(tokens(1, max_context), tokens(1, max_continuation)) for _ in range(count)]


def hf_scores(model, pairs, max_length=None):
    """(log-probs, argmax tokens) per pair from HF's forward on that pair alone; inputs cut
    from the left to max_length tokens (lm-evaluation-harness's rule)."""
    out = []
    for context, continuation in pairs:
        ids = (context + continuation)[:-1]
        ids = ids[-max_length:] if max_length else ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -len(continuation):].float()
        logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(continuation)[:, None])
        out.append((logprobs.squeeze(1), logits.argmax(-1).tolist()))
    return out


def assert_scores_match(got, expected, continuations, atol=1e-5):
    for i, (score, (logprobs, greedy), cont) in enumerate(zip(got, expected, continuations)):
        assert score.tokens == tuple(cont), i
        torch.testing.assert_close(torch.tensor(score.logprobs), logprobs, atol=atol, rtol=1e-5,
                                   msg=f"pair {i}")
        assert list(score.greedy_tokens) == greedy, i
        assert score.is_greedy == (greedy == list(cont)), i
        assert score.total == pytest.approx(float(logprobs.sum()), abs=atol * len(cont))


@pytest.mark.parametrize("family", ["opt-pre-ln", "opt-post-ln-project", "llama-gqa", "mistral"])
@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_continuations_match_hf(tiny_checkpoint, tmp_path, family, policy_name):
    reference, directory = tiny_checkpoint(family)
    pairs = random_pairs(11, seed=3)  # 11: blocks are not full
    model = FlexGenForCausalLM.from_pretrained(directory, policy=POLICIES[policy_name], offload_dir=tmp_path)
    try:
        got = model.score_continuations(pairs)
        stats = model.last_stats
    finally:
        model.close()
    assert_scores_match(got, hf_scores(reference, pairs), [c for _, c in pairs])
    assert stats["kv_bytes_stored"] == 0 and stats["prefill_s"] > 0
    if POLICIES[policy_name].w_gpu_percent == 0 and POLICIES[policy_name].w_cpu_percent == 0:
        assert stats["weight_bytes_read"] > 0


def test_greedy_flags_on_greedy_continuations(tiny_checkpoint):
    """Continuations HF's greedy generate produced are flagged greedy at every token."""
    reference, directory = tiny_checkpoint("opt-pre-ln")
    contexts = [c for c, _ in random_pairs(5, seed=4)]
    pairs = []
    for context in contexts:
        with torch.no_grad():
            out = reference.generate(torch.tensor([context]), max_new_tokens=4, min_new_tokens=4,
                                     do_sample=False, eos_token_id=None)
        pairs.append((context, out[0, len(context):].tolist()))
    model = FlexGenForCausalLM.from_pretrained(directory, policy=Policy(gpu_batch_size=2, num_gpu_batches=2))
    got = model.score_continuations(pairs)
    model.close()
    assert all(s.is_greedy for s in got)
    flipped = [(c, [t[0], (t[1] + 1) % VOCAB, *t[2:]]) for c, t in pairs]
    model = FlexGenForCausalLM.from_pretrained(directory, policy=Policy(gpu_batch_size=2, num_gpu_batches=2))
    got = model.score_continuations(flipped)
    model.close()
    assert not any(s.is_greedy for s in got)
    assert all(s.greedy[0] and not s.greedy[1] for s in got)


def test_long_contexts_lose_their_oldest_tokens(tiny_checkpoint):
    reference, directory = tiny_checkpoint("llama-gqa")
    pairs = random_pairs(6, seed=5, max_context=30)
    model = FlexGenForCausalLM.from_pretrained(directory, policy=Policy(gpu_batch_size=4, num_gpu_batches=2))
    got = model.score_continuations(pairs, max_length=12, logits_chunk=3)
    model.close()
    assert_scores_match(got, hf_scores(reference, pairs, max_length=12), [c for _, c in pairs])


@pytest.mark.parametrize("family", ["opt-pre-ln", "llama-gqa"])
def test_rolling_single_window_is_hf_full_text(tiny_checkpoint, family):
    reference, directory = tiny_checkpoint(family)
    texts = [c for c, _ in random_pairs(5, seed=6, max_context=40)]
    model = FlexGenForCausalLM.from_pretrained(directory, policy=Policy(gpu_batch_size=2, num_gpu_batches=2))
    got = model.score_rolling(texts, prefix_token=2)
    model.close()
    for text, score in zip(texts, got):
        with torch.no_grad():
            logits = reference(torch.tensor([[2, *text]])).logits[0, :-1].float()
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(text)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(score.logprobs), expected, atol=1e-5, rtol=1e-5)


def test_rolling_windows_match_lm_eval(tiny_checkpoint):
    """Several windows per text: the same windows as lm-evaluation-harness's own
    get_rolling_token_windows + make_disjoint_window, scored by HF."""
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    reference, directory = tiny_checkpoint("opt-post-ln-project")
    texts = [c for c, _ in random_pairs(6, seed=7, max_context=45)] + [[5]]
    max_length = 9
    model = FlexGenForCausalLM.from_pretrained(
        directory, policy=Policy(gpu_batch_size=3, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=50))
    got = model.score_rolling(texts, prefix_token=2, max_length=max_length)
    model.close()
    for text, score in zip(texts, got):
        windows = [lm_eval_utils.make_disjoint_window(w) for w in lm_eval_utils.get_rolling_token_windows(
            token_list=text, prefix_token=2, max_seq_len=max_length, context_len=1)]
        expected = hf_scores(reference, windows)
        assert score.tokens == tuple(text)
        torch.testing.assert_close(torch.tensor(score.logprobs), torch.cat([lp for lp, _ in expected]),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tokens,max_length", [(1, 1), (5, 1), (7, 3), (9, 3), (20, 8), (3, 10)])
def test_rolling_windows_cover_every_token_once(num_tokens, max_length):
    windows = rolling_windows(num_tokens, max_length)
    predicted = [t for _, first, end in windows for t in range(first, end)]
    assert predicted == list(range(num_tokens))
    for start, first, end in windows:
        assert 0 <= start <= first < end and end - start <= max_length
        assert end - start == max_length or start == 0  # as much earlier text as fits


def test_bad_pairs_are_refused(tiny_checkpoint):
    _, directory = tiny_checkpoint("opt-pre-ln")
    model = FlexGenForCausalLM.from_pretrained(directory, policy=Policy(gpu_batch_size=2))
    with pytest.raises(ValueError, match="pair 1: the context is empty"):
        model.score_continuations([([5], [6]), ([], [7])])
    with pytest.raises(ValueError, match="continuation is empty"):
        model.score_continuations([([5], [])])
    with pytest.raises(ValueError, match="score_rolling instead"):
        model.score_continuations([([5], list(range(4, 20)))], max_length=8)
    model.close()


@pytest.mark.slow
@pytest.mark.parametrize("policy", [
    Policy(gpu_batch_size=3, num_gpu_batches=2),
    Policy(gpu_batch_size=2, num_gpu_batches=3, w_gpu_percent=0, w_cpu_percent=30, cache_gpu_percent=0,
           cache_cpu_percent=100, act_gpu_percent=0, act_cpu_percent=100, overlap=True),
], ids=["device", "weights-disk-act-cpu-overlap"])
def test_smollm2_continuations_match_hf(smollm2_dir, tmp_path, policy):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = [("The capital of France is", " Paris."), ("2 + 2 =", " 4"),
             ("Water boils at a temperature of", " 100 degrees Celsius at sea level."),
             ("Q: What colour is the sky on a clear day?\nA:", " Blue"), ("Once", " upon a time"),
             ("The first three prime numbers are", " 2, 3 and 5, and the next one is 7.")]
    pairs = [(tokenizer(c).input_ids, tokenizer(t).input_ids) for c, t in texts]
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    model = FlexGenForCausalLM.from_pretrained(smollm2_dir, policy=policy, offload_dir=tmp_path)
    got = model.score_continuations(pairs, logits_chunk=7)
    model.close()
    assert_scores_match(got, hf_scores(reference, pairs), [t for _, t in pairs], atol=1e-4)
