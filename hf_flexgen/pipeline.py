"""Batch generation over many prompts: length-sorted blocks, results in input order.

Three layers, each usable alone:

- ``encode_prompts`` / ``plan_blocks`` / ``run_blocks``: tokenize (chat template where it
  applies), pack prompts of similar token length into blocks of ``policy.block_size`` rows,
  run block after block, yielding each block's completions (trimmed at EOS / stop strings).
- ``pipeline("text-generation", ...)``: HF's text-generation pipeline call and output format
  on top of them.
- ``as_transformers_model``: wraps a ``FlexGenForCausalLM`` so ``transformers.pipeline``
  itself can drive it.
"""
from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# HF's TextGenerationPipeline defaults, used where neither the model's generation config
# nor the caller sets them (``max_new_tokens`` also yields to a set ``max_length``).
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")


@dataclass(frozen=True)
class Completion:
    index: int          # position in the prompt list given to run_blocks / generate_blocks
    text: str           # new text, cut before the first EOS or stop string
    new_tokens: int     # tokens generated, up to and including the EOS / stop-completing token


# -- checkpoint checks (cheap: config only, no weights) ---------------------------------------
def load_checkpoint_config(name_or_path, revision: str | None = None, token: str | None = None):
    """(checkpoint directory, config) of a causal LM that hf_flexgen supports; raises
    FileNotFoundError / ValueError with a clear message otherwise. Reads no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .families import supported_model_types
    from .memory.resolve import resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(name_or_path, revision=revision, token=token)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} has no config.json: not a transformers checkpoint")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"{directory}/config.json is not a usable transformers config: "
                         f"{str(err).splitlines()[0]}") from err
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ValueError(f"{directory} holds a {config.model_type!r} model, which is not a "
                         "causal language model")
    if config.model_type not in supported_model_types():
        raise ValueError(f"model_type {config.model_type!r} is not supported by hf_flexgen; "
                         f"supported: {', '.join(supported_model_types())}")
    return directory, config


# -- prompts -> token ids -----------------------------------------------------------------
def is_chat(item) -> bool:
    return isinstance(item, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in item)


def check_prompt_item(item, name: str) -> None:
    if isinstance(item, str) or (is_chat(item) and item):
        return
    raise TypeError(f"{name} must be a string or a non-empty list of chat messages "
                    f"({{'role': ..., 'content': ...}}), got {type(item).__name__}")


def render_prompt(tokenizer, item, chat_template: bool | None = None,
                  continue_final_message: bool | None = None) -> tuple[str, bool]:
    """The prompt text and whether the tokenizer should add its special tokens.

    Chat messages always go through the tokenizer's chat template. A plain string does when
    ``chat_template`` is True, or None ("auto") and the tokenizer has a template (as one user
    turn); with False it is used as is, as HF's text-generation pipeline does."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(item, str) and (chat_template is False or (chat_template is None and not has_template)):
        return item, True
    if not has_template:
        raise ValueError("chat messages (or chat_template=True) need a tokenizer with a chat "
                         "template; this tokenizer has none")
    messages = [{"role": "user", "content": item}] if isinstance(item, str) else list(item)
    if continue_final_message is None:
        continue_final_message = messages[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=not continue_final_message,
                                         continue_final_message=continue_final_message)
    return text, False


def encode_prompts(tokenizer, prompts: Sequence, chat_template: bool | None = None,
                   continue_final_message: bool | None = None,
                   names: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids of every prompt (see ``render_prompt``); empty prompts are refused. Errors
    start with ``names[i]`` (default ``prompt i``)."""
    encoded = []
    for i, item in enumerate(prompts):
        name = names[i] if names is not None else f"prompt {i}"
        check_prompt_item(item, name)
        try:
            text, special = render_prompt(tokenizer, item, chat_template, continue_final_message)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        ids = tokenizer(text, add_special_tokens=special).input_ids
        if not ids:
            raise ValueError(f"{name}: the prompt is empty (no tokens)")
        encoded.append(list(ids))
    return encoded


def context_room(config, max_new_tokens: int | None) -> int | None:
    """Most prompt tokens that leave room for ``max_new_tokens`` in the model's context."""
    limit = getattr(config, "max_position_embeddings", None)
    return None if limit is None else limit - (max_new_tokens or 0)


def check_prompt_lengths(lengths: Sequence[int], config, max_new_tokens: int | None,
                         names: Sequence[str] | None = None) -> None:
    room = context_room(config, max_new_tokens)
    if room is None:
        return
    for i, n in enumerate(lengths):
        if n > room:
            name = names[i] if names is not None else f"prompt {i}"
            raise ValueError(
                f"{name} has {n} tokens, more than the {room} that fit: the model's context is "
                f"{config.max_position_embeddings} tokens (config.max_position_embeddings) and "
                f"max_new_tokens is {max_new_tokens or 0}")


# -- packing ------------------------------------------------------------------------------
def plan_blocks(lengths: Sequence[int], block_size: int, sort: bool = True) -> list[list[int]]:
    """Prompt indices per block. Sorted longest first (stable), so each block holds prompts
    of similar length (little padding) and the biggest block runs first: a policy that does
    not fit fails at once, not hours in. The plan depends only on the lengths, so a resumed
    job rebuilds the same blocks and greedy results do not change."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    return [order[s:s + block_size] for s in range(0, len(order), block_size)]


def padding_fraction(lengths: Sequence[int], blocks: Iterable[list[int]]) -> float:
    """Share of the padded prompt matrix, over all blocks, that is padding."""
    padded = real = 0
    for rows in blocks:
        padded += len(rows) * max(lengths[i] for i in rows)
        real += sum(lengths[i] for i in rows)
    return 0.0 if padded == 0 else 1 - real / padded


def left_pad(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[k, width - len(r):] = 1
    return ids, mask


# -- EOS and stop strings -----------------------------------------------------------------
def as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


def stop_cut(tokenizer, tokens: list[int], stops: Sequence[str], **decode_kwargs) -> int | None:
    """Fewest leading ``tokens`` whose text contains a stop string (None: no stop string).
    Binary search over prefixes: a prefix's text only grows."""
    def hit(n: int) -> bool:
        text = tokenizer.decode(tokens[:n], **decode_kwargs)
        return any(s in text for s in stops)

    if not stops or not hit(len(tokens)):
        return None
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
    return lo


def finish(tokenizer, tokens: list[int], eos: Collection[int], stops: Sequence[str],
           **decode_kwargs) -> tuple[str, int]:
    """(completion text, tokens generated for it) of one row's new tokens."""
    for n, t in enumerate(tokens):
        if t in eos:
            tokens, used = tokens[:n], n + 1
            break
    else:
        used = len(tokens)
    cut = stop_cut(tokenizer, tokens, stops, **decode_kwargs)
    text = tokenizer.decode(tokens[:cut] if cut else tokens, **decode_kwargs)
    if cut is None:
        return text, used
    return text[:min(text.find(s) for s in stops if s in text)], cut


# -- running blocks -----------------------------------------------------------------------
def run_blocks(model, tokenizer, encoded: Sequence[list[int]], blocks: Iterable[list[int]],
               stop: str | Sequence[str] | None = None, skip: Collection[int] = (),
               skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool | None = None,
               **generate_kwargs) -> Iterator[list[Completion]]:
    """Run each planned block; yield its completions (except the indices in ``skip``) as soon
    as it is done. A block whose every index is in ``skip`` is not run."""
    stops = [s for s in as_list(stop) if s]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = set(as_list(generate_kwargs.pop("eos_token_id", model.generation_config.eos_token_id)))
    if generate_kwargs.get("num_return_sequences", 1) not in (None, 1):
        raise ValueError("run_blocks returns one completion per prompt: repeat the prompt instead "
                         "of num_return_sequences")
    decode = {"skip_special_tokens": skip_special_tokens,
              "clean_up_tokenization_spaces": clean_up_tokenization_spaces}
    for rows in blocks:
        if all(i in skip for i in rows):
            continue
        ids, mask = left_pad([encoded[i] for i in rows], pad)
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad,
                             eos_token_id=sorted(eos) or None, **generate_kwargs)
        done = []
        for r, i in enumerate(rows):
            if i not in skip:
                text, used = finish(tokenizer, out[r, ids.shape[1]:].tolist(), eos, stops, **decode)
                done.append(Completion(i, text, used))
        logger.debug("block of %d rows (%d prompt columns) done", len(rows), ids.shape[1])
        yield done


def generate_blocks(model, tokenizer, prompts: Sequence, chat_template: bool | None = None,
                    sort: bool = True, stop: str | Sequence[str] | None = None,
                    **generate_kwargs) -> Iterator[list[Completion]]:
    """Tokenize, sort by length into blocks of ``model.policy.block_size``, run: yields each
    block's completions as soon as the block is done (``Completion.index`` = input position)."""
    encoded = encode_prompts(tokenizer, prompts, chat_template)
    check_prompt_lengths([len(e) for e in encoded], model.config,
                         generate_kwargs.get("max_new_tokens", model.generation_config.max_new_tokens))
    blocks = plan_blocks([len(e) for e in encoded], model.policy.block_size, sort)
    yield from run_blocks(model, tokenizer, encoded, blocks, stop=stop, **generate_kwargs)


def generate_all(model, tokenizer, prompts: Sequence, **kwargs) -> list[str]:
    """Completions of every prompt, in input order."""
    out: list[str] = [""] * len(prompts)
    for block in generate_blocks(model, tokenizer, prompts, **kwargs):
        for c in block:
            out[c.index] = c.text
    return out


# -- hf_flexgen.pipeline ------------------------------------------------------------------
class TextGenerationPipeline:
    """``transformers``' text-generation pipeline call and output format, run in length-sorted
    blocks: ``pipe(prompt_or_prompts, **generate_kwargs)``."""

    task = "text-generation"

    def __init__(self, model, tokenizer, chat_template: bool | None = None,
                 owns_model: bool = False, **generate_kwargs):
        self.model, self.tokenizer, self.chat_template = model, tokenizer, chat_template
        self.generate_kwargs, self._owns_model = generate_kwargs, owns_model

    def __call__(self, text_inputs, *, return_full_text: bool = True, stop=None, stop_strings=None,
                 chat_template: bool | None = None, continue_final_message: bool | None = None,
                 num_return_sequences: int = 1, sort: bool = True, skip_special_tokens: bool = True,
                 clean_up_tokenization_spaces: bool | None = None, batch_size: int | None = None,
                 **generate_kwargs):
        """One prompt (a string or a chat) -> ``[{"generated_text": ...}]``; a list of prompts
        -> a list of those, in input order. ``stop`` / ``stop_strings``: completions end before
        the first stop string (excluded, unlike HF, which keeps it). ``return_full_text``:
        prompt + completion (a chat gets the assistant message appended), as HF does.
        ``batch_size`` is ignored: blocks hold ``policy.block_size`` prompts."""
        if batch_size is not None:
            logger.info("batch_size=%s ignored: blocks hold policy.block_size=%d prompts",
                        batch_size, self.model.policy.block_size)
        items, single = self._inputs(text_inputs)
        kwargs = self._generation_kwargs(generate_kwargs)
        template = self.chat_template if chat_template is None else chat_template
        encoded = encode_prompts(self.tokenizer, items, template, continue_final_message)
        rows = [i for i in range(len(items)) for _ in range(num_return_sequences)]
        lengths = [len(encoded[i]) for i in rows]
        check_prompt_lengths(lengths, self.model.config,
                             kwargs.get("max_new_tokens", self.model.generation_config.max_new_tokens))
        texts: list[str] = [""] * len(rows)
        blocks = plan_blocks(lengths, self.model.policy.block_size, sort)
        for block in run_blocks(self.model, self.tokenizer, [encoded[i] for i in rows], blocks,
                                stop=as_list(stop) + as_list(stop_strings),
                                skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs):
            for c in block:
                texts[c.index] = c.text
        results = [[] for _ in items]
        for r, i in enumerate(rows):
            text = full_text(items[i], texts[r], continue_final_message) if return_full_text else texts[r]
            results[i].append({"generated_text": text})
        return results[0] if single else results

    @staticmethod
    def _inputs(text_inputs) -> tuple[list, bool]:
        if isinstance(text_inputs, str) or (is_chat(text_inputs) and text_inputs):
            return [text_inputs], True
        items = list(text_inputs)
        for i, item in enumerate(items):
            check_prompt_item(item, f"prompt {i}")
        return items, False

    def _generation_kwargs(self, call_kwargs: dict) -> dict:
        """Caller's kwargs over the pipeline's, plus HF's pipeline defaults where unset."""
        kwargs = {**self.generate_kwargs, **call_kwargs}
        set_params = {**self.model.generation_config.to_diff_dict(), **kwargs}
        added = {k: v for k, v in PIPELINE_DEFAULTS.items() if k not in set_params
                 and not (k == "max_new_tokens" and "max_length" in set_params)}
        if not {**set_params, **added}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in SAMPLING_ONLY}
        return {**kwargs, **added}

    def close(self) -> None:
        if self._owns_model:
            self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"hf_flexgen.TextGenerationPipeline({self.model!r})"


def full_text(item, completion: str, continue_final_message: bool | None):
    """HF's ``return_full_text=True``: prompt + text, or the chat with the reply added."""
    if isinstance(item, str):
        return item + completion
    messages = list(item)
    if continue_final_message is None:
        continue_final_message = messages[-1]["role"] == "assistant"
    if continue_final_message:
        last = messages[-1]
        return messages[:-1] + [{**last, "content": last["content"] + completion}]
    return messages + [{"role": "assistant", "content": completion}]


def pipeline(task: str = "text-generation", model=None, tokenizer=None, policy=None,
             chat_template: bool | None = None, **kwargs) -> TextGenerationPipeline:
    """Like ``transformers.pipeline("text-generation", ...)``, run by hf_flexgen.

    ``model``: a checkpoint directory or hub id (default: the built-in SmolLM2-135M-Instruct),
    or a loaded ``FlexGenForCausalLM``. ``tokenizer``: a tokenizer or its path (default: the
    checkpoint's). ``policy``: a ``Policy``. ``kwargs``: ``from_pretrained`` arguments
    (``device``, ``dtype``, ``offload_dir``, ``revision``, ``token``) and default generation
    arguments for every call (``max_new_tokens``, ``do_sample``, ...); unset, HF's pipeline
    defaults apply (``max_new_tokens=256, do_sample=True, temperature=0.7``) unless the model's
    generation config sets them. ``chat_template``: see ``render_prompt``."""
    from transformers import AutoTokenizer

    from .modeling import FlexGenForCausalLM

    if task != "text-generation":
        raise ValueError(f"hf_flexgen.pipeline supports task 'text-generation' only, got {task!r}")
    load_names = set(inspect.signature(FlexGenForCausalLM.from_pretrained).parameters) - {"cls"}
    load_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in load_names}
    owns = not isinstance(model, FlexGenForCausalLM)
    if owns:
        if model is None:
            from .default_model import default_model_dir
            model = default_model_dir()
        directory, _ = load_checkpoint_config(model, load_kwargs.get("revision"), load_kwargs.get("token"))
        model = FlexGenForCausalLM.from_pretrained(directory, policy=policy, **load_kwargs)
    elif policy is not None or load_kwargs:
        raise ValueError("model is already loaded: policy and from_pretrained arguments do not apply")
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(Path(tokenizer or model.checkpoint_dir))
    return TextGenerationPipeline(model, tokenizer, chat_template, owns_model=owns, **kwargs)


# -- inside transformers.pipeline -----------------------------------------------------------
class TransformersModelAdapter:
    """What ``transformers.pipeline("text-generation", model=...)`` needs of a model, with
    ``generate`` delegated to a ``FlexGenForCausalLM``. ``stop_strings`` (the pipeline's
    ``stop_sequence``) are honoured HF's way: the stop string is kept, the rest is padding."""

    def __init__(self, model):
        self.flexgen = model
        self.config, self.generation_config = model.config, model.generation_config
        self.name_or_path = model.name_or_path

    device = property(lambda self: self.flexgen.device)
    dtype = property(lambda self: self.flexgen.dtype)

    def can_generate(self) -> bool:
        return True

    def to(self, *args, **kwargs):
        return self  # placement is the policy's business; tensors come back on the CPU

    def eval(self):
        return self

    def generate(self, input_ids=None, attention_mask=None, stop_strings=None, tokenizer=None, **kwargs):
        out = self.flexgen.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        stops = [s for s in as_list(stop_strings) if s]
        if not stops:
            return out
        if tokenizer is None:
            raise ValueError("stop_strings needs generate(..., tokenizer=...), as in transformers")
        sequences = (out.sequences if hasattr(out, "sequences") else out).clone()
        pad = kwargs.get("pad_token_id", self.generation_config.pad_token_id) or 0
        width = input_ids.shape[1]
        for r in range(sequences.shape[0]):
            cut = stop_cut(tokenizer, sequences[r, width:].tolist(), stops, skip_special_tokens=True)
            if cut is not None:
                sequences[r, width + cut:] = pad
        if hasattr(out, "sequences"):
            out.sequences = sequences
            return out
        return sequences

    def __repr__(self):
        return f"TransformersModelAdapter({self.flexgen!r})"


def as_transformers_model(model) -> TransformersModelAdapter:
    """``transformers.pipeline("text-generation", model=as_transformers_model(m), tokenizer=tok)``.
    The adapter's class carries the checkpoint's architecture name (e.g. LlamaForCausalLM):
    transformers checks that name and logs an error for classes it does not know."""
    arch = (getattr(model.config, "architectures", None) or [None])[0]
    if not arch:
        return TransformersModelAdapter(model)
    return type(arch, (TransformersModelAdapter,), {"__module__": __name__})(model)


__all__ = ["Completion", "TextGenerationPipeline", "TransformersModelAdapter", "as_transformers_model",
           "check_prompt_lengths", "encode_prompts", "generate_all", "generate_blocks",
           "load_checkpoint_config", "pipeline", "plan_blocks", "padding_fraction", "run_blocks"]
