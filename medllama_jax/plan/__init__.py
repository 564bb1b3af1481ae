"""``medllama-plan``: ahead-of-time memory and FLOPs planning of a training recipe for a TPU slice or
GPUs, by compiling its train step on abstract shapes (see ``cli.py``)."""
