"""seqio Task and Mixture registrations for Me-LLaMA pre-training, instruction tuning and MIBE."""
