"""Registers the pre-training Task that tests/test_seqio_cache.py caches, when imported.

``seqio_cache_tasks --module_import`` imports a module in the launching process and again in every
Beam worker, where the TaskRegistry starts empty; registration therefore happens at import, from
the corpus and tokenizer folders the test names in the environment (inherited by the workers).
"""

import os

from seqio_tasks.pretrain import register_text_task

TASK = "seqio_cache_test_pubmed_abstracts"
CORPUS_ENV, VOCABULARY_ENV = "MEDLLAMA_CACHE_TEST_CORPUS", "MEDLLAMA_CACHE_TEST_VOCABULARY"

register_text_task(TASK, os.environ[CORPUS_ENV], os.environ[VOCABULARY_ENV], ("pubmed_xml",))
