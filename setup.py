"""fine_jax: Fashion-FINE (ECCV 2024) fashion vision-language pre-training in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="fine_jax",
    version="0.1.0",
    description="Fashion-FINE fashion vision-language pre-training in JAX/Flax",
    packages=find_packages(include=["fine_jax", "fine_jax.*"]),
    package_data={"fine_jax.assets": ["*.safetensors"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "ml_collections>=1.0",
        "chex>=0.1.88",
        "tokenizers>=0.20",
        "transformers>=4.45",
        "h5py>=3.10",
        "pillow>=10",
        "opencv-python-headless>=4.8,<5",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "absl-py>=2.1",
        # FashionGen as a tfds ArrayRecord dataset (fine_jax.data.prepare), read without TensorFlow.
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",
        # WordNet antonyms/synonyms of the stage-1 text, from local WordNet 3.0 files.
        "nltk>=3.9",
    ],
    extras_require={
        # Reading and writing PyTorch checkpoints (fine_jax.convert / fine_jax.export) and the
        # parity tests. The CPU wheel is enough; fine_jax itself never imports torch.
        "torch": ["torch==2.13.0"],
        # The tests, and executing notebooks/retrieval_demo.ipynb (tests/test_notebook.py).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "nbformat>=5.9",
                 "nbclient>=0.10", "ipykernel>=6.29", "matplotlib>=3.8"],
        "notebook": ["matplotlib>=3.8", "jupyterlab>=4"],
    },
)
