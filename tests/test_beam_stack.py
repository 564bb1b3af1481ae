"""The ``beam`` extra installs and imports with the whole stack, and a Beam pipeline runs on it.

apache-beam pins protobuf below 7; sentencepiece 0.2.2+ ships protos generated for protobuf 7,
which then fail to import. The extra pins a sentencepiece whose generated code accepts the
protobuf Beam allows, so Beam, seqio's cache pipeline, TensorFlow, sentencepiece's protos and
this project import together (``setup.py``). The pipeline here tokenizes with the project's seqio
vocabulary inside Beam's DirectRunner (the vocabulary is pickled to the workers), as seqio's cache
and a Beam corpus preparer do.
"""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import google.protobuf
import seqio
import seqio.beam_utils  # noqa: F401  (seqio's cache pipeline imports)
from apache_beam.testing.util import assert_that, equal_to
from sentencepiece import sentencepiece_model_pb2

import tokenizer_families as families
from medllama_jax.data.vocab import model_vocabulary


def test_generated_protos_import_under_beams_protobuf():
  assert int(google.protobuf.__version__.split(".")[0]) < 7
  proto = sentencepiece_model_pb2.ModelProto()
  assert proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM  # its default


def test_a_pipeline_tokenizes_with_the_projects_vocabulary(tmp_path: Path):
  folder = families.build("sentencepiece_llama2", tmp_path / "tokenizer")
  vocabulary = model_vocabulary(str(folder))
  lines = [line for line in Path(families.demo_text_path()).read_text().splitlines() if line][:40]
  expected = sum(len(vocabulary.encode(line)) for line in lines)
  assert expected > len(lines)
  with beam.Pipeline(runner="DirectRunner") as pipeline:
    counted = (pipeline
               | beam.Create(lines)
               | beam.Map(lambda text, vocab: len(vocab.encode(text)), vocab=vocabulary)
               | beam.CombineGlobally(sum))
    assert_that(counted, equal_to([expected]))
  assert isinstance(vocabulary, seqio.Vocabulary)
