"""`mftcore report` and what `train` writes for it: run.json at the start, report.html and the end-of-run
summary at the end. The page's structure (every section and plot, the plotted points and table numbers
equal to metrics.jsonl, user text escaped), bad output_dirs as one line naming file:line, and a render in
headless Chromium (where `chromium` is installed) whose plots are drawn."""

import html
import json
import os
import re
import shutil
import subprocess

import pytest

from mftcore.cli import main
from mftcore.commands.report import RUN_FILE, number, read_metrics
from mftcore.config import TrainConfig
from mftcore.train import train
from tests.helpers.paths import DATA, TINY_MODEL, TOKENIZER

ODD_TASK = 'sql <b>&"q\''  # a task (directory) name that HTML must escape
SECTIONS = ("summary", "train-loss", "valid-loss", "weights", "tokens", "lr", "throughput", "memory", "evaluation",
            "data", "config")
MEMORY = {"weights_gb": 0.5, "gradients_gb": 0.25, "optimizer_state_gb": 1.0, "activations_gb": 2.0,
          "peak_gb": 3.75, "device": "cpu <test>", "method": "measured"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A self-paced run (dynamic task weights) of 4 steps with evaluations at 0, 2 and 4; (output_dir, stdout)."""
    root = tmp_path_factory.mktemp("report")
    odd = root / ODD_TASK
    shutil.copytree(DATA[1], odd)
    out = root / "out"
    cfg = {"data_paths": [DATA[0], str(odd)], "output_dir": str(out), "tokenizer_path": TOKENIZER,
           "model_config": TINY_MODEL, "seq_length": 256, "data_split": "90,10,0", "per_device_train_batch_size": 8,
           "learning_rate": 3e-3, "min_lr": 3e-4, "num_warmup_steps": 1, "log_interval": 1, "evaluation_steps": 2,
           "checkpointing_steps": 0, "max_train_steps": 4, "eval_at_start": True, "num_threads": 1,
           "weighted_loss_mode": "self-paced", "selfpaced_interval": 1, "selfpaced_history_length": 2,
           "selfpaced_sample_valid_num": 1}
    path = root / "cfg.json"
    path.write_text(json.dumps(cfg))
    import io
    from contextlib import redirect_stdout

    captured = io.StringIO()
    with redirect_stdout(captured):
        train(TrainConfig.from_file(str(path)))
    return str(out), captured.getvalue()


def page_of(out: str, tmp_path, capsys) -> str:
    with open(os.path.join(out, "memory.json"), "w") as f:
        json.dump(MEMORY, f)
    try:
        assert main(["report", out, "--out", str(tmp_path / "r.html")]) == 0
    finally:
        os.remove(os.path.join(out, "memory.json"))
    assert capsys.readouterr().out.strip() == str(tmp_path / "r.html")
    return (tmp_path / "r.html").read_text(encoding="utf-8")


def plots(page: str) -> dict:
    """{title: [(label, points)]} of the page's SVG plots; points as (x, y) pixel pairs or bar widths."""
    out = {}
    for svg in re.findall(r'<svg class="plot".*?</svg>', page, re.S):
        title = html.unescape(re.search(r'aria-label="([^"]*)"', svg).group(1))
        lines = [(html.unescape(label), [tuple(map(float, p.split(","))) for p in pts.split()])
                 for label, pts in re.findall(r'data-label="([^"]*)"[^>]*points="([^"]*)"', svg)]
        bars = [("bar", [(float(w), 0.0)]) for w in re.findall(r'class="bar"[^>]*width="([^"]*)"', svg)]
        out[title] = lines + bars
    return out


def test_the_report_has_every_section_and_plot_and_the_logged_numbers(run, tmp_path, capsys):
    out, _ = run
    page = page_of(out, tmp_path, capsys)
    records = read_metrics(out)
    train_recs = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [0, 2, 4] and len(train_recs) == 4
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page, anchor
    assert 'class="none"' not in page  # every section has its content: nothing reads "nothing logged"
    found = plots(page)
    for title in ("train loss per task", "validation loss per task", "task weights", "learning rate", "throughput",
                  "peak memory", "share of the trained loss tokens per task", "loss tokens per logged window"):
        assert found.get(title), title
        assert all(points for _, points in found[title]), title
    tasks = ["python_funcs", ODD_TASK]
    assert [label for label, _ in found["train loss per task"]] == tasks
    for label, points in found["validation loss per task"]:
        assert len(points) == len(valid)
    for label, points in found["task weights"]:  # self-paced logs a weight per task on every train record
        assert len(points) == len(train_recs)
    lr = [p for _, p in found["learning rate"]][0]
    assert len(lr) == 4 and len({y for _, y in lr}) > 1  # a warm-up then a decay: not a flat line
    assert len(found["share of the trained loss tokens per task"]) == 2
    bars = [m for m in re.findall(r"<svg .*?</svg>", page, re.S) if "memory after step 1" in m]
    assert bars and len(re.findall('class="bar"', bars[0])) == 5 and "cpu &lt;test&gt;" in bars[0]
    # numbers of the tables equal metrics.jsonl's
    for r in valid:
        assert f"<td>{r['step']}</td><td>{number(r['loss'])}</td><td>{number(r['accuracy'])}</td>" in page
    tokens = {t: sum(r["task_tokens"].get(t, 0) for r in train_recs) for t in tasks}
    share = 100 * tokens["python_funcs"] / sum(tokens.values())
    assert f">{number(share)}%</text>" in page
    assert f"<td>final train loss</td><td>{number(train_recs[-1]['loss'])}</td>" in page
    assert f"<td>last validation loss</td><td>{number(valid[-1]['loss'])} (step 4)</td>" in page
    # the config and the start-up report (run.json), escaped
    info = json.load(open(os.path.join(out, RUN_FILE)))
    assert info["tasks"] == tasks and info["config"]["weighted_loss_mode"] == "self-paced"
    assert any(line.startswith("model: ") for line in info["report"])
    assert html.escape(info["report"][0]) in page
    assert "<b>" not in page and "<s>" not in page  # the task name, and role_markers' "<s>human"
    assert html.escape(ODD_TASK) in page and "&lt;s&gt;human" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert "<script" not in page and "<link" not in page and "<img" not in page


def test_train_writes_report_html_and_prints_the_summary(run):
    out, printed = run
    assert os.path.isfile(os.path.join(out, "report.html"))
    records = read_metrics(out)
    last_train = [r for r in records if r["split"] == "train"][-1]
    last_valid = [r for r in records if r["split"] == "valid"][-1]
    lines = printed[printed.index("***** training finished *****"):].splitlines()
    text = "\n".join(lines)
    assert lines[1].startswith(f"  steps: 4 of 4; epochs: {last_train['epoch']}; runtime: ")
    total = sum(n for r in records if r["split"] == "train" for n in r["task_tokens"].values())
    assert f"loss tokens trained: {int(total):,} (python_funcs " in text
    assert f"train loss (step 4): {last_train['loss']:.4f}; per task: python_funcs " \
           f"{last_train['task_loss']['python_funcs']:.4f}" in text
    assert f"validation (step 4): loss {last_valid['loss']:.4f}, accuracy {last_valid['accuracy']:.4f}" in text
    best = min((r for r in records if r["split"] == "valid" and r["step"] > 0), key=lambda r: r["loss"])
    assert f"best checkpoint: {os.path.join(out, 'checkpoint-' + str(best['step']))} (best validation loss " \
           f"{best['loss']:.4f} at step {best['step']})" in text
    assert f"final model: {os.path.join(out, 'final')}" in text
    assert f"report: {os.path.join(out, 'report.html')}" in text


def test_a_report_that_cannot_be_written_warns_and_the_run_finishes(tiny_config, monkeypatch, capsys):
    import mftcore.train as train_module

    def broken(output_dir, out=None):
        raise OSError("disk on fire")

    monkeypatch.setattr(train_module, "write_report", broken)
    path, cfg = tiny_config(max_train_steps=2, num_threads=1)
    final = train(TrainConfig.from_file(path))
    printed = capsys.readouterr()
    assert os.path.isdir(final) and not os.path.exists(os.path.join(cfg["output_dir"], "report.html"))
    assert re.search(r"mftcore: warning: .*report\.html not written \(OSError: disk on fire\); `mftcore report ",
                     printed.err)
    assert "***** training finished *****" in printed.out and "  report:" not in printed.out


def test_bad_output_dirs_are_one_line_naming_the_file_and_line(tmp_path, capsys):
    def error_of(path):
        assert main(["report", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err
        return err

    assert error_of(tmp_path / "nowhere") == f"mftcore: error: {tmp_path / 'nowhere'}: no such directory " \
                                             "(give a training output_dir)"
    assert error_of(tmp_path).startswith(f"mftcore: error: {tmp_path / 'metrics.jsonl'}: missing")
    good = json.dumps({"step": 1, "split": "train", "loss": 1.0, "task_loss": {}})
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n\n{{\"step\": 2, \"spl\n{good}\n")
    assert error_of(tmp_path) == f"mftcore: error: {tmp_path / 'metrics.jsonl'}:3: not a JSON line (the file is damaged)"
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n[1, 2]\n")
    assert error_of(tmp_path).startswith(f"mftcore: error: {tmp_path / 'metrics.jsonl'}:2: not a metrics record")
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n")
    (tmp_path / RUN_FILE).write_text("{not json")
    assert error_of(tmp_path).startswith(f"mftcore: error: {tmp_path / RUN_FILE}")
    assert not os.path.exists(tmp_path / "report.html")  # nothing half-written


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def screenshot(page: str, tmp_path, name: str) -> dict:
    """{(r, g, b): pixels} of the page rendered by headless Chromium at 1400 x 5000."""
    from PIL import Image

    (tmp_path / f"{name}.html").write_text(page, encoding="utf-8")
    shot, home = tmp_path / f"{name}.png", tmp_path / "home"  # chromium's profile and crash dumps stay here
    home.mkdir(exist_ok=True)
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
                    f"--user-data-dir={home}", "--window-size=1400,5000", f"--screenshot={shot}",
                    (tmp_path / f"{name}.html").as_uri()], check=True, capture_output=True, timeout=120,
                   env={**os.environ, "HOME": str(home)})
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 5000)
    counts = {}
    for p in image.getdata():
        counts[p] = counts.get(p, 0) + 1
    return counts


def near(counts: dict, color: tuple) -> int:
    return sum(n for p, n in counts.items() if max(abs(a - b) for a, b in zip(p, color)) < 24)


@pytest.mark.skipif(CHROMIUM is None, reason="headless render: no chromium on PATH (apt-get install chromium)")
def test_the_report_renders_in_headless_chromium_with_its_plots_drawn(run, tmp_path, capsys):
    out, _ = run
    page = page_of(out, tmp_path, capsys)
    assert len(plots(page)) >= 10
    drawn = screenshot(page, tmp_path, "drawn")
    # The same page with every curve and bar taken out (axes, legends and tables stay): what the plots add
    empty = screenshot(re.sub(r'class="bar"([^>]*)width="[^"]*"', r'class="bar"\1width="0"',
                              re.sub(r' points="[^"]*"', ' points=""', page)), tmp_path, "empty")
    for color in ((0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)):  # the first two series' colours
        assert near(drawn, color) > near(empty, color) + 1000, color  # ~3000-6500 measured
    pixels = sum(drawn.values())
    assert 0.3 < drawn.get((255, 255, 255), 0) / pixels < 0.99  # a page, neither blank nor a solid block


def test_pass_at_k_and_a_partial_memory_breakdown_from_written_records(tmp_path, capsys):
    """No training: metrics.jsonl as eval_benchmarks and CoBa write it, memory.json with two of its keys."""
    rows = [{"step": s, "split": "train", "loss": 2.0 / s, "lr": 1e-3, "task_loss": {"a": 2.0 / s, "b": 1.0 / s},
             "task_tokens": {"a": 30, "b": 10}, "task_weight": {"a": 0.4 + s / 100, "b": 0.6 - s / 100},
             "divergence_factor": 0.5} for s in (1, 2, 3)]
    rows += [{"step": s, "split": "he", "pass@1": p1, "pass@10": p10, "problems": 4, "task_loss": {},
              "task_pass@1": {"py": p1}} for s, p1, p10 in ((2, 0.25, 0.5), (3, 0.5, 0.75))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "memory.json").write_text(json.dumps({"peak_gb": 1.5, "weights_gb": 0.25}))
    assert main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    found = plots(page)
    assert [len(p) for _, p in found["task weights"]] == [3, 3]
    assert [label for label, _ in found["he: pass@k"]] == ["pass@1", "pass@10"]
    assert "<td>2</td><td>0.25</td><td>0.5</td><td>4</td>" in page and "<td>3</td><td>0.5</td><td>0.75</td>" in page
    assert "<td>weights</td><td>0.25</td>" in page and "<td>peak</td><td>1.5</td>" in page
    assert "gradients" not in page  # only the keys memory.json has
    assert f"no {RUN_FILE} in {tmp_path}" in page  # the config and data sections say why they are empty
    assert f">{number(75.0)}%</text>" in page  # a: 90 of 120 loss tokens
