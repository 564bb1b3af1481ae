"""The console commands (``medllama-train``, ``medllama-eval``, ...), one module each.

Every command module imports only the standard library and light project modules at the top, so
``--help`` and argument mistakes answer at once; jax, TensorFlow and seqio are imported inside
``main`` once the arguments are known. ``console`` gives every command the same behaviour: details
in a log file, one line per stage and live progress on the console, one line per error.
"""
