"""Commands print no third-party noise (mftcore/quiet.py), and the libraries' other warnings still show."""

import os
import subprocess
import sys

import pytest

from tests.helpers.paths import ROOT

NOISE = ["Setting accelerator to CPU", "ds_accelerator", "pip install kernels", "gemm_4bit_forward",
         "is_gradient_checkpointing", "FutureWarning"]


def run(args, cwd=ROOT, **env):
    proc = subprocess.run([sys.executable, "-m", "mftcore", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    return proc.returncode, proc.stdout + proc.stderr


def assert_quiet(output):
    found = [n for n in NOISE if n in output]
    assert not found, f"third-party noise {found} in:\n{output[-3000:]}"


@pytest.mark.slow
def test_lora_train_merge_export_generate_print_no_noise(tmp_path, tiny_pretrained):
    """A LoRA run imports peft, bitsandbytes and (through transformers/accelerate) DeepSpeed."""
    out = tmp_path / "out"
    rc, text = run(["train", "configs/tiny.json", f"output_dir={out}", "max_train_steps=2", "peft_type=lora",
                    f"pretrained_model_path={tiny_pretrained}", f"tokenizer_path={tiny_pretrained}",
                    "model_config=null", "evaluation_steps=0"])
    assert rc == 0, text
    assert_quiet(text)
    rc, text = run(["merge", "--base", tiny_pretrained, "--adapter", str(out / "final"), "--out", str(tmp_path / "m")])
    assert rc == 0, text
    assert_quiet(text)
    rc, text = run(["export", str(out / "checkpoint-2"), str(tmp_path / "e")])
    assert rc == 0, text
    assert_quiet(text)
    rc, text = run(["generate", "--model", str(tmp_path / "m"), "--prompt", "hi", "--max_new_tokens", "2"])
    assert_quiet(text)


def test_prepare_prints_no_noise(tmp_path):
    rc, text = run(["prepare", "configs/tiny.json", f"output_dir={tmp_path / 'out'}", "--show", "1"])
    assert rc == 0, text
    assert_quiet(text)


def test_real_warnings_of_the_same_sources_still_show():
    code = """
import logging, warnings
from mftcore.quiet import silence_third_party
silence_third_party()
import deepspeed  # its own accelerator line is dropped
logging.getLogger("DeepSpeed").warning("a real DeepSpeed warning")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real bitsandbytes warning")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from kernels-community: x")
warnings.warn("a real FutureWarning", FutureWarning)
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    for real in ("a real DeepSpeed warning", "a real bitsandbytes warning", "a real FutureWarning"):
        assert real in text, text
    for noise in ("Setting accelerator to CPU", "gemm_4bit_forward", "is_gradient_checkpointing"):
        assert noise not in text, text
