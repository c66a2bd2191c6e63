"""HELM client whose requests run on hf_flexgen (``class_name:
helm_hf_flexgen.client.FlexGenClient`` in a model deployment; see ``prod_env.py``).

The model is loaded once per (checkpoint, load arguments) and used from one worker thread;
concurrent ``make_request`` calls (``helm-run --num-threads N``) with the same generation
arguments share blocks of the schedule.
"""
from __future__ import annotations

import threading
from typing import Any, ClassVar

from helm.clients.client import CachingClient, truncate_sequence
from helm.common.cache import CacheConfig
from helm.common.hierarchical_logger import hexception, hlog
from helm.common.request import (EMBEDDING_UNAVAILABLE_REQUEST_RESULT, GeneratedOutput, Request,
                                 RequestResult, Token, wrap_request_time)
from helm.proxy.retry import NonRetriableException
from helm.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer
from helm.tokenizers.tokenizer import Tokenizer

from hf_flexgen import FlexGenForCausalLM
from hf_flexgen_args import build_policy, parse_dtype

from .batcher import RequestBatcher
from .runner import batch_key, serve


class _Server:
    """One loaded model and the batcher feeding it."""

    _servers: ClassVar[dict[tuple, _Server]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, pretrained: str, tokenizer, load_args: dict, batch_wait_s: float):
        policy = build_policy(load_args.get("policy"), load_args.get("percent"),
                              **{k: v for k, v in load_args.items()
                                 if k not in ("policy", "percent", "device", "dtype", "offload_dir")})
        self.model = FlexGenForCausalLM.from_pretrained(
            pretrained, policy=policy, device=load_args.get("device"),
            dtype=parse_dtype(load_args.get("dtype")), offload_dir=load_args.get("offload_dir"))
        self.tokenizer = tokenizer
        self.batcher = RequestBatcher(self._run, max_batch=self.model.policy.block_size,
                                      wait_s=batch_wait_s)

    def _run(self, _key, raws: list[dict]) -> list[dict]:
        with self.tokenizer as tokenizer:  # HELM's wrapped tokenizer: a lock around the HF one
            return serve(self.model, tokenizer, raws)

    @classmethod
    def get(cls, pretrained: str, tokenizer, load_args: dict, batch_wait_s: float) -> _Server:
        key = (pretrained, repr(sorted(load_args.items())))
        with cls._lock:
            if key not in cls._servers:
                hlog(f"hf_flexgen: loading {pretrained} ({load_args})")
                cls._servers[key] = cls(pretrained, tokenizer, load_args, batch_wait_s)
            return cls._servers[key]


class FlexGenClient(CachingClient):
    """``args`` in the deployment: ``pretrained_model_name_or_path``; ``policy`` ("auto") or
    ``percent`` ("W_GPU W_CPU CACHE_GPU CACHE_CPU ACT_GPU ACT_CPU") with ``gpu_batch_size``,
    ``num_gpu_batches``, ``overlap``, ``compress_weight``, ``compress_cache``, ...; ``device``,
    ``dtype`` ("float32", "float16", "bfloat16"), ``offload_dir``; ``apply_chat_template``
    (default: whether the tokenizer has a chat template, as HELM's Hugging Face client does);
    ``end_of_text_token``; ``batch_wait_s`` (how long a request waits for others to share
    its block, default 0.05)."""

    def __init__(self, cache_config: CacheConfig, tokenizer: Tokenizer,
                 pretrained_model_name_or_path: str, end_of_text_token: str | None = None,
                 apply_chat_template: bool | None = None, batch_wait_s: float = 0.05,
                 **load_args: Any):
        super().__init__(cache_config=cache_config)
        if not isinstance(tokenizer, HuggingFaceTokenizer):
            raise TypeError(f"the tokenizer of {pretrained_model_name_or_path} must be a HELM "
                             f"HuggingFaceTokenizer (tokenizer_configs.yaml), got {type(tokenizer).__name__}")
        self.pretrained = str(pretrained_model_name_or_path)
        self.wrapped_tokenizer = tokenizer.get_wrapped_tokenizer()
        self.end_of_text_token = end_of_text_token
        self.load_args, self.batch_wait_s = load_args, float(batch_wait_s)
        if apply_chat_template is None:
            with self.wrapped_tokenizer as hf_tokenizer:
                apply_chat_template = bool(getattr(hf_tokenizer, "chat_template", None))
        self.apply_chat_template = apply_chat_template

    def prompt_text(self, request: Request) -> str:
        if request.prompt and request.messages:
            raise NonRetriableException("set one of prompt and messages in a request, not both")
        if not self.apply_chat_template:
            if request.messages:
                raise NonRetriableException("chat messages need a chat model (apply_chat_template: true)")
            return request.prompt
        messages = request.messages or [{"role": "user", "content": request.prompt}]
        with self.wrapped_tokenizer as tokenizer:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def make_request(self, request: Request) -> RequestResult:
        if request.embedding:
            return EMBEDDING_UNAVAILABLE_REQUEST_RESULT
        raw = {"engine": request.model_engine, "prompt": self.prompt_text(request),
               "temperature": request.temperature, "num_completions": request.num_completions,
               "max_tokens": request.max_tokens, "top_p": request.top_p,
               "echo_prompt": request.echo_prompt, "stop_sequences": list(request.stop_sequences)}
        try:
            def compute() -> dict:
                server = _Server.get(self.pretrained, self.wrapped_tokenizer, self.load_args,
                                     self.batch_wait_s)
                return server.batcher.submit(batch_key(raw), raw)

            response, cached = self.cache.get(CachingClient.make_cache_key(raw, request),
                                              wrap_request_time(compute))
        except Exception as err:  # noqa: BLE001  (HELM's contract: a failed result, not a raise)
            hexception(err)
            return RequestResult(success=False, cached=False, error=f"hf_flexgen error: {err}",
                                 completions=[], embedding=[])
        completions = []
        for raw_completion in response["completions"]:
            tokens = [Token(text=t, logprob=lp)
                      for t, lp in zip(raw_completion["tokens"], raw_completion["logprobs"])]
            completion = GeneratedOutput(text=raw_completion["text"],
                                         logprob=sum(t.logprob for t in tokens), tokens=tokens)
            completions.append(truncate_sequence(completion, request, end_of_text_token=self.end_of_text_token))
        return RequestResult(success=True, cached=cached, request_time=response["request_time"],
                             request_datetime=response.get("request_datetime"),
                             completions=completions, embedding=[])
