"""Launching training on machines we do not sit at: TPU VM slices through ``gcloud``, GPU nodes
through ``ssh``.

Every command is built as an argv list by pure functions (so tests can check it exactly) and the
command-line tool (``medllama_jax.cli.tpu``) prints each one before it runs it.
"""
