"""Training data: corpus preparation, seqio preprocessing and feature conversion, the trainer's input."""
