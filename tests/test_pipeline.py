"""Batch pipeline: packing, trimming at EOS / stop strings, input order, HF's output format,
and greedy parity with HF's own model + tokenizer (and with HF's own pipeline) on SmolLM2."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import hf_flexgen
from hf_flexgen import Policy
from hf_flexgen.pipeline import (
    TextGenerationPipeline,
    as_transformers_model,
    finish,
    generate_all,
    generate_blocks,
    padding_fraction,
    plan_blocks,
    run_blocks,
    stop_cut,
)

RAW_PROMPTS = [  # deliberately not in length order
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a large forest, there lived an old",
    "1, 2, 3, 4,",
    "The three primary colors are red, blue and",
]
CHAT = [{"role": "user", "content": "What is 2 + 3? Answer with a number."}]
LIST_CHAT = [{"role": "user", "content": "Write a list of three fruits, one per line."}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a shared 2-core runner every multi-threaded small GEMM waits a scheduler tick for
    its second thread (~16 ms each, 100x the work); one thread keeps these tests quick."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def pipe(smollm2_dir):
    # blocks of 2 rows: 4 prompts -> 2 blocks, with padding inside each
    with hf_flexgen.pipeline("text-generation", model=smollm2_dir, policy=Policy(gpu_batch_size=2)) as p:
        yield p


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def hf_greedy(hf_model, tokenizer, batch, new_tokens: int) -> str:
    """HF's own generate on one prompt (no padding), new text decoded as HF's pipeline does."""
    out = hf_model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


# -- packing and trimming, no model -----------------------------------------------------------
def test_plan_blocks_sorts_longest_first_and_keeps_ties_stable():
    lengths = [5, 1, 9, 5, 3, 9, 2]
    assert plan_blocks(lengths, 3) == [[2, 5, 0], [3, 4, 6], [1]]
    assert plan_blocks(lengths, 3, sort=False) == [[0, 1, 2], [3, 4, 5], [6]]
    assert sorted(i for b in plan_blocks(lengths, 2) for i in b) == list(range(7))


def test_padding_fraction_drops_with_sorting():
    lengths = [10, 100, 12, 98, 11, 99, 13, 97]
    assert padding_fraction(lengths, [[0, 1]]) == pytest.approx(1 - 110 / 200)
    assert padding_fraction(lengths, plan_blocks(lengths, 2)) < 0.02
    assert padding_fraction(lengths, plan_blocks(lengths, 2, sort=False)) > 0.4


def test_stop_cut_and_finish_trim_at_eos_and_stop(tokenizer):
    tokens = tokenizer("Apples\nPears\nPlums", add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    cut = stop_cut(tokenizer, tokens, ["\n"])
    assert "\n" in tokenizer.decode(tokens[:cut]) and "\n" not in tokenizer.decode(tokens[:cut - 1])
    assert finish(tokenizer, tokens, {eos}, ["\n"]) == ("Apples", cut)
    pears = stop_cut(tokenizer, tokens, ["Pe"])
    assert finish(tokenizer, tokens, {eos}, ["Pl", "Pe"]) == ("Apples\n", pears)
    assert finish(tokenizer, tokens + [eos, 5, 6], {eos}, []) == ("Apples\nPears\nPlums", len(tokens) + 1)
    assert finish(tokenizer, tokens, {eos}, ["absent"]) == ("Apples\nPears\nPlums", len(tokens))


class EchoModel:
    """Stands in for FlexGenForCausalLM: row r's new tokens spell its prompt length, then EOS,
    then junk (as after an EOS the engine pads). Records each generate call's prompt lengths."""

    def __init__(self, tokenizer, block_size: int):
        self.tokenizer, self.calls = tokenizer, []
        self.policy = Policy(gpu_batch_size=block_size)
        self.config = SimpleNamespace(max_position_embeddings=512)
        self.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)

    def generate(self, input_ids, attention_mask, pad_token_id, eos_token_id, **kwargs):
        lengths = attention_mask.sum(1).tolist()
        self.calls.append(lengths)
        new = [self.tokenizer(f" len {n}.\nrest", add_special_tokens=False).input_ids
               + eos_token_id + [7, 7] for n in lengths]
        width = max(map(len, new))
        new = torch.tensor([row + [pad_token_id] * (width - len(row)) for row in new])
        return torch.cat([input_ids, new], dim=1)


def test_blocks_are_sorted_and_results_come_back_in_input_order(tokenizer):
    prompts = ["a " * n for n in (3, 30, 7, 12, 1, 20, 5)]
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    model = EchoModel(tokenizer, block_size=3)
    texts = generate_all(model, tokenizer, prompts, chat_template=False, max_new_tokens=4)
    assert texts == [f" len {n}.\nrest" for n in lengths]
    assert model.calls == [sorted(lengths, reverse=True)[s:s + 3] for s in (0, 3, 6)]
    blocks = list(generate_blocks(EchoModel(tokenizer, 3), tokenizer, prompts, chat_template=False,
                                  stop="\n", max_new_tokens=4))
    assert [c.text for b in blocks for c in b] == [f" len {n}." for n in sorted(lengths, reverse=True)]


def test_run_blocks_skips_done_prompts_and_whole_done_blocks(tokenizer):
    encoded = [[5] * n for n in (4, 9, 2, 7, 3)]
    blocks = plan_blocks([len(e) for e in encoded], 2)  # [[1, 3], [0, 4], [2]]
    model = EchoModel(tokenizer, 2)
    got = [c.index for b in run_blocks(model, tokenizer, encoded, blocks, skip={1, 3, 4}) for c in b]
    assert got == [0, 2]
    assert model.calls == [[4, 3], [2]]  # block [1, 3] skipped; block [0, 4] rerun whole


def test_pipeline_output_format_like_hf(tokenizer):
    pipe = TextGenerationPipeline(EchoModel(tokenizer, 4), tokenizer, chat_template=False)
    one = pipe("hello there", max_new_tokens=4, stop="\n")
    assert one == [{"generated_text": "hello there len 2."}]
    many = pipe(["hi", "hello there"], max_new_tokens=4, return_full_text=False, num_return_sequences=2)
    assert many == [[{"generated_text": " len 1.\nrest"}] * 2, [{"generated_text": " len 2.\nrest"}] * 2]
    chat = TextGenerationPipeline(EchoModel(tokenizer, 4), tokenizer)(CHAT, max_new_tokens=4)
    assert chat[0]["generated_text"][:-1] == CHAT
    assert chat[0]["generated_text"][-1]["role"] == "assistant"
    with pytest.raises(TypeError, match="prompt 1 must be a string or a non-empty list"):
        pipe(["ok", 3], max_new_tokens=4)


def test_pipeline_refuses_prompt_longer_than_context(tokenizer):
    model = EchoModel(tokenizer, 4)
    model.config.max_position_embeddings = 40
    pipe = TextGenerationPipeline(model, tokenizer, chat_template=False)
    too_long = r"prompt 1 has \d+ tokens, more than the 30 .*max_position_embeddings"
    with pytest.raises(ValueError, match=too_long):
        pipe(["short", "word " * 35], max_new_tokens=10)
    assert model.calls == []


# -- the real model ---------------------------------------------------------------------------
def test_pipeline_matches_hf_generate_greedy(pipe, hf_model, tokenizer):
    ours = pipe(RAW_PROMPTS, max_new_tokens=8, do_sample=False, chat_template=False,
                return_full_text=False)
    for prompt, result in zip(RAW_PROMPTS, ours):
        expected = hf_greedy(hf_model, tokenizer, tokenizer(prompt, return_tensors="pt"), 8)
        assert result == [{"generated_text": expected}], prompt


def test_chat_messages_match_hf_generate_greedy(pipe, hf_model, tokenizer):
    batch = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True,
                                          return_tensors="pt")
    expected = hf_greedy(hf_model, tokenizer, batch, 8)
    out = pipe([CHAT, "What is 2 + 3? Answer with a number."], max_new_tokens=8, do_sample=False)
    assert out[0] == [{"generated_text": CHAT + [{"role": "assistant", "content": expected}]}]
    # a plain string goes through the chat template as one user turn by default
    assert out[1] == [{"generated_text": "What is 2 + 3? Answer with a number." + expected}]


def test_stop_strings_trim_completions(pipe):
    kwargs = dict(max_new_tokens=8, do_sample=False, return_full_text=False)
    plain = pipe(LIST_CHAT, **kwargs)[0]["generated_text"]
    assert "\n" in plain
    stopped = pipe(LIST_CHAT, stop=["\n", "never"], **kwargs)
    assert stopped == [{"generated_text": plain.split("\n")[0]}]


def test_inside_transformers_pipeline(pipe, hf_model, tokenizer, caplog):
    with caplog.at_level(logging.ERROR):
        ours = transformers.pipeline("text-generation", model=as_transformers_model(pipe.model),
                                     tokenizer=tokenizer)
    assert not [r for r in caplog.records if "not supported" in r.getMessage()]
    theirs = transformers.pipeline("text-generation", model=hf_model, tokenizer=tokenizer)
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert ours(RAW_PROMPTS[0], **kwargs) == theirs(RAW_PROMPTS[0], **kwargs)
    assert ours(LIST_CHAT, stop_sequence="\n", **kwargs) == theirs(LIST_CHAT, stop_sequence="\n", **kwargs)
