"""Tests for benchmarks/make_checkpoint.py (random-weight OPT checkpoints)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import OPTConfig, OPTForCausalLM

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "make_checkpoint.py"
_spec = importlib.util.spec_from_file_location("make_checkpoint", _SCRIPT)
mc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mc)

SMALL_SHARD = 64 << 20  # opt-350m in fp16 (0.66 GB) -> ~11 shards

# name, dtype, max_shard_bytes
CASES = {
    "opt-125m": (torch.float32, 2**30),
    "opt-350m": (torch.float16, SMALL_SHARD),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for name, (dtype, shard) in CASES.items():
        d = tmp_path_factory.mktemp(name)
        assert mc.make_checkpoint(name, d, dtype=dtype, seed=0, max_shard_bytes=shard) == d
        out[name] = d
    return out


@pytest.fixture
def tiny(monkeypatch):
    """A very small OPT shape, registered in SHAPES for this test only."""
    kw = mc._opt(64, 2, 4, 128, vocab_size=1000, max_position_embeddings=64)
    monkeypatch.setitem(mc.SHAPES, "opt-tiny", kw)
    return "opt-tiny"


def _read_all(d: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                assert k not in tensors, f"{k} stored twice"
                tensors[k] = sf.get_tensor(k)
    return tensors


def _shapes(d: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                out[k] = (f.name, tuple(sl.get_shape()), sl.get_dtype())
    return out


def _mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


def _age(d: Path) -> None:
    """Move every mtime into the past so that a rewrite is detectable."""
    for p in d.iterdir():
        os.utime(p, ns=(10**18, 10**18))


@pytest.mark.parametrize("name", list(CASES))
def test_keys_and_shapes_match_hf_model(ckpts, name):
    d = ckpts[name]
    dtype, _ = CASES[name]
    config = OPTConfig.from_pretrained(d)
    # config.json carries the real hyper-parameters and the dtype
    for k, v in mc.SHAPES[name].items():
        assert getattr(config, k) == v, k
    assert config.dtype in (dtype, str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        ref = OPTForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert all(k.startswith("model.decoder.") for k in expected)
    stored = _shapes(d)
    assert set(stored) == set(expected)
    for k, shape in expected.items():
        assert stored[k][1] == shape, k
    want = {torch.float32: "F32", torch.float16: "F16"}[dtype]
    assert {v[2] for v in stored.values()} == {want}
    if name == "opt-350m":
        assert "model.decoder.project_in.weight" in stored
        assert "model.decoder.final_layer_norm.weight" not in stored  # post-LN model


@pytest.mark.parametrize("name", list(CASES))
def test_from_pretrained_loads_and_runs(ckpts, name):
    d = ckpts[name]
    dtype, _ = CASES[name]
    model, info = OPTForCausalLM.from_pretrained(d, output_loading_info=True)
    assert set(info["missing_keys"]) <= {"lm_head.weight"}
    assert not info["unexpected_keys"]
    assert not info.get("mismatched_keys")
    assert model.dtype == dtype
    emb = model.model.decoder.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()  # tied
    # the weights really come from the files (not re-initialised)
    with safe_open(d / json.loads((d / mc.INDEX_NAME).read_text())["weight_map"][
        "model.decoder.layers.0.fc1.weight"], framework="pt") as sf:
        assert torch.equal(sf.get_tensor("model.decoder.layers.0.fc1.weight"),
                           model.model.decoder.layers[0].fc1.weight.detach())
    model.eval()
    ids = torch.tensor([[2, 133, 2335, 16, 10, 1359, 9]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 50272)
    assert torch.isfinite(logits).all()
    assert logits.float().std() > 0


@pytest.mark.parametrize("name", list(CASES))
def test_index_and_values(ckpts, name):
    d = ckpts[name]
    _, shard = CASES[name]
    index = json.loads((d / mc.INDEX_NAME).read_text())
    tensors = _read_all(d)
    stored = _shapes(d)
    assert set(index["weight_map"]) == set(tensors)
    for k, fname in index["weight_map"].items():
        assert stored[k][0] == fname
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    files = sorted(p.name for p in d.glob("*.safetensors"))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(files)
    # shard size limit (a shard may exceed it only with a single tensor)
    per_file: dict[str, list[int]] = {}
    for k, t in tensors.items():
        per_file.setdefault(stored[k][0], []).append(t.numel() * t.element_size())
    for sizes in per_file.values():
        assert sum(sizes) <= shard or len(sizes) == 1
    if shard == SMALL_SHARD:
        assert n > 1
    # values: N(0, 0.02) matrices, layer norms 1/0, biases 0
    w = tensors["model.decoder.layers.0.fc1.weight"].float()
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert torch.all(tensors["model.decoder.layers.0.self_attn_layer_norm.weight"] == 1)
    assert torch.all(tensors["model.decoder.layers.0.self_attn_layer_norm.bias"] == 0)
    assert torch.all(tensors["model.decoder.layers.0.fc1.bias"] == 0)
    # the files pass safetensors' own (strict) loader; values are reproducible
    some = stored["model.decoder.layers.1.self_attn.q_proj.weight"][0]
    strict = load_file(d / some)
    assert all(torch.equal(strict[k], tensors[k]) for k in strict)
    k = "model.decoder.embed_tokens.weight"
    assert torch.equal(mc._make_tensor(k, tensors[k].shape, "normal", tensors[k].dtype, 0), tensors[k])
    # generation_config.json is there
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 1


def test_second_call_is_skipped(ckpts):
    for name, (dtype, shard) in CASES.items():
        d = ckpts[name]
        before = _mtimes(d)
        assert mc.make_checkpoint(name, d, dtype=dtype, seed=0, max_shard_bytes=shard) == d
        assert _mtimes(d) == before
        assert mc.checkpoint_is_complete(d, name, dtype, 0)
        assert not mc.checkpoint_is_complete(d, name, dtype, 1)


def test_missing_marker_or_shard_is_rewritten(tiny, tmp_path):
    d = tmp_path / "a"
    mc.make_checkpoint(tiny, d, dtype=torch.float32, max_shard_bytes=4000)
    first = _read_all(d)
    assert len(list(d.glob("*.safetensors"))) > 1

    _age(d)
    (d / mc.MARKER_NAME).unlink()
    before = _mtimes(d)
    mc.make_checkpoint(tiny, d, dtype=torch.float32, max_shard_bytes=4000)
    after = _mtimes(d)
    shards = [p for p in before if p.endswith(".safetensors")]
    assert all(after[p] != before[p] for p in shards)
    assert mc.MARKER_NAME in after
    second = _read_all(d)
    assert second.keys() == first.keys() and all(torch.equal(first[k], second[k]) for k in first)

    # a truncated shard under a valid marker is detected too
    victim = sorted(d.glob("model-*.safetensors"))[0]
    victim.write_bytes(b"partial")
    assert not mc.checkpoint_is_complete(d, tiny, torch.float32, 0)
    mc.make_checkpoint(tiny, d, dtype=torch.float32, max_shard_bytes=4000)
    assert mc.checkpoint_is_complete(d, tiny, torch.float32, 0)
    assert all(torch.equal(first[k], v) for k, v in _read_all(d).items())


def test_other_seed_or_dtype_rewrites_and_cleans_stale_shards(tiny, tmp_path):
    d = tmp_path / "b"
    mc.make_checkpoint(tiny, d, dtype=torch.float32, max_shard_bytes=4000)
    n_small = len(list(d.glob("*.safetensors")))
    assert n_small > 1
    ref = _read_all(d)
    # sharding does not change the values; a new seed does; stale shards are removed
    mc.make_checkpoint(tiny, d, dtype=torch.float32, seed=1)
    assert [p.name for p in d.glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]
    other = _read_all(d)
    assert not torch.equal(other["model.decoder.layers.0.fc1.weight"], ref["model.decoder.layers.0.fc1.weight"])
    mc.make_checkpoint(tiny, d, dtype=torch.float32, seed=0)
    same = _read_all(d)
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    # bf16 of the same seed = rounded fp32 values
    mc.make_checkpoint(tiny, d, dtype="bfloat16", seed=0)
    bf = _read_all(d)
    assert bf["model.decoder.layers.1.fc2.weight"].dtype == torch.bfloat16
    assert torch.equal(bf["model.decoder.layers.1.fc2.weight"], ref["model.decoder.layers.1.fc2.weight"].bfloat16())
    model, info = OPTForCausalLM.from_pretrained(d, output_loading_info=True)
    assert model.dtype == torch.bfloat16 and not info["unexpected_keys"]


def test_unknown_name_and_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="opt-125m.*opt-66b"):
        mc.make_checkpoint("opt-7b", tmp_path / "x")
    with pytest.raises(ValueError, match="dtype"):
        mc.make_checkpoint("opt-125m", tmp_path / "x", dtype=torch.int8)
    assert not (tmp_path / "x").exists()


def test_not_enough_disk_space(monkeypatch, tmp_path):
    usage = SimpleNamespace(total=10**12, used=10**12 - 10**6, free=10**6)
    monkeypatch.setattr(mc.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(mc.NotEnoughDiskSpaceError, match=r"needs 59\.97 GB"):
        mc.make_checkpoint("opt-30b", tmp_path / "big")
    assert not (tmp_path / "big").exists()


def test_shapes_table():
    expect = {  # hidden, layers, heads, ffn, word_embed_proj_dim, pre-LN, ~params (B)
        "opt-125m": (768, 12, 12, 3072, 768, True, 0.125),
        "opt-350m": (1024, 24, 16, 4096, 512, False, 0.331),
        "opt-1.3b": (2048, 24, 32, 8192, 2048, True, 1.316),
        "opt-6.7b": (4096, 32, 32, 16384, 4096, True, 6.658),
        "opt-13b": (5120, 40, 40, 20480, 5120, True, 12.853),
        "opt-30b": (7168, 48, 56, 28672, 7168, True, 29.975),
        "opt-66b": (9216, 64, 72, 36864, 9216, True, 65.720),
    }
    assert list(mc.SHAPES) == list(expect)
    for name, (h, l, a, f, w, pre, params) in expect.items():
        kw = mc.SHAPES[name]
        assert (kw["hidden_size"], kw["num_hidden_layers"], kw["num_attention_heads"], kw["ffn_dim"],
                kw["word_embed_proj_dim"], kw["do_layer_norm_before"]) == (h, l, a, f, w, pre)
        assert kw["vocab_size"] == 50272 and kw["max_position_embeddings"] == 2048
        with torch.device("meta"):
            m = OPTForCausalLM(OPTConfig(**kw))
        n = sum(p.numel() for p in m.parameters())  # tied lm_head counted once
        assert abs(n / 1e9 - params) < 1e-3, name


def test_cli(tiny, tmp_path, capsys):
    d = tmp_path / "cli"
    assert mc.main([tiny, "--out", str(d), "--dtype", "float32", "--seed", "3"]) == 0
    assert mc.checkpoint_is_complete(d, tiny, torch.float32, 3)
    assert mc.main(["opt-7b", "--out", str(d)]) == 2
    assert capsys.readouterr().out == ""
