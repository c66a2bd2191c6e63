"""Write the HELM config files (``model_metadata.yaml``, ``tokenizer_configs.yaml``,
``model_deployments.yaml``) that make a local checkpoint a HELM model served by hf_flexgen:

    PYTHONPATH=patches python -m helm_hf_flexgen.prod_env CHECKPOINT_DIR --name hf_flexgen/MODEL \\
        --out prod_env --client-arg percent="20 80 0 100 100 0" --client-arg gpu_batch_size=32
    PYTHONPATH=patches helm-run --local-path prod_env --run-entries mmlu:subject=anatomy,model=hf_flexgen/MODEL ...

HELM reads these files from ``--local-path`` (default ``prod_env``). Files there already are
replaced.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from transformers import AutoConfig, AutoTokenizer

CLIENT_CLASS = "helm_hf_flexgen.client.FlexGenClient"


def helm_configs(checkpoint: str | Path, name: str, client_args: dict | None = None,
                 max_sequence_length: int | None = None,
                 client_class: str = CLIENT_CLASS) -> dict[str, dict]:
    """File name -> content of the three HELM config files for ``checkpoint`` as ``name``
    (``client_class``: another HELM client, e.g. HELM's own Hugging Face client to compare)."""
    if "/" not in name:
        raise ValueError(f"HELM model names look like organization/model, got {name!r}")
    checkpoint = str(Path(checkpoint).resolve()) if Path(checkpoint).exists() else str(checkpoint)
    config, tokenizer = AutoConfig.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    length = max_sequence_length or getattr(config, "max_position_embeddings", None)
    if not length:
        raise ValueError("the config has no max_position_embeddings: pass max_sequence_length")
    source = {"pretrained_model_name_or_path": checkpoint}
    return {
        "model_metadata.yaml": {"models": [{
            "name": name, "display_name": name.split("/", 1)[1],
            "description": f"{checkpoint} run by hf_flexgen", "creator_organization_name": name.split("/")[0],
            "access": "open", "release_date": None,
            "tags": ["TEXT_MODEL_TAG", "FULL_FUNCTIONALITY_TEXT_MODEL_TAG"]}]},
        "tokenizer_configs.yaml": {"tokenizer_configs": [{
            "name": name,
            "tokenizer_spec": {"class_name": "helm.tokenizers.huggingface_tokenizer.HuggingFaceTokenizer",
                               "args": source},
            "end_of_text_token": tokenizer.eos_token or "", "prefix_token": tokenizer.bos_token or ""}]},
        "model_deployments.yaml": {"model_deployments": [{
            "name": name, "model_name": name, "tokenizer_name": name, "max_sequence_length": int(length),
            "client_spec": {"class_name": client_class, "args": {**source, **(client_args or {})}}}]},
    }


def write_prod_env(out: str | Path, *args, **kwargs) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for file_name, content in helm_configs(*args, **kwargs).items():
        (out / file_name).write_text(yaml.safe_dump(content, sort_keys=False))
    return out


def _value(text: str):
    try:
        return json.loads(text)  # numbers, true/false, null
    except json.JSONDecodeError:
        return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint directory or hub id")
    parser.add_argument("--name", required=True, help="HELM model name, e.g. hf_flexgen/opt-30b")
    parser.add_argument("--out", default="prod_env", help="HELM --local-path directory")
    parser.add_argument("--client-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="FlexGenClient argument (policy=auto, percent=..., gpu_batch_size=...)")
    parser.add_argument("--max-sequence-length", type=int)
    args = parser.parse_args(argv)
    client_args = {}
    for item in args.client_arg:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--client-arg takes KEY=VALUE, got {item!r}")
        client_args[key] = _value(value)
    out = write_prod_env(args.out, args.checkpoint, args.name, client_args, args.max_sequence_length)
    print(f"wrote HELM configs for {args.name} to {out}/")


if __name__ == "__main__":
    main()
