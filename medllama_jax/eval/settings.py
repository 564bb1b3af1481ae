"""How a model is asked for answers in an evaluation: a light module, so that ``medllama-eval``
shows these defaults in ``--help`` without importing the evaluator (jax, seqio)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  max_new_tokens: int = 256
  batch_size: int = 8
  stop_sequences: tuple[str, ...] = ()
  # Option ranking runs one forward pass per option (40 for MTSample); it can be left out.
  score_options: bool = True
  # Prompts are padded to a multiple of this, so that batches of similar length share a program.
  length_bucket: int = 64
  # A chat template (medllama_jax.chat) wraps every prompt as one user turn, as instruction tuning
  # and ``medllama-generate --chat`` do; None gives the task's prompt as it is (base models).
  chat_template: str | None = None
