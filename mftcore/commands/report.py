"""`mftcore report OUTPUT_DIR [--out report.html]`: one self-contained HTML page of a training run
(written by `train` at its end as OUTPUT_DIR/report.html, too), and the end-of-run summary lines.

Read from OUTPUT_DIR: metrics.jsonl (required: every curve), run.json (the config, the start-up report
and the task names; written by `train` when it starts) and memory.json (the memory breakdown after step
1), each optional. The page has no script, no stylesheet or font from elsewhere and no image file: the
plots are inline SVG drawn here (a line plot and a bar plot are all it needs; matplotlib would be a
dependency of 40 MB for them). Everything taken from the run (task names, config values, report lines)
is HTML-escaped.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import os

from mftcore.errors import DataError
from mftcore.io import METRICS_FILE, atomic_write_text, open_regular, read_json_object
from mftcore.memory import MEMORY_FILE  # memory.py writes it after step 1

RUN_FILE = "run.json"  # in output_dir: the config, start-up report and task names of the run (train writes it)
REPORT_FILE = "report.html"
MEMORY_KEYS = ("weights_gb", "gradients_gb", "optimizer_state_gb", "activations_gb", "peak_gb")
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
TRAIN_SKIP = ("task_loss", "task_tokens", "step", "split")  # train-record keys that are not plotted on their own


# --- reading the run -------------------------------------------------------------------------------

def read_metrics(output_dir: str) -> list:
    """The records of OUTPUT_DIR/metrics.jsonl; a missing directory or file, or a line that is not a JSON
    record with a step and a split, is one DataError naming it (file:line)."""
    if not os.path.isdir(output_dir):
        raise DataError(f"{output_dir}: no such directory (give a training output_dir)")
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.exists(path):
        raise DataError(f"{path}: missing: {output_dir} is not a training output_dir, or its run logged nothing yet")
    with open_regular(path, error=DataError, what="metrics file") as f:
        raw = f.read()
    records = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise DataError(f"{path}:{number}: not a JSON line (the file is damaged)") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)) \
                or not isinstance(record.get("split"), str):
            raise DataError(f"{path}:{number}: not a metrics record (expected an object with \"step\" and \"split\")")
        records.append(record)
    return records


def read_optional(output_dir: str, name: str) -> dict:
    path = os.path.join(output_dir, name)
    return read_json_object(path, error=DataError) if os.path.exists(path) else {}


def write_run_info(output_dir: str, config: dict, tasks: list, report: list, total_steps: int) -> None:
    """OUTPUT_DIR/run.json (atomically): what the report shows of the run besides its curves."""
    atomic_write_text(os.path.join(output_dir, RUN_FILE), json.dumps({
        "tasks": list(tasks), "total_steps": total_steps, "report": list(report), "config": config,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        indent=1, default=str) + "\n")


def series(records: list, split: str, key: str, task: str | None = None) -> list:
    """[(step, value)] of `key` (of task's entry when `task` is given) in the records of `split`."""
    out = []
    for r in records:
        if r["split"] != split:
            continue
        value = r.get(key)
        if task is not None:
            value = value.get(task) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((r["step"], float(value)))
    return out


def task_names(records: list, run: dict) -> list:
    names = [t for t in run.get("tasks", []) if isinstance(t, str)]
    for r in records:
        for task in r.get("task_loss", {}) if isinstance(r.get("task_loss"), dict) else ():
            if task not in names:
                names.append(task)
    return names


def token_totals(records: list, tasks: list) -> dict:
    """Loss tokens trained per task, summed over the train records (each record counts its own window)."""
    totals = {t: 0.0 for t in tasks}
    for r in records:
        if r["split"] == "train" and isinstance(r.get("task_tokens"), dict):
            for task, n in r["task_tokens"].items():
                if isinstance(n, (int, float)):
                    totals[task] = totals.get(task, 0.0) + n
    return totals


# --- SVG -------------------------------------------------------------------------------------------

def ticks(lo: float, hi: float, n: int = 5) -> list:
    """About n round numbers spanning [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    unit = 10 ** math.floor(math.log10(raw))
    step = next(m * unit for m in (1, 2, 2.5, 5, 10) if m * unit >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def number(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3g}"


def line_plot(title: str, lines: dict, ylabel: str = "", xlabel: str = "step") -> str:
    """An SVG line plot of {label: [(x, y)]}; a series of one point is drawn as a dot."""
    lines = {k: v for k, v in lines.items() if v}
    if not lines:
        return ""
    w, h, left, right, top, bottom = 640, 280, 64, 16, 28, 40
    xs = [x for pts in lines.values() for x, _ in pts]
    ys = [y for pts in lines.values() for _, y in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad

    def px(x):
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y):
        return top + (y1 - y) / (y1 - y0) * (h - top - bottom)

    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(title)}">',
             f'<rect x="0" y="0" width="{w}" height="{h}" fill="#fff"/>',
             f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>']
    for t in ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" font-size="11">{number(t)}</text>')
    for t in ticks(x0, x1):
        parts.append(f'<text x="{px(t):.1f}" y="{h - bottom + 16}" text-anchor="middle" font-size="11">'
                     f'{number(t)}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{h - bottom}" stroke="#333"/>'
                 f'<line x1="{left}" x2="{w - right}" y1="{h - bottom}" y2="{h - bottom}" stroke="#333"/>'
                 f'<text x="{(left + w - right) / 2}" y="{h - 6}" text-anchor="middle" font-size="12">'
                 f'{html.escape(xlabel)}</text>'
                 f'<text x="14" y="{(top + h - bottom) / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 14 {(top + h - bottom) / 2})">{html.escape(ylabel)}</text>')
    for i, (label, pts) in enumerate(lines.items()):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        parts.append(f'<polyline class="series" data-label="{html.escape(label)}" data-points="{len(pts)}" '
                     f'fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
        if len(pts) == 1:
            (x, y), = pts
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{color}"/>')
        parts.append(f'<rect x="{left + 10}" y="{top + 6 + 16 * i}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{left + 24}" y="{top + 15 + 16 * i}" font-size="11">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_plot(title: str, values: dict, unit: str = "") -> str:
    """A horizontal SVG bar plot of {label: value >= 0}, each bar labelled with its value."""
    values = {k: v for k, v in values.items() if isinstance(v, (int, float)) and v >= 0}
    if not values:
        return ""
    w, row, left, top = 640, 26, 180, 28
    h = top + row * len(values) + 10
    biggest = max(values.values()) or 1.0
    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(title)}">',
             f'<rect x="0" y="0" width="{w}" height="{h}" fill="#fff"/>',
             f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>']
    for i, (label, v) in enumerate(values.items()):
        y, length = top + row * i, max(v / biggest * (w - left - 110), 1.0)
        parts.append(f'<text x="{left - 8}" y="{y + 16}" text-anchor="end" font-size="12">{html.escape(label)}</text>'
                     f'<rect class="bar" x="{left}" y="{y + 4}" width="{length:.1f}" height="{row - 8}" '
                     f'fill="{COLORS[i % len(COLORS)]}"/>'
                     f'<text x="{left + length + 6:.1f}" y="{y + 16}" font-size="12">{number(v)}{unit}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --- the page --------------------------------------------------------------------------------------

def table(header: list | None, rows: list) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def cell(v) -> str:
    if isinstance(v, float):
        return number(v)
    return "" if v is None else v if isinstance(v, str) else json.dumps(v, default=str)


def section(anchor: str, title: str, body: str, note: str = "") -> str:
    if not body:
        body = f'<p class="none">{html.escape(note or "nothing logged")}</p>'
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def evaluation_sections(records: list, tasks: list) -> str:
    valid = [r for r in records if r["split"] == "valid"]
    rows = [[r["step"], r.get("loss"), r.get("accuracy"),
             *[(r.get("task_loss") or {}).get(t) for t in tasks]] for r in valid]
    body = table(["step", "valid loss", "accuracy", *[f"{t} loss" for t in tasks]], rows) if rows else ""
    benchmarks = sorted({r["split"] for r in records} - {"train", "valid"})
    for name in benchmarks:
        recs = [r for r in records if r["split"] == name]
        keys = sorted({k for r in recs for k, v in r.items() if k.startswith("pass@") and isinstance(v, (int, float))})
        body += f"<h3>{html.escape(name)}</h3>"
        body += line_plot(f"{name}: pass@k", {k: series(records, name, k) for k in keys}, "pass@k")
        body += table(["step", *keys, "problems"], [[r["step"], *[r.get(k) for k in keys], r.get("problems")]
                                                     for r in recs])
    return section("evaluation", "Evaluation", body, "no evaluation in this run (evaluation_steps, eval_benchmarks)")


def memory_section(records: list, memory: dict) -> str:
    body = line_plot("peak memory", {"memory_gb": series(records, "train", "memory_gb")}, "GiB")
    present = {k.removesuffix("_gb"): memory[k] for k in MEMORY_KEYS
               if isinstance(memory.get(k), (int, float)) and not isinstance(memory.get(k), bool)}
    if present:
        where = ", ".join(f"{k}: {memory[k]}" for k in ("device", "method") if memory.get(k) is not None)
        body += bar_plot("memory after step 1" + (f" ({where})" if where else ""), present, " GB")
        body += table(["part", "GB"], [[k, v] for k, v in present.items()])
    return section("memory", "Memory", body)


CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1320px;color:#222}
section{margin:28px 0}svg.plot{margin:6px 8px 6px 0;vertical-align:top;border:1px solid #ddd}table{border-collapse:collapse;
font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}
pre{background:#f6f6f6;padding:10px;overflow-x:auto;font-size:12px}p.none{color:#777}"""


def render(output_dir: str) -> str:
    """The report page of a run's output_dir."""
    records = read_metrics(output_dir)
    run, memory = read_optional(output_dir, RUN_FILE), read_optional(output_dir, MEMORY_FILE)
    tasks = task_names(records, run)
    train = [r for r in records if r["split"] == "train"]
    title = f"mftcore run: {os.path.basename(os.path.abspath(output_dir))}"
    last = train[-1] if train else {}
    valid = [r for r in records if r["split"] == "valid"]
    facts = [["output_dir", os.path.abspath(output_dir)], ["tasks", ", ".join(tasks)],
             ["steps logged", f"{last.get('step', 0)} of {run.get('total_steps', '?')}"],
             ["epochs", last.get("epoch")], ["final train loss", last.get("loss")],
             ["last validation loss", f"{number(valid[-1]['loss'])} (step {valid[-1]['step']})"
              if valid and isinstance(valid[-1].get("loss"), (int, float)) else None],
             ["started", run.get("started")]]
    loss = line_plot("train loss per task", {t: series(records, "train", "task_loss", t) for t in tasks}, "loss")
    loss += line_plot("train loss (all tasks)", {"loss": series(records, "train", "loss"),
                                                 "step_loss": series(records, "train", "step_loss")}, "loss")
    vloss = line_plot("validation loss per task", {t: series(records, "valid", "task_loss", t) for t in tasks}, "loss")
    vloss += line_plot("validation loss and accuracy", {"loss": series(records, "valid", "loss"),
                                                        "accuracy": series(records, "valid", "accuracy")})
    weights = line_plot("task weights", {t: series(records, "train", "task_weight", t) for t in tasks}, "weight")
    totals = token_totals(records, tasks)
    share = bar_plot("share of the trained loss tokens per task",
                     {t: 100 * n / (sum(totals.values()) or 1) for t, n in totals.items()}, "%")
    share += line_plot("loss tokens per logged window", {t: series(records, "train", "task_tokens", t)
                                                         for t in tasks}, "tokens")
    speed = line_plot("throughput", {"tokens/s": series(records, "train", "tokens_per_s")}, "tokens/s")
    speed += line_plot("MFU", {"mfu": series(records, "train", "mfu")}, "fraction of peak")
    others = line_plot("learning rate", {"lr": series(records, "train", "lr")}, "lr")
    others += line_plot("gradient norm", {"grad_norm": series(records, "train", "grad_norm")}, "norm")
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    report = "\n".join(str(line) for line in run.get("report", []))
    return "".join([
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        section("summary", "Summary", table(None, facts)),
        section("train-loss", "Training loss", loss),
        section("valid-loss", "Validation loss", vloss, "no validation records (evaluation_steps, eval_at_start)"),
        section("weights", "Task weights", weights, "static task weights (dynamic ones are logged by the "
                                                    "self-paced and CoBa loss modes)"),
        section("tokens", "Tokens per task", share),
        section("lr", "Learning rate and gradient norm", others),
        section("throughput", "Throughput and MFU", speed),
        memory_section(records, memory),
        evaluation_sections(records, tasks),
        section("data", "Data and plan (start-up report)", f"<pre>{html.escape(report)}</pre>" if report else "",
                f"no {RUN_FILE} in {output_dir}"),
        section("config", "Config", table(["key", "value"], [[k, v] for k, v in config.items()]) if config else "",
                f"no {RUN_FILE} in {output_dir}"),
        "</body></html>\n"])


def write_report(output_dir: str, out: str | None = None) -> str:
    """Render the page and write it atomically (default OUTPUT_DIR/report.html); returns its path."""
    page = render(output_dir)
    out = out or os.path.join(output_dir, REPORT_FILE)
    atomic_write_text(out, page)
    return out


# --- the end-of-run summary ------------------------------------------------------------------------

def summary_lines(records: list, *, steps: int, total_steps: int, runtime_s: float, best: str | None,
                  final: str, report: str | None) -> list:
    """What `train` prints at its end, as HF Trainer and axolotl do: steps, epochs, tokens, runtime, the
    final train loss and validation metrics per task, the best checkpoint, where the outputs are."""
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    tasks = task_names(records, {})
    tokens = token_totals(records, tasks)
    last = train[-1] if train else {}
    lines = ["***** training finished *****",
             f"  steps: {steps} of {total_steps}; epochs: {last.get('epoch', '?')}; runtime: "
             f"{datetime.timedelta(seconds=round(runtime_s))} ({steps / max(runtime_s, 1e-9):.3g} steps/s)",
             f"  loss tokens trained: {int(sum(tokens.values())):,} (" +
             ", ".join(f"{t} {int(n):,}" for t, n in tokens.items()) + ")"]
    if last:
        lines.append(f"  train loss (step {last['step']}): {last.get('loss', float('nan')):.4f}; per task: " +
                     ", ".join(f"{t} {v:.4f}" for t, v in (last.get("task_loss") or {}).items()))
    if valid:
        v = valid[-1]
        accuracy = f", accuracy {v['accuracy']:.4f}" if isinstance(v.get("accuracy"), (int, float)) else ""
        lines.append(f"  validation (step {v['step']}): loss {v.get('loss', float('nan')):.4f}{accuracy}; per task: " +
                     ", ".join(f"{t} {x:.4f}" for t, x in (v.get("task_loss") or {}).items()))
    for name in sorted({r["split"] for r in records} - {"train", "valid"}):
        r = [x for x in records if x["split"] == name][-1]
        lines.append(f"  {name} (step {r['step']}): " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()
                                                                 if k.startswith("pass@")))
    lines.append(f"  best checkpoint: {best}" if best else "  best checkpoint: none (no validation during the run)")
    lines.append(f"  final model: {final}")
    if report:
        lines.append(f"  report: {report}")
    return lines
