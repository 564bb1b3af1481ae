"""TPU slice (or GPU nodes) launch tool: create, install, launch, logs, status, stop, delete.

  python scripts/tpu/medllama_tpu.py --help
  python scripts/tpu/medllama_tpu.py launch --help

Every command is printed before it runs; --dry_run prints them only. The commands are built by
medllama_jax/launch/ (see medllama_jax/cli/tpu.py for the options).
"""

import sys

from medllama_jax.cli import tpu as cli

if __name__ == "__main__":
  sys.exit(cli.main())
