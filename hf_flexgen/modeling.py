"""FlexGenForCausalLM: a Hugging Face causal LM run by the block schedule with offloading."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .engine import BlockEngine, EngineStats
from .families import adapter_for
from .generation import TokenChooser, max_new_tokens, pad_id, resolve_generation_config
from .memory.checkpoint import CheckpointIndex
from .memory.compressed import CompressedWeights
from .memory.resolve import cache_root, resolve_checkpoint_dir, safetensors_files
from .memory.weights import WeightStore
from .ops.attention import register_attention
from .policy import Policy
from .scoring import score_continuations, score_rolling

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device, config) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32  # half-precision matmuls are slow on most CPUs
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return stored if stored in (torch.float16, torch.bfloat16) else torch.float16


def build_skeleton(config, device: torch.device) -> torch.nn.Module:
    """The HF model with parameters on ``meta`` (weights are supplied per call) and its
    non-persistent buffers (e.g. rotary ``inv_freq``) real, on the compute device."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=register_attention())
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return model.eval()


def checkpoint_key(name: str, index: CheckpointIndex, tied: dict[str, str], prefix: str) -> str:
    """The checkpoint tensor holding HF parameter ``name`` (prefix and tie differences)."""
    name = tied.get(name, name)
    candidates = [name]
    if name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1:])
    else:
        candidates.append(f"{prefix}.{name}")
    for key in candidates:
        if key in index:
            return key
    raise KeyError(f"checkpoint has no tensor for parameter {name!r} (tried {candidates})")


class FlexGenForCausalLM:
    """Drop-in for ``AutoModelForCausalLM`` + ``generate()`` on models larger than memory."""

    def __init__(self, config, index: CheckpointIndex, policy: Policy, device: torch.device,
                 dtype: torch.dtype, offload_dir: Path | None,
                 generation_config: GenerationConfig | None = None, name_or_path: str = "",
                 checkpoint_dir: Path | None = None):
        self.config, self.policy, self.device, self.dtype = config, policy, device, dtype
        self.name_or_path, self.checkpoint_dir = name_or_path, checkpoint_dir
        self.generation_config = generation_config or GenerationConfig.from_model_config(config)
        self._own_offload_dir = offload_dir is None
        self.offload_dir = Path(offload_dir) if offload_dir else Path(tempfile.mkdtemp(prefix="hf_flexgen_"))
        self.model = build_skeleton(config, device)
        self.adapter = adapter_for(self.model)
        tied = self.adapter.tied_parameters()
        prefix = self.model.base_model_prefix
        stage_keys = [{n: checkpoint_key(n, index, tied, prefix) for n in names}
                      for names in self.adapter.stage_parameters()]
        compressed = None
        if policy.compress_weight:
            keys = [k for stage in stage_keys for k in stage.values()]
            compressed = CompressedWeights(index, keys, policy.comp_weight_config,
                                           cache_root() / "compressed")
        self.store = WeightStore(index, stage_keys, policy.shares("w"), device, dtype,
                                 pin_memory=policy.pin_weight, compressed=compressed)
        self.engine = BlockEngine(self.adapter, self.store, policy, device, self.offload_dir)
        self.last_stats: dict = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, policy: Policy | str | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        offload_dir: str | os.PathLike | None = None, revision: str | None = None,
                        token: str | None = None) -> "FlexGenForCausalLM":
        """Load a local checkpoint directory or a hub model id.

        ``policy``: a :class:`Policy` (default: everything on the compute device, micro-batch
        of 8). ``device``: the compute device (default: ``cuda`` when present, else ``cpu``).
        ``dtype``: compute dtype (default fp32 on CPU, the checkpoint's half type on GPU).
        ``offload_dir``: where disk-homed KV cache goes (default: a temporary directory).
        """
        if isinstance(policy, str):
            raise NotImplementedError(
                f"policy={policy!r} is not supported yet; pass a hf_flexgen.Policy")
        policy = policy if policy is not None else Policy()
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a hf_flexgen.Policy, got {type(policy).__name__}")
        directory = resolve_checkpoint_dir(name_or_path, revision=revision, token=token)
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"{directory} has no config.json: not a transformers checkpoint")
        config = AutoConfig.from_pretrained(directory)
        if type(config) not in AutoModelForCausalLM._model_mapping:
            raise ValueError(f"{directory} holds a {config.model_type!r} model, which is not a "
                             "causal language model")
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device, config)
        try:
            generation_config = GenerationConfig.from_pretrained(directory)
        except OSError:
            generation_config = None
        index = CheckpointIndex(safetensors_files(directory))
        return cls(config, index, policy, device, dtype, offload_dir, generation_config,
                   name_or_path=str(name_or_path), checkpoint_dir=directory)

    # -- generation ------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 generation_config: GenerationConfig | None = None, **kwargs):
        """Like HF's ``generate`` for decoder-only models: returns prompt + new tokens
        (padded after EOS), or a ``GenerateDecoderOnlyOutput`` when
        ``return_dict_in_generate=True`` (``output_scores`` / ``output_logits`` supported)."""
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None or input_ids.ndim != 2:
            raise ValueError("generate() needs input_ids of shape (batch, prompt_length)")
        config = resolve_generation_config(self.generation_config, generation_config, **kwargs)
        input_ids = input_ids.cpu()
        if attention_mask is None:
            pad = pad_id(config)
            attention_mask = (input_ids != pad).long() if pad is not None else torch.ones_like(input_ids)
        attention_mask = attention_mask.cpu()
        if config.num_return_sequences and config.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        prompt_len = input_ids.shape[1]
        new_tokens = max_new_tokens(config, prompt_len)
        recorder = _ScoreRecorder(config, input_ids.shape[0])
        chooser = TokenChooser(config, prompt_len, self.device)
        outputs, block = [], self.policy.block_size
        self.engine.stats = EngineStats()
        for start in range(0, input_ids.shape[0], block):
            rows = slice(start, start + block)
            mbs = self.engine.start_micro_batches(input_ids[rows], attention_mask[rows], new_tokens)
            recorder.block_start = start
            self.engine.run_block(mbs, new_tokens, chooser, recorder if recorder.wanted else None)
            outputs += [mb.sequences.cpu() for mb in mbs]
        sequences = _pad_right(outputs, pad_id(config))
        self.last_stats = self.engine.stats.as_dict()
        if not config.return_dict_in_generate:
            return sequences
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=recorder.stack("scores"),
                                         logits=recorder.stack("logits"))

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              targets: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (rows, targets) of ``targets`` continuing each left-padded prompt,
        teacher-forced through the block schedule token by token, so the KV cache (and its
        compression, placement) is used exactly as in generation."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        steps = targets.shape[1]
        out = torch.empty(targets.shape, dtype=torch.float32)
        block_start = 0

        def record(mb, step, logits, _scores):
            rows = slice(block_start + mb.first_row, block_start + mb.first_row + len(logits))
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            out[rows, step] = logprobs.gather(1, mb.forced[:, step:step + 1]).squeeze(1).cpu()

        chooser = TokenChooser(GenerationConfig(do_sample=False), input_ids.shape[1], self.device)
        self.engine.stats = EngineStats()
        for block_start in range(0, input_ids.shape[0], self.policy.block_size):
            rows = slice(block_start, block_start + self.policy.block_size)
            mbs = self.engine.start_micro_batches(input_ids[rows].cpu(), attention_mask[rows].cpu(),
                                                  steps, forced=targets[rows].cpu())
            self.engine.run_block(mbs, steps, chooser, record)
        self.last_stats = self.engine.stats.as_dict()
        return out

    def score_continuations(self, pairs, max_length: int | None = None, **kwargs):
        """Prefill-only scoring of (context ids, continuation ids) pairs: one forward pass
        per block, no KV cache kept; see :func:`hf_flexgen.scoring.score_continuations`."""
        return score_continuations(self, pairs, max_length, **kwargs)

    def score_rolling(self, texts, prefix_token: int, max_length: int | None = None, **kwargs):
        """Every token of each text scored; see :func:`hf_flexgen.scoring.score_rolling`."""
        return score_rolling(self, texts, prefix_token, max_length, **kwargs)

    def close(self) -> None:
        self.engine.close()
        self.store.index.close()
        if self.store.compressed is not None:
            self.store.compressed.close()
        if self._own_offload_dir:
            shutil.rmtree(self.offload_dir, ignore_errors=True)

    def __repr__(self):
        return (f"FlexGenForCausalLM({self.name_or_path!r}, device={self.device}, "
                f"dtype={self.dtype}, policy={self.policy})")


def _pad_right(rows: list[torch.Tensor], pad: int | None) -> torch.Tensor:
    width = max(r.shape[1] for r in rows)
    if any(r.shape[1] < width for r in rows) and pad is None:
        raise RuntimeError("blocks stopped at different lengths but no pad_token_id is set")
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=pad or 0) for r in rows])


class _ScoreRecorder:
    """Collects per-step scores/logits of every row for ``return_dict_in_generate``.
    Rows whose sequence had finished (or whose micro-batch was skipped) hold -inf."""

    def __init__(self, config: GenerationConfig, batch: int):
        self.want = {"scores": bool(config.return_dict_in_generate and config.output_scores),
                     "logits": bool(config.return_dict_in_generate and config.output_logits)}
        self.batch, self.block_start = batch, 0
        self.steps: dict[str, list[torch.Tensor]] = {"scores": [], "logits": []}

    @property
    def wanted(self) -> bool:
        return any(self.want.values())

    def __call__(self, mb, step: int, logits: torch.Tensor, scores: torch.Tensor) -> None:
        rows = slice(self.block_start + mb.first_row, self.block_start + mb.first_row + len(logits))
        for kind, values in (("scores", scores), ("logits", logits)):
            if not self.want[kind]:
                continue
            while len(self.steps[kind]) <= step:
                self.steps[kind].append(torch.full((self.batch, values.shape[-1]), float("-inf")))
            self.steps[kind][step][rows] = values.float().cpu()

    def stack(self, kind: str):
        return tuple(self.steps[kind]) if self.want[kind] else None
