"""The fault cases that need processes of their own: kill -9 at seeded random moments, SIGINT/SIGTERM at
chosen ones, a second run on a locked output_dir, and full disks (a small tmpfs per case).

    python -m tests.faults.runner WORKDIR CASES.json RESULTS.json

Importing torch, transformers and mftcore costs a process seconds on a shared 2-core machine; here it
is paid once: this process imports everything and never trains, and each case is a manager process
forked from it that forks one child per `mftcore ...` invocation (the CLI entry point itself, with
hooks patched in, in its own process group so that a "Ctrl-C" reaches its tokenizer workers too, as a
terminal's would). Two managers run at a time. A child's stdout and stderr go to files that the
checks read. tests/faults/test_process_faults.py runs this under `unshare` (a private mount namespace)
so that the disk cases can mount their tmpfs, and asserts on RESULTS.json case by case.

Kill cases first run a calibration (the reference run, with every hook site counting its calls and
the CPU time measured), then for each case SIGKILL the run at call ceil(u * count) of one site (or at
u x the CPU time, by ITIMER_PROF), optionally kill the resumed run too, resume to the end and compare
with the reference: final weights bitwise, every metrics record, and nothing temporary left behind.
"""

from __future__ import annotations

import io as _io
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: see tests/conftest.py

import mftcore.cli  # noqa: E402
import mftcore.data.cache  # noqa: E402
import mftcore.io  # noqa: E402
import mftcore.train  # noqa: E402
from mftcore.checkpoint import checkpoint_problem  # noqa: E402
from tests.faults.harness import base_config, leftovers  # noqa: E402
from tests.helpers.paths import TINY_MODEL  # noqa: E402

CHILD_TIMEOUT = 900  # wall seconds before a child counts as hung: a failsafe, far beyond a loaded machine's
PARALLEL = 2

# What the kill cases train: attention dropout (RNG every step), accumulation, self-paced weights with
# a validation position, evaluation and checkpoints along the way: all state a resume has to carry.
KILL_RUN = dict(model_config={**TINY_MODEL, "attention_dropout": 0.1}, weighted_loss_mode="self-paced",
                selfpaced_history_length=2, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                gradient_accumulation_steps=2, max_train_steps=6, checkpointing_steps=2, evaluation_steps=3,
                tokenize_workers=1)


# --- hooks: run inside a child, before the CLI -------------------------------------------------------

def sites():
    """name -> [(owner, attribute)] of the functions a kill or a signal can be attached to."""
    import transformers
    import transformers.modeling_utils

    return {
        "step": [(mftcore.train, "train_step")],
        "backward": [(mftcore.parallel.engine.Engine, "backward")],
        "save": [(torch, "save")],
        "safetensors": [(transformers.modeling_utils, "safe_save_file")],
        "rename": [(os, "replace"), (os, "rename")],
        "chunk": [(mftcore.data.cache, "encode_lines")],
        "append": [(mftcore.io.AppendFile, "append")],
        "pool-get": [(mftcore.data.workers.EncoderProcesses, "receive")],
        "tokenizer-save": [(transformers.PreTrainedTokenizerBase, "save_pretrained")],
        "metrics-write": [(mftcore.metrics.Metrics, "write")],
        "save-checkpoint": [(mftcore.checkpoint, "save_checkpoint"), (mftcore.train.checkpoint, "save_checkpoint")],
        "save-final": [(mftcore.checkpoint, "save_final")],
        "build-cache": [(mftcore.data.cache, "build")],
        "model-dir": [(mftcore.commands.export, "save_model_dir")],
    }


def kill_now():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(site: str, at: int, action, counts: dict | None = None) -> None:
    """Call action(original, args, kwargs) instead of the site's function at its `at`-th call (and at
    every later one, for an action marked `again`); count calls."""
    import mftcore.commands.export  # noqa: F401  (a site)
    import mftcore.metrics  # noqa: F401
    import mftcore.parallel.engine  # noqa: F401

    state = {"n": 0}
    for owner, name in sites()[site]:
        original = getattr(owner, name)
        if getattr(original, "_fault_site", None) == site:
            continue  # the same function reached twice (an alias)

        def wrapped(*args, __original=original, **kwargs):
            state["n"] += 1
            if counts is not None:
                counts[site] = state["n"]
            if state["n"] == at or (state["n"] > at > 0 and getattr(action, "again", False)):
                return action(__original, args, kwargs)
            return __original(*args, **kwargs)

        wrapped._fault_site = site
        setattr(owner, name, wrapped)


def kill_before(original, args, kwargs):
    kill_now()


def kill_half_written(original, args, kwargs):
    """The write gets half of its bytes onto the disk, then SIGKILL: a torn file inside a temporary."""
    if original is torch.save:
        buf = _io.BytesIO()
        original(args[0], buf, *args[2:], **kwargs)
        with open(args[1], "wb") as f:
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
    elif getattr(original, "__name__", "") == "append":
        data = args[1].encode()
        os.write(args[0].fd, data[:len(data) // 2])
    kill_now()


def send(sig: int, then=None):
    """Signal the child's whole process group (like a terminal's Ctrl-C), then carry on with the call."""
    def action(original, args, kwargs):
        os.killpg(0, sig)
        if then is not None:
            then()
        return original(*args, **kwargs)
    return action


def fill_disk(mount: str, leave: int):
    """Before the call: fill the filesystem at `mount` but `leave` bytes (what a full disk looks like).
    An append into the page a file already has needs no new space on tmpfs: the disk is filled before
    the first append that needs a new page (AppendFile.append's text is its second argument)."""
    done = []

    def action(original, args, kwargs):
        if not done and getattr(original, "__name__", "") == "append":
            size = os.fstat(args[0].fd).st_size
            if len(args[1].encode()) <= -size % 4096:  # fits the file's last page: try the next append
                return original(*args, **kwargs)
        if not done:
            done.append(True)
            fill(mount, leave)
        return original(*args, **kwargs)
    action.again = True
    return action


def fill(mount: str, leave: int) -> None:
    free = shutil.disk_usage(mount).free
    with open(os.path.join(mount, "filler"), "ab") as f:
        try:
            f.write(b"\0" * max(free - leave, 0))
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            pass  # already full


def wait_for_file(path: str, timeout: float = 900):
    def action(original, args, kwargs):
        with open(path + ".ready", "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + timeout
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        return original(*args, **kwargs)
    return action


# --- processes ---------------------------------------------------------------------------------------

def child(argv: list, logdir: str, name: str, setup=None, after=None) -> dict:
    """Fork, run `mftcore ARGV` (after setup(), then after()) in the child, wait: {"rc", "out", "err", "pid"}."""
    out_path, err_path = os.path.join(logdir, f"{name}.out"), os.path.join(logdir, f"{name}.err")
    pid = os.fork()
    if pid == 0:
        rc = 1
        try:
            os.setpgid(0, 0)
            for fd, path in ((1, out_path), (2, err_path)):
                target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(target, fd)
                os.close(target)
            if setup is not None:
                setup()
            rc = mftcore.cli.main([str(a) for a in argv])
            if after is not None:
                after()
        except BaseException as e:  # a failure of the harness itself, reported as such
            import traceback

            print(f"runner child: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc()
            rc = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc if isinstance(rc, int) else 1)
    return wait_child(pid, out_path, err_path)


def wait_child(pid: int, out_path: str, err_path: str) -> dict:
    deadline = time.monotonic() + CHILD_TIMEOUT
    cpu = 0.0
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            cpu = usage.ru_utime + usage.ru_stime
            break
        if time.monotonic() > deadline:
            with_group(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = None
            break
        time.sleep(0.02)
    rc = "hung" if status is None else (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    with_group(pid, signal.SIGKILL)  # tokenizer workers a killed child left behind
    return {"rc": rc, "pid": pid, "out": read_text(out_path), "err": read_text(err_path), "cpu": cpu}


def with_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


# --- what the cases compare ----------------------------------------------------------------------------

def final_weights(output_dir: str):
    from safetensors.torch import load_file

    path = os.path.join(output_dir, "final", "model.safetensors")
    return load_file(path) if os.path.isfile(path) else None


def same_weights(a, b) -> bool:
    return a is not None and b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics(output_dir: str) -> list:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    keep = ("step", "split", "loss", "task_loss", "lr", "grad_norm", "accuracy")
    with open(path) as f:
        return [{k: r.get(k) for k in keep} for r in map(json.loads, f)]


def write_config(path: str, cfg: dict) -> str:
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def kill_config(case_dir: str, **updates) -> dict:
    return base_config(pathlib.Path(case_dir), **{**KILL_RUN, **updates})


# --- the cases -----------------------------------------------------------------------------------------

def calibrate(workdir: str) -> dict:
    """The reference run of the kill cases, with every site counting; its weights, metrics, counts, CPU time."""
    case_dir = os.path.join(workdir, "calibration")
    os.makedirs(case_dir, exist_ok=True)
    cfg = kill_config(case_dir)
    counts_path = os.path.join(case_dir, "counts.json")

    counts = {}

    def setup():
        for site in ("step", "backward", "save", "safetensors", "rename", "chunk", "append"):
            install(site, -1, None, counts)

    def dump():
        cpu = os.times()
        with open(counts_path, "w") as f:
            json.dump({**counts, "cpu": cpu.user + cpu.system}, f)

    run = child(["train", write_config(os.path.join(case_dir, "c.json"), cfg)], case_dir, "run", setup, dump)
    with open(counts_path) as f:
        counts = json.load(f)
    return {"rc": run["rc"], "err": run["err"][-3000:], "counts": counts, "output_dir": cfg["output_dir"],
            "cache_dir": cfg["cache_dir"]}


def kill_case(case: dict, workdir: str, calibration: dict) -> dict:
    """kill -9 at one seeded moment (twice if case["second"]), then resume: bitwise equal to the reference."""
    case_dir = os.path.join(workdir, case["id"])
    os.makedirs(case_dir, exist_ok=True)
    # Sites outside the cache build share the reference's finished cache (tokenizing costs CPU time).
    sites = {case["first"][0]} | ({case["second"][0]} if case.get("second") else set())
    shared = sites <= {"step", "backward", "save", "safetensors", "append"}
    cfg = kill_config(case_dir, **({"cache_dir": calibration["cache_dir"]} if shared else {}))
    config = write_config(os.path.join(case_dir, "c.json"), cfg)
    runs, counts = [], calibration["counts"]
    for k, (site, u, how) in enumerate([case["first"]] + ([case["second"]] if case.get("second") else [])):
        def setup(site=site, u=u, how=how):
            if site == "cpu":
                signal.signal(signal.SIGPROF, lambda *a: kill_now())
                signal.setitimer(signal.ITIMER_PROF, max(u * counts["cpu"], 0.01))
            else:
                action = kill_half_written if how == "half" else kill_before
                install(site, max(1, math.ceil(u * counts[site])), action)
        runs.append(child(["train", config], case_dir, f"killed-{k}", setup))
    resumed = child(["train", config], case_dir, "resume")
    ref = calibration["output_dir"]
    return {"killed_rc": [r["rc"] for r in runs], "rc": resumed["rc"], "err": resumed["err"][-3000:],
            "same_weights": same_weights(final_weights(cfg["output_dir"]), final_weights(ref)),
            "same_metrics": metrics(cfg["output_dir"]) == metrics(ref),
            "leftovers": leftovers(cfg["output_dir"], cfg["cache_dir"]),
            "cpu_seconds": round(sum(r["cpu"] for r in runs + [resumed]), 2),
            "killed_err": [r["err"][-1500:] for r in runs]}


def signal_case(case: dict, workdir: str, calibration: dict) -> dict:
    """SIGINT or SIGTERM at a chosen moment: the run's answer, then a clean rerun."""
    case_dir = os.path.join(workdir, case["id"])
    os.makedirs(case_dir, exist_ok=True)
    sig = getattr(signal, case["signal"])
    updates = {"tokenize_workers": 2} if case["site"] == "pool-get" else {}
    cfg = kill_config(case_dir, **updates)
    config = write_config(os.path.join(case_dir, "c.json"), cfg)
    argv = {"train": ["train", config], "prepare": ["prepare", config],
            "export": ["export", os.path.join(calibration["output_dir"], "checkpoint-6"),
                       os.path.join(case_dir, "exported")]}[case.get("command", "train")]

    def setup():
        then = None
        if case.get("again_at"):  # a second Ctrl-C at the next call of this site
            site2, n2 = case["again_at"]
            then = lambda: install(site2, n2, send(sig))  # noqa: E731
        install(case["site"], case["at"], send(sig, then))

    first = child(argv, case_dir, "signalled", setup)
    after = {"files": sorted(os.listdir(cfg["output_dir"])) if os.path.isdir(cfg["output_dir"]) else [],
             "leftovers": leftovers(case_dir)}
    rerun = child(argv, case_dir, "rerun") if case.get("command", "train") != "export" else {"rc": 0, "err": ""}
    result = {"rc": first["rc"], "err": first["err"][-3000:], "out": first["out"][-2000:], **after,
              "rerun_rc": rerun["rc"], "rerun_err": rerun["err"][-2000:],
              "exported_exists": os.path.exists(os.path.join(case_dir, "exported"))}
    if case.get("command", "train") == "train":
        result["same_weights"] = same_weights(final_weights(cfg["output_dir"]),
                                              final_weights(calibration["output_dir"]))
    return result


def lock_case(case: dict, workdir: str, calibration: dict) -> dict:
    """A second run on an output_dir that a live run holds: one line naming the holder; the first goes on."""
    case_dir = os.path.join(workdir, case["id"])
    os.makedirs(case_dir, exist_ok=True)
    cfg = kill_config(case_dir)
    config = write_config(os.path.join(case_dir, "c.json"), cfg)
    go = os.path.join(case_dir, "go")
    pid = os.fork()
    if pid == 0:  # the holder, paused at its second step
        os.setpgid(0, 0)
        try:
            result = child(["train", config], case_dir, "holder", lambda: install("step", 2, wait_for_file(go)))
            with open(os.path.join(case_dir, "holder.json"), "w") as f:
                json.dump(result, f)
        finally:
            os._exit(0)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not os.path.exists(go + ".ready") and time.monotonic() < deadline:
        time.sleep(0.05)
    holder_pid = read_text(go + ".ready").strip()
    second = child(["train", config], case_dir, "second")
    with open(go, "w"):
        pass
    os.waitpid(pid, 0)
    with open(os.path.join(case_dir, "holder.json")) as f:
        holder = json.load(f)
    return {"rc": second["rc"], "err": second["err"][-2000:], "holder_pid": holder_pid, "holder_rc": holder["rc"],
            "holder_err": holder["err"][-2000:],
            "same_weights": same_weights(final_weights(cfg["output_dir"]), final_weights(calibration["output_dir"]))}


def disk_case(case: dict, workdir: str, calibration: dict) -> dict:
    """The filesystem fills up just before a chosen write; the answer, the state left, then space freed."""
    case_dir = os.path.join(workdir, case["id"])
    mount = os.path.join(case_dir, "disk")
    os.makedirs(mount, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={case.get('size_mb', 48)}m", "tmpfs", mount], check=True)
    try:
        on_disk = case.get("on_disk", "output")
        cfg = kill_config(case_dir, output_dir=os.path.join(mount, "out") if on_disk == "output" else
                          os.path.join(case_dir, "out"),
                          cache_dir=os.path.join(mount, "cache") if on_disk == "cache" else
                          os.path.join(case_dir, "cache"))
        config = write_config(os.path.join(case_dir, "c.json"), cfg)
        command = case.get("command", "train")
        argv = {"train": ["train", config], "prepare": ["prepare", config],
                "export": ["export", os.path.join(calibration["output_dir"], "checkpoint-6"),
                           os.path.join(mount, "exported")]}[command]
        first = child(argv, case_dir, "full", lambda: install(case["site"], case["at"],
                                                             fill_disk(mount, case.get("leave", 0))))
        state = {"leftovers": leftovers(mount), "checkpoints": {}}
        if os.path.isdir(cfg["output_dir"]):
            for name in sorted(os.listdir(cfg["output_dir"])):
                if name.startswith("checkpoint-"):
                    state["checkpoints"][name] = checkpoint_problem(os.path.join(cfg["output_dir"], name))
        if os.path.isfile(os.path.join(cfg["output_dir"], "metrics.jsonl")):
            with open(os.path.join(cfg["output_dir"], "metrics.jsonl"), "rb") as f:
                data = f.read()
            state["metrics_whole_lines"] = data.endswith(b"\n") or not data
        os.remove(os.path.join(mount, "filler"))  # space freed
        again = child(argv, case_dir, "freed")
        result = {"rc": first["rc"], "err": first["err"][-3000:], **state, "rerun_rc": again["rc"],
                  "rerun_err": again["err"][-2000:], "rerun_leftovers": leftovers(mount)}
        if command == "train":
            result["same_weights"] = same_weights(final_weights(cfg["output_dir"]),
                                                  final_weights(calibration["output_dir"]))
            result["same_metrics"] = metrics(cfg["output_dir"]) == metrics(calibration["output_dir"])
        return result
    finally:
        subprocess.run(["umount", "-l", mount], check=False)


KINDS = {"kill": kill_case, "signal": signal_case, "lock": lock_case, "disk": disk_case}


def run_case(case: dict, workdir: str, calibration: dict) -> dict:
    try:
        return KINDS[case["kind"]](case, workdir, calibration)
    except Exception as e:  # the harness failed: reported as the case's result
        import traceback

        return {"harness_error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}


def main(workdir: str, cases_path: str, results_path: str) -> None:
    with open(cases_path) as f:
        cases = json.load(f)
    calibration = calibrate(workdir)
    results = {"calibration": calibration}
    if calibration["rc"] != 0:
        results["error"] = "the reference run failed"
    else:
        running = {}
        pending = list(cases)
        while pending or running:
            while pending and len(running) < PARALLEL:
                case = pending.pop(0)
                path = os.path.join(workdir, f"{case['id']}.result.json")
                pid = os.fork()
                if pid == 0:
                    try:
                        result = run_case(case, workdir, calibration)
                        with open(path, "w") as f:
                            json.dump(result, f)
                    finally:
                        os._exit(0)
                running[pid] = (case["id"], path)
            pid, _ = os.wait()
            case_id, path = running.pop(pid)
            results[case_id] = json.loads(read_text(path) or '{"harness_error": "no result written"}')
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
