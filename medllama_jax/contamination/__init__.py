"""Contamination check: n-gram overlap between the MIBE evaluation sets and the training data.

``ngrams`` (normalisation and hashing), ``eval_sets`` (the test n-grams), ``sources`` (training data
as a document stream), ``scan`` (lookups and tallies), ``report``, ``decontaminate`` (a prepared
corpus without the overlapping documents), ``beam_scan`` (the scan as an Apache Beam pipeline),
``cli`` (``medllama-contamination``).
"""
