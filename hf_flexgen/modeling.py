"""FlexGenForCausalLM: a Hugging Face causal LM run by the block schedule with offloading."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .engine import BlockEngine, EngineStats
from .families import adapter_for
from .generation import TokenChooser, max_new_tokens, pad_id, resolve_generation_config
from .memory.checkpoint import CheckpointIndex
from .memory.compressed import CompressedWeights, linear_weight_keys
from .memory.resolve import cache_root, resolve_checkpoint_dir, safetensors_files
from .memory.weights import WeightStore
from .ops.attention import register_attention
from .placement import ModelLayout, Plan, Workload, load_or_measure, parse_max_memory, plan
from .placement.hardware import observe_disk_reads, sample_checkpoint_reads
from .calibration import layer_costs, observe_decode, observe_prefill
from .placement.limits import process_rss
from .placement.solver import check_minimum
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


def stage_checkpoint_keys(model, adapter, index: CheckpointIndex) -> list[dict[str, str]]:
    """Per stage (embedding, layers, head): HF parameter name -> checkpoint tensor name."""
    tied, prefix = adapter.tied_parameters(), model.base_model_prefix
    return [{n: checkpoint_key(n, index, tied, prefix) for n in names}
            for names in adapter.stage_parameters()]


def default_workload(config) -> Workload:
    """FlexGen's benchmark setting (prompt 512, 32 new tokens), within the context."""
    context = getattr(config, "max_position_embeddings", None) or 2048
    gen = min(32, context // 4)
    return Workload(prompt_len=min(512, context - gen), gen_len=gen, num_prompts=1024)


def model_layout(config, index: CheckpointIndex, device: torch.device) -> ModelLayout:
    """The stage tensors and attention shape the cost model needs (no weight is read)."""
    model = build_skeleton(config, device)
    keys = stage_checkpoint_keys(model, adapter_for(model), index)
    return ModelLayout.from_checkpoint(config, keys, index.locations, linear_weight_keys(model, keys))


def config_layout(config, storage_dtype: torch.dtype = torch.float16) -> ModelLayout:
    """The layout from a config alone (HF parameter names as keys, ``storage_dtype`` on
    disk): to plan for a model whose weights are not downloaded yet."""
    model = build_skeleton(config, torch.device("cpu"))
    adapter = adapter_for(model)
    tied = adapter.tied_parameters()
    stages = [{n: tied.get(n, n) for n in names} for names in adapter.stage_parameters()]
    shapes = {key: _Shape(tuple(model.get_parameter(key).shape), storage_dtype)
              for stage in stages for key in stage.values()}
    return ModelLayout.from_checkpoint(config, stages, shapes, linear_weight_keys(model, stages))


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]
    dtype: torch.dtype


def plan_policy(config, layout: ModelLayout, device: torch.device, dtype: torch.dtype,
                workload: Workload, max_memory: dict | None = None,
                base: Policy | None = None, disk_dir: Path | None = None,
                refresh_profile: bool = False, index: CheckpointIndex | None = None) -> Plan:
    """policy="auto": measure (once) this machine and one layer of this model shape, then
    solve for the fastest policy that fits ``max_memory`` (HF's convention; default: what is
    free, with a margin). Raises ``PlacementError`` before any weight is read when nothing fits.
    ``index``: the checkpoint, whose reads give the disk rate until runs have measured it."""
    disk_dir = Path(disk_dir) if disk_dir else Path(tempfile.gettempdir())
    limits = parse_max_memory(max_memory, device, disk_dir)
    hardware = load_or_measure(device, dtype, disk_dir, refresh=refresh_profile)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    baseline = process_rss()
    base = base or Policy(overlap=True)
    check_minimum(base, limits, layout, workload, hardware, itemsize, baseline)
    if index is not None:  # the disk rate from the checkpoint itself, until runs teach it
        sample_checkpoint_reads(index, device)
        hardware = load_or_measure(device, dtype, disk_dir)
    measured = layer_costs(config, build_skeleton(config, device), device, dtype, refresh=refresh_profile)
    return plan(layout, workload, hardware, limits, itemsize, baseline, base=base, measured=measured)


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
        stage_keys = stage_checkpoint_keys(self.model, self.adapter, index)
        compressed = None
        if policy.compress_weight:
            keys = linear_weight_keys(self.model, stage_keys)  # linear layers only
            compressed = CompressedWeights(index, keys, policy.comp_weight_config,
                                           cache_root() / "compressed")
        self.store = WeightStore(index, stage_keys, policy.shares("w"), device, dtype,
                                 pin_memory=policy.pin_weight, compressed=compressed,
                                 vocab_size=config.vocab_size)
        self.engine = BlockEngine(self.adapter, self.store, policy, device, self.offload_dir)
        self.last_stats: dict = {}
        self.plan: Plan | None = None  # set by policy="auto": the prediction and runners-up

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, policy: Policy | str | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        offload_dir: str | os.PathLike | None = None, revision: str | None = None,
                        token: str | None = None, max_memory: dict | None = None,
                        workload: Workload | None = None,
                        auto_base: Policy | None = None) -> "FlexGenForCausalLM":
        """Load a local checkpoint directory or a hub model id.

        ``policy``: a :class:`Policy` (default: everything on the compute device, micro-batch
        of 8), or ``"auto"``: the fastest placement and block shape that fit ``max_memory``
        (HF's convention, e.g. ``{"cuda:0": "16GiB", "cpu": "64GiB", "disk": "500GiB"}``;
        default: what is free now, with a margin) for ``workload`` (prompt length, new tokens,
        number of prompts; default 512 / 32 / 1024), keeping ``auto_base``'s overlap,
        compression, delegation and sparsity settings (default: overlap on, no compression).
        ``device``: the compute device (default: ``cuda`` when present, else ``cpu``).
        ``dtype``: compute dtype (default fp32 on CPU, the checkpoint's half type on GPU).
        ``offload_dir``: where disk-homed KV cache goes (default: a temporary directory).
        """
        if isinstance(policy, str) and policy != "auto":
            raise ValueError(f"policy must be a hf_flexgen.Policy or 'auto', got {policy!r}")
        policy = policy if policy is not None else Policy()
        if not isinstance(policy, (Policy, str)):
            raise TypeError(f"policy must be a hf_flexgen.Policy or 'auto', got {type(policy).__name__}")
        if policy != "auto" and (max_memory is not None or workload is not None or auto_base is not None):
            raise ValueError("max_memory, workload and auto_base only apply to policy='auto'")
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
        chosen = None
        if policy == "auto":
            workload = workload or default_workload(config)
            chosen = plan_policy(config, model_layout(config, index, device), device, dtype,
                                 workload, max_memory, auto_base, disk_dir=offload_dir, index=index)
            policy = chosen.policy
        model = cls(config, index, policy, device, dtype, offload_dir, generation_config,
                    name_or_path=str(name_or_path), checkpoint_dir=directory)
        model.plan = chosen
        return model

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
        self._check_planned(prompt_len, new_tokens)
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
        self.record_stats(prompt_len, new_tokens)
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
        self.record_stats(input_ids.shape[1])
        return out

    def _check_planned(self, prompt_len: int, new_tokens: int) -> None:
        """An auto policy fits the memory for the planned sequence length, not longer ones."""
        if self.plan is None:
            return
        w = self.plan.workload
        if prompt_len + new_tokens > w.prompt_len + w.gen_len:
            raise ValueError(
                f"this model's policy='auto' was planned for {w.prompt_len} prompt + {w.gen_len} "
                f"new tokens, but this call needs {prompt_len} + {new_tokens}: its KV cache "
                "might not fit. Load it with workload=Workload(prompt_len=..., gen_len=..., "
                "num_prompts=...) covering your longest prompt.")

    def score_continuations(self, pairs, max_length: int | None = None, **kwargs):
        """Prefill-only scoring of (context ids, continuation ids) pairs: one forward pass
        per block, no KV cache kept; see :func:`hf_flexgen.scoring.score_continuations`."""
        return score_continuations(self, pairs, max_length, **kwargs)

    def score_rolling(self, texts, prefix_token: int, max_length: int | None = None, **kwargs):
        """Every token of each text scored; see :func:`hf_flexgen.scoring.score_rolling`."""
        return score_rolling(self, texts, prefix_token, max_length, **kwargs)

    def record_stats(self, prompt_len: int | None = None, new_tokens: int = 0) -> None:
        """Keep the engine's figures of the last call as ``last_stats``, and teach the
        machine's profiles the disk read rate and (for prompts of ``prompt_len`` and up to
        ``new_tokens`` generated) the prefill rate and decode overhead they show
        (hardware.observe_disk_reads, calibration.observe_prefill / observe_decode)."""
        stats = self.engine.stats
        self.last_stats = stats.as_dict()
        observe_disk_reads(self.device, stats.weight_bytes_read, stats.weight_read_s,
                           stats.weight_reads)
        if prompt_len is not None:
            observe_prefill(self.config, self.device, self.dtype, self.last_stats, prompt_len,
                            self.adapter.num_layers)
            observe_decode(self.config, self.device, self.dtype, self.last_stats, self.policy,
                           prompt_len + new_tokens, self.adapter.num_layers)

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
