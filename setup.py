"""Builds mftcore: the Python package (mftcore/kernels/ links to the op files in kernels/) and mftcore._packing
via CMake."""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Runs CMakeLists.txt and puts the module where setuptools expects it (in place for -e)."""

    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([
            "cmake", str(ROOT), "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", str(os.cpu_count() or 1)], cwd=build_dir, check=True)


TRACKERS = ["wandb>=0.19", "mlflow-skinny>=3.0", "trackio>=0.43"]  # the pip extras wandb, mlflow, trackio

setup(
    name="mftcore",
    version="0.1.0",
    description="Multi-task fine-tuning of code LLMs with Triton kernels",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["mftcore", "mftcore.data", "mftcore.model", "mftcore.kernels", "mftcore.sandbox", "mftcore.codeeval"],
    ext_modules=[CMakeExtension("mftcore._packing")],
    cmdclass={"build_ext": CMakeBuild},
    # Lower bounds admit the GPU image (torch 2.11, triton 3.6, transformers 5.17); constraints.txt
    # holds the exact versions CI installs.
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "transformers>=5.17",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tensorboard>=2.15",
        "tqdm>=4.66",
        "peft>=0.17",
        # parquet/arrow/csv/json files, save_to_disk directories and Hub datasets (mftcore/data/sources.py);
        # 5.2.0 tested. It needs no torch.
        "datasets>=4.0",
        # YAML configs (.yaml / .yml, mftcore/yamlconfig.py); 6.0.4 tested
        "PyYAML>=6.0",
    ],
    # bitsandbytes: the QLoRA merge test quantises a tiny model to nf4 on the CPU (0.50 tested);
    # accelerate: transformers' Trainer needs it (tests/test_hf_trainer.py, the MFTLoss recipe).
    # deepspeed: distributed_type "deepspeed" (0.19.8 tested; tests/test_distributed.py runs ZeRO-2/3 on CPU).
    # wandb / mlflow / trackio: report_to's trackers (mftcore/trackers.py; tests/train/test_trackers.py reads
    # back what each logged). None of them depends on torch. mlflow-skinny is MLflow without its server and
    # UI; its file store is what the tests use (3.17.2 tested). trackio 0.43 is the first with resume and
    # config read back as tested; it needs pillow < 13 (constraints.txt holds 12.3.0).
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "bitsandbytes>=0.50", "accelerate>=1.1", "deepspeed>=0.19",
                 *TRACKERS],
        "qlora": ["bitsandbytes>=0.50"],
        "deepspeed": ["deepspeed>=0.19"],
        "wandb": [TRACKERS[0]],
        "mlflow": [TRACKERS[1]],
        "trackio": [TRACKERS[2]],
    },
    entry_points={"console_scripts": ["mftcore=mftcore.cli:main"]},
    zip_safe=False,
)
