"""mvptr_ds: MVPTR vision-language pre-training on DeepSpeed.

torch is required without a pin so that a GPU user keeps the CUDA build they already have; CPU machines
install a CPU build first (``make install`` does, see README) so that pip never pulls a CUDA build.
"""
import re

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "(.+?)"', open("mvptr_ds/version.py").read()).group(1)  # its one home

setup(
    name="mvptr_ds",
    version=VERSION,
    description="MVPTR vision-language pre-training and fine-tuning at scale on DeepSpeed",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["mvptr_ds", "mvptr_ds.*"]),
    package_data={"mvptr_ds": ["data/assets/*.json", "ds_configs/*.json"]},
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.16",
        "transformers>=4.40",
        "tokenizers",
        "numpy",
        "safetensors",
        "tqdm",
        "wandb",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        # wheel: tests/cli/test_wheel.py builds the wheel with the installed setuptools (older than 70.1 needs it)
        "test": ["pytest>=7", "pytest-timeout", "wheel"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["mvptr_ds=mvptr_ds.run:cli"]},
)
