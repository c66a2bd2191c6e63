"""lm-evaluation-harness model ``hf_flexgen``: lm-eval's requests run by hf_flexgen.

``loglikelihood`` and ``loglikelihood_rolling`` go through hf_flexgen's scoring mode (one
prefill pass per block, ``hf_flexgen.scoring``), ``generate_until`` through the batch pipeline
(``hf_flexgen.pipeline.run_blocks``). Tokenization, truncation, stop sequences and rolling
windows follow lm-eval's own ``hf`` model, so both give the same metrics on one checkpoint.

lm-eval only knows models registered when it starts, so run its CLI through this module::

    python patches/lm_eval_hf_flexgen.py --model hf_flexgen \\
        --model_args pretrained=DIR_OR_HUB_ID,policy=auto --tasks ...

(or ``PYTHONPATH=patches python -m lm_eval_hf_flexgen ...``; from Python, ``import
lm_eval_hf_flexgen`` before ``lm_eval.simple_evaluate(model="hf_flexgen", ...)``).

``--model_args``: ``pretrained`` (required); the policy as ``policy=auto`` (hf_flexgen's
planner), or as FlexGen's placement ``percent=W_GPU:W_CPU:CACHE_GPU:CACHE_CPU:ACT_GPU:ACT_CPU``
(``:``, ``/`` or spaces between numbers) with ``gpu_batch_size``, ``num_gpu_batches``,
``overlap``, ``compress_weight``, ``compress_cache``, ``cpu_cache_compute``, ``attn_sparsity``
(without ``policy`` or ``percent``: everything on the compute device); ``device``, ``dtype``
(``float32``, ``float16``, ``bfloat16``), ``offload_dir``, ``revision``, ``tokenizer``,
``max_length`` (default: the model's context), ``max_gen_toks`` (default 256),
``add_bos_token``, ``prefix_token_id``, ``logits_chunk``. lm-eval's ``--batch_size`` is ignored:
blocks hold ``gpu_batch_size x num_gpu_batches`` requests.
"""
from __future__ import annotations

import logging

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from hf_flexgen import FlexGenForCausalLM
from hf_flexgen.pipeline import load_checkpoint_config, plan_blocks, run_blocks
from hf_flexgen.scoring import score_continuations, score_rolling
from hf_flexgen_args import build_policy, parse_dtype

logger = logging.getLogger(__name__)

MODEL_NAME = "hf_flexgen"


@register_model(MODEL_NAME)
class FlexGenLM(TemplateLM):
    """lm-eval's LM interface on a ``FlexGenForCausalLM``."""

    def __init__(self, pretrained, policy=None, percent=None, device=None, dtype=None,
                 offload_dir=None, revision=None, tokenizer=None, max_length=None,
                 max_gen_toks: int = 256, add_bos_token=None, prefix_token_id=None,
                 logits_chunk: int = 1024, batch_size=None, max_batch_size=None, **policy_flags):
        super().__init__()
        if batch_size not in (None, 1, "1") or max_batch_size is not None:
            logger.info("batch_size=%s ignored: hf_flexgen runs blocks of the policy's "
                        "gpu_batch_size x num_gpu_batches", batch_size)
        if isinstance(pretrained, FlexGenForCausalLM):
            self.model = pretrained
        else:
            directory, _ = load_checkpoint_config(pretrained, revision)
            self.model = FlexGenForCausalLM.from_pretrained(
                directory, policy=build_policy(policy, percent, **policy_flags), device=device,
                dtype=parse_dtype(dtype), offload_dir=offload_dir)
        self.tokenizer = (tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else
                          AutoTokenizer.from_pretrained(tokenizer or self.model.checkpoint_dir))
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.logits_chunk = int(logits_chunk)

    # -- what lm-eval asks of a model --------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return getattr(self.model.config, "max_position_embeddings", None) or 2048

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.decode(self.prefix_token_id)
            if bos and string.startswith(bos):  # already there: do not add another
                add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    # -- scoring -----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation) strings or None, context ids, continuation ids)."""
        scores = score_continuations(self.model, [(ctx, cont) for _, ctx, cont in requests],
                                     max_length=self.max_length, logits_chunk=self.logits_chunk,
                                     progress=not disable_tqdm)
        out = []
        for (strings, _, _), score in zip(requests, scores):
            answer = (score.total, score.is_greedy)
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        strings = [req.args[0] for req in requests]
        scores = score_rolling(self.model, [self.tok_encode(s) for s in strings],
                               prefix_token=self.prefix_token_id, max_length=self.max_length,
                               logits_chunk=self.logits_chunk, progress=not disable_tqdm)
        out = []
        for string, score in zip(strings, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), score.total)
            out.append(score.total)
        return out

    # -- generation --------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests sharing generation arguments run together through the batch pipeline
        (length-sorted blocks); completions end before the first stop string."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        results: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), desc="generate_until (hf_flexgen)", disable=disable_tqdm)
        for indices in groups.values():
            gen_kwargs = normalize_gen_kwargs(args[indices[0]][1], self.max_gen_toks)
            until = handle_stop_sequences(gen_kwargs.pop("until", None), eos=eos)
            max_new = gen_kwargs.pop("max_gen_toks")
            room = self.max_length - max_new
            if room <= 0:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for the prompt in "
                                 f"max_length={self.max_length}: lower max_gen_toks or raise max_length")
            if not gen_kwargs.get("do_sample"):
                gen_kwargs.pop("temperature", None)
            encoded = [self.tok_encode(args[i][0])[-room:] for i in indices]
            blocks = plan_blocks([len(e) for e in encoded], self.model.policy.block_size)
            for block in run_blocks(self.model, self.tokenizer, encoded, blocks, stop=None,
                                    max_new_tokens=max_new, **gen_kwargs):
                for c in block:
                    text = postprocess_generated_text(c.text, until, None)
                    results[indices[c.index]] = text
                    self.cache_hook.add_partial("generate_until", args[indices[c.index]], text)
                bar.update(len(block))
        bar.close()
        return results


def main() -> None:
    """lm-eval's command line, with ``--model hf_flexgen`` registered."""
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
