"""The embedded default job: build a small LLaMA, round-trip it through the converters, generate.

  python -m medllama_jax.demo --out demo_output

Runs on CPU in about a minute with 8 simulated devices. Steps, each printed with where it wrote:
  1. train a SentencePiece tokenizer (LLaMA conventions) on the medical text shipped in the package;
  2. initialise a small LLaMA directly sharded on a data×fsdp×tensor = 2×2×2 mesh and save it as a
     model folder (Orbax ``params/`` + ``config.json`` + tokenizer);
  3. ``orbax-to-hf``: export it to a Hugging Face folder (sharded safetensors + index);
  4. ``hf-to-orbax``: import that folder back and check every tensor is bit-identical;
  5. generate from medical prompts with the KV-cache decoder on the same mesh.
The weights are random until the training stage exists, so the generated text is not meaningful.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from importlib import resources  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from medllama_jax import checkpointing, decode, loading, logs, partitioning, tokenizer  # noqa: E402
from medllama_jax.config import get_config  # noqa: E402
from medllama_jax.convert import hf  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402

DEMO_PROMPTS = ("The patient presented with", "Metformin is a first-line treatment for")


def demo_text_path() -> str:
  return str(resources.files("medllama_jax") / "demo_data" / "medical_notes.txt")


def build_model_folder(out_dir: str, mesh: jax.sharding.Mesh, vocab_size: int = 1024,
                       seed: int = 0) -> str:
  """A small random LLaMA with a tokenizer trained on the demo text, saved as a model folder."""
  os.makedirs(out_dir)
  sp_model = tokenizer.train_sentencepiece(demo_text_path(), os.path.join(out_dir, "tokenizer"),
                                           vocab_size)
  os.replace(sp_model, os.path.join(out_dir, tokenizer.SENTENCEPIECE_FILE))
  os.remove(os.path.join(out_dir, "tokenizer.vocab"))
  tokenizer.write_hf_tokenizer_config(out_dir, tokenizer.load_tokenizer(out_dir))
  config = get_config("small", vocab_size=vocab_size, num_layers=4, hidden_size=256,
                      intermediate_size=688, num_heads=8, num_kv_heads=4, scan_layers=False)
  rules = partitioning.logical_axis_rules()
  params = partitioning.init_params(Llama(config), mesh, rules, jax.random.key(seed))
  checkpointing.save_params(os.path.join(out_dir, checkpointing.PARAMS_DIR), params)
  config.save_hf_json(out_dir)
  return out_dir


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m medllama_jax.demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="demo_output", help="folder for everything the demo writes")
  parser.add_argument("--mesh", default="2,2,2", help="data,fsdp,tensor sizes")
  parser.add_argument("--max_new_tokens", type=int, default=24)
  args = parser.parse_args(argv)
  logs.setup()
  out = os.path.abspath(args.out)
  if os.path.exists(out):
    shutil.rmtree(out)
  mesh = partitioning.make_mesh(**partitioning.parse_mesh_spec(args.mesh))
  print(f"[1/5] devices: {jax.device_count()} × {jax.devices()[0].platform}, mesh {dict(mesh.shape)}")

  model_dir = build_model_folder(os.path.join(out, "model"), mesh)
  print(f"[2/5] model folder (Orbax params + config.json + tokenizer): {model_dir}")

  hf_dir = hf.orbax_to_hf(model_dir, os.path.join(out, "hf_export"), max_shard_bytes=4 * 1024**2)
  print(f"[3/5] Hugging Face export (transformers loads it): {hf_dir}")

  reimported = os.path.join(out, "reimported")
  hf.hf_to_orbax(hf_dir, reimported)
  original = os.path.join(model_dir, checkpointing.PARAMS_DIR)
  copy = os.path.join(reimported, checkpointing.PARAMS_DIR)
  names = list(checkpointing.params_metadata(original))
  a, b = checkpointing.read_tensors(original, names), checkpointing.read_tensors(copy, names)
  if not all(np.array_equal(a[n], b[n]) for n in names):
    print("round trip changed the weights", file=sys.stderr)
    return 1
  print(f"[4/5] HF → Orbax re-import, {len(names)} tensors bit-identical: {reimported}")

  loaded = loading.load_model(reimported, mesh)
  tok = loaded.tokenizer
  sampling = decode.SamplingConfig(max_new_tokens=args.max_new_tokens)
  outputs = decode.generate(loaded.model, loaded.params, [tok.encode(p) for p in DEMO_PROMPTS],
                            sampling, eos_ids=(tok.eos_id,), mesh=mesh, rules=loaded.rules)
  print("[5/5] greedy generation with the KV cache (random weights: the words are noise):")
  for prompt, ids in zip(DEMO_PROMPTS, outputs):
    print(f"      {prompt!r} → {tok.decode(ids)!r}")
  logging.info("demo finished")
  print(f"\nEverything is under {out}. Try:\n"
        f"  medllama-generate --model {reimported} --prompt 'Chest X-ray shows' --json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
