"""medllama-jax: the Me-LLaMA medical LLM family (LLaMA2 continual pre-training, instruction tuning,
MIBE evaluation) in JAX/Flax, sharded over a named mesh from one CPU to a TPU pod."""

from setuptools import find_packages, setup

setup(
    name="medllama-jax",
    version="0.1.0",
    description="Me-LLaMA in JAX/Flax: LLaMA2 sharded over a mesh, continual pre-training on seqio mixtures, HF/Meta converters, generation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["medllama_jax", "medllama_jax.*", "seqio_tasks", "seqio_tasks.*"]),
    package_data={"medllama_jax": ["demo_data/*", "demo_data/corpora/*", "demo_data/corpora/**/*",
                                   "demo_data/mibe/*", "demo_data/mibe/**/*"]},
    install_requires=[
        "absl-py>=2.1",
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11.20,<0.13",
        # Local and bucket (gs://) paths for run directories, model folders and results.
        "etils[epath]>=1.7",
        "seqio>=0.0.19",
        "tensorflow-datasets>=4.9",
        # 0.2.2+ ship protos generated for protobuf 7, which apache-beam (the beam extra) excludes;
        # 0.2.1's import under protobuf 4 to 7.
        "sentencepiece>=0.2,<0.2.2",
        "gin-config>=0.5",
        "clu>=0.0.10",
        "tensorboard>=2.15",
        "tokenizers>=0.20",
        "ml_dtypes>=0.5",
        "numpy>=1.26",
        "psutil>=5.9",
        # The Pile ships .jsonl.zst; the jsonl preparer reads it.
        "zstandard>=0.22",
        # ROUGE for the summarization tasks of MIBE (F1 and entity F1 are computed in numpy).
        "rouge-score>=0.1.2",
    ],
    extras_require={
        # Reading PyTorch pickles (HF pytorch_model*.bin, Meta consolidated.*.pth).
        "torch": ["torch==2.13.0"],
        # The demo's check that transformers loads the exported folder and gets the same logits.
        "hf": ["torch==2.13.0", "transformers>=4.45", "safetensors>=0.4"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            # Tokenization is checked against transformers 5's AutoTokenizer (its loading rules).
            "transformers>=5,<6",
            "safetensors>=0.4",
            # Reference libraries the evaluation metrics are checked against.
            "scikit-learn>=1.3",
            "seqeval>=1.2.2",
            "bert-score>=0.3.13",
            # libtpu, the version jax pins: tests compile for compile-only TPU devices (no TPU).
            "jax[tpu]",
            # tests/test_harness.py runs lm-evaluation-harness on our model and on its hf backend
            # (which needs accelerate).
            "lm_eval>=0.4,<0.5",
            "accelerate>=0.26",
        ],
        # lm-evaluation-harness on the model as it runs on the mesh (medllama-lm-eval).
        "lm_eval": ["lm_eval>=0.4,<0.5"],
        # Corpus preparation and seqio's cache at scale (DirectRunner, Dataflow, Flink, Spark);
        # tfrecord brings the CRC that writing the cache's TFRecord files needs.
        "beam": ["apache-beam[tfrecord]>=2.70,<3"],
        # BERTScore for the summarization tasks, with a model folder the user provides.
        "bertscore": ["bert-score>=0.3.13"],
    },
    entry_points={
        "console_scripts": [
            "medllama-convert=medllama_jax.cli.convert:run",
            "medllama-generate=medllama_jax.cli.generate:run",
            "medllama-train=medllama_jax.cli.train:run",
            "medllama-eval=medllama_jax.cli.eval:run",
            "medllama-supervised=medllama_jax.cli.supervised:run",
            "medllama-contamination=medllama_jax.cli.contamination:run",
            "medllama-plan=medllama_jax.cli.plan:run",
            "medllama-tpu=medllama_jax.cli.tpu:run",
            "medllama-lm-eval=medllama_jax.cli.lm_eval:run",
            "medllama-forgetting=medllama_jax.cli.forgetting:run",
        ],
    },
)
