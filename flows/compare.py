"""Flow `femb-compare`: train each head of `compare.headers` as a DVC experiment, then rank them.

For each head, one after another (DVC allows one run per workspace), `dvc exp run -S header=<head>`;
then `dvc exp show --json` is read back into a leaderboard: a Markdown table (verification accuracy
and TAR@FAR per pair set, train time) and a bar chart, the best head (highest mean accuracy over
the sets) marked. Experiments stay in DVC (`dvc exp show`, `dvc exp apply <name>`); the workspace
ends with the last head's run.

    python -m flows.compare                    # the heads of compare.headers in params.yaml
    python -m flows.compare arcface magface    # these heads
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow

from femb.config import load_params
from femb.errors import FembError
from femb.headers import list_headers
from femb.io import atomic_path
from flows.common import DvcError, add_run_arguments, failed, run_logger, run_main, with_retries

PARAMS = "params.yaml"
EVAL_METRICS = "metrics/eval.json"
TRAIN_METRICS = "metrics/train.json"
RAN_EXPERIMENT = re.compile(r"^Ran experiment\(s\):\s*(?P<names>.+)$")
BEST = "★"


def compare_heads(repo: Path | str, headers: Sequence[str] | None = None) -> list[str]:
    """The heads to compare: `headers`, else params.yaml's `compare.headers`; checked against femb's heads."""
    params = load_params(Path(repo) / PARAMS)  # also refuses a params.yaml that no experiment could run
    known = list_headers()
    for head in headers or []:
        if head not in known:
            raise FembError(f"heads: '{head}' is not a head; choose one of {', '.join(known)}")
    heads = list(headers or params.compare.headers)
    if not heads:
        raise FembError(f"{Path(repo) / PARAMS}: compare.headers is empty; list the heads to compare")
    return list(dict.fromkeys(heads))


def experiment_name(stdout: Sequence[str]) -> str:
    """The name `dvc exp run` gave its experiment ("Ran experiment(s): <name>")."""
    for line in reversed(stdout):
        if m := RAN_EXPERIMENT.match(line.strip()):
            return m["names"].split(",")[0].strip()
    raise DvcError(["exp", "run"], 0, ["dvc exp run did not name the experiment it ran"])


def experiments(exp_show: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{experiment name: its `data`} of every experiment in `dvc exp show --json` output."""
    found: dict[str, dict[str, Any]] = {}
    for baseline in exp_show:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name")
                if name and rev.get("data"):
                    found[name] = rev["data"]
    return found


def file_data(data: dict[str, Any], kind: str, path: str) -> dict[str, Any]:
    """The parsed content of one params / metrics file of an experiment (empty when absent)."""
    return ((data.get(kind) or {}).get(path) or {}).get("data") or {}


def leaderboard_row(head: str, name: str, data: dict[str, Any]) -> dict[str, Any]:
    """One head's numbers from its experiment: per-set accuracy/std/TAR@FAR, mean accuracy, train seconds."""
    evaluation = file_data(data, "metrics", EVAL_METRICS)
    sets = {
        set_name: {
            "accuracy": m["accuracy"],
            "accuracy_std": m.get("accuracy_std"),
            "tar_at_far": m.get("tar_at_far") or {},
            "far_below_resolution": m.get("far_below_resolution") or [],
        }
        for set_name, m in evaluation.items()
        if isinstance(m, dict) and "accuracy" in m
    }
    accuracies = [s["accuracy"] for s in sets.values()]
    train = file_data(data, "metrics", TRAIN_METRICS)
    return {
        "head": head,
        "experiment": name,
        "header_param": file_data(data, "params", PARAMS).get("header"),
        "sets": sets,
        "mean_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "train_seconds": train.get("seconds"),
        "steps": train.get("steps"),
    }


def best_head(rows: Sequence[dict[str, Any]]) -> str | None:
    """The head with the highest mean accuracy over the pair sets (None when no head has one)."""
    scored = [row for row in rows if row.get("mean_accuracy") is not None]
    return max(scored, key=lambda row: row["mean_accuracy"])["head"] if scored else None


def format_seconds(seconds: float | None) -> str:
    """120.5 -> '2m 01s'; None -> '-'."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def markdown_table(rows: Sequence[dict[str, Any]], failures: dict[str, str]) -> str:
    """The leaderboard as Markdown: a row per head, best first marked, then the heads that failed."""
    best = best_head(rows)
    set_names = list(dict.fromkeys(s for row in rows for s in row["sets"]))
    fars = {
        s: sorted({k for row in rows for k in row["sets"].get(s, {}).get("tar_at_far", {})}, key=float)
        for s in set_names
    }
    columns = ["", "head", "experiment"]
    for s in set_names:
        columns += [f"{s} accuracy (%)"] + [f"{s} TAR@FAR={far}" for far in fars[s]]
    columns += ["mean accuracy (%)", "train time"]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join([":-:", ":--", ":--"] + ["--:"] * (len(columns) - 3)) + "|",
    ]
    below_any = False
    ordered = sorted(
        rows, key=lambda row: -(row["mean_accuracy"] if row["mean_accuracy"] is not None else -1)
    )
    for row in ordered:
        is_best = row["head"] == best
        cells = [
            BEST if is_best else "",
            f"**{row['head']}**" if is_best else row["head"],
            f"`{row['experiment']}`",
        ]
        for s in set_names:
            m = row["sets"].get(s)
            if m is None:
                cells += ["-"] * (1 + len(fars[s]))
                continue
            std = f" ± {100 * m['accuracy_std']:.2f}" if m.get("accuracy_std") is not None else ""
            cells.append(f"{100 * m['accuracy']:.2f}{std}")
            for far in fars[s]:
                tar = m["tar_at_far"].get(far)
                mark = "†" if far in m["far_below_resolution"] else ""
                below_any |= bool(mark)
                cells.append("-" if tar is None else f"{tar:.4f}{mark}")
        mean = row["mean_accuracy"]
        cells += ["-" if mean is None else f"{100 * mean:.2f}", format_seconds(row["train_seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    for head in failures:
        lines.append("| ✗ | " + " | ".join([head, "failed"] + ["-"] * (len(columns) - 3)) + " |")
    notes = []
    if below_any:
        notes.append(
            "† the pair set has too few negative pairs to measure this FAR: the TAR at zero false accepts."
        )
    for head, reason in failures.items():
        notes.append(f"✗ {head}: {reason}")
    return "\n".join(lines) + ("\n\n" + "\n\n".join(notes) if notes else "") + "\n"


def write_markdown(path: Path, rows: Sequence[dict[str, Any]], failures: dict[str, str], chart: Path) -> None:
    """reports/compare.md: a title, how the numbers were made, the table and the chart (atomically)."""
    best = best_head(rows)
    summary = (
        f"Best: **{best}** ({100 * next(r for r in rows if r['head'] == best)['mean_accuracy']:.2f}% mean "
        "verification accuracy)."
        if best
        else "No head finished."
    )
    text = (
        "# Heads compared\n\n"
        "Each head trained by `dvc exp run -S header=<head>` on the same data, backbone and schedule; "
        "numbers read back from `dvc exp show`. Accuracy: InsightFace 10-fold verification, mean ± std; "
        "TAR@FAR from the ROC over all pairs.\n\n"
        f"{summary}\n\n{markdown_table(rows, failures)}\n![accuracy by head]({chart.name})\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_chart(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """A grouped bar chart of verification accuracy per head and pair set, best head starred (PNG, atomically)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, the Agg canvas renders the PNG

    best = best_head(rows)
    set_names = list(dict.fromkeys(s for row in rows for s in row["sets"]))
    heads = [row["head"] for row in rows]
    fig = Figure(figsize=(max(5.0, 1.3 * len(heads) + 2.5), 4.0), dpi=120)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(set_names))
    lowest = 100.0
    best_bars = []
    for i, s in enumerate(set_names):
        drawn = [(j, row["sets"][s]) for j, row in enumerate(rows) if s in row["sets"]]
        xs = [j + (i - (len(set_names) - 1) / 2) * width for j, _ in drawn]
        ys = [100 * m["accuracy"] for _, m in drawn]
        errs = [100 * (m.get("accuracy_std") or 0.0) for _, m in drawn]
        lowest = min([lowest, *ys])
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=3, label=s)
        best_bars += [bar for bar, (j, _) in zip(bars, drawn) if heads[j] == best]
    ax.set_xticks(range(len(heads)), [f"{BEST} {h}" if h == best else h for h in heads])
    for label in ax.get_xticklabels():
        if label.get_text().startswith(BEST):
            label.set_fontweight("bold")
    ax.set_ylim(max(0.0, lowest - 5.0), 100.0)
    ax.set_ylabel("verification accuracy (%)")
    ax.set_title(f"Heads compared (best: {best})" if best else "Heads compared")
    ax.grid(axis="y", alpha=0.3)
    if set_names:
        ax.legend(title="pair set", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    for bar in best_bars:  # outlined after the legend copied the plain style
        bar.set_edgecolor("black")
        bar.set_linewidth(1.5)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


@flow(name="femb-compare")
def compare(
    repo: str = ".",
    headers: list[str] | None = None,
    out_dir: str = "reports",
    retries: int = 3,
    retry_delay: float = 30.0,
) -> Any:
    """Train every head as a DVC experiment in `repo`, sequentially; write out_dir/compare.{md,png,json}."""
    logger = run_logger()
    try:
        heads = compare_heads(repo, headers)
    except FembError as error:
        return failed(error)
    logger.info("comparing %d heads: %s", len(heads), ", ".join(heads))
    names: dict[str, str] = {}
    failures: dict[str, str] = {}
    first_error: BaseException | None = None
    for head in heads:
        run = with_retries(f"exp run {head}", retries, retry_delay)
        state = run(["exp", "run", "-S", f"header={head}"], repo, return_state=True)
        if state.is_failed():
            error = state.result(raise_on_failure=False)
            failures[head] = str(error)
            first_error = first_error or error
            continue
        names[head] = experiment_name(state.result().stdout)
        logger.info("%s: experiment %s", head, names[head])

    shown = with_retries("exp show", retries, retry_delay)(["exp", "show", "--json"], repo, capture=True)
    found = experiments(json.loads("\n".join(shown.stdout) or "[]"))
    rows = []
    for head, name in names.items():
        if name not in found:
            failures[head] = f"experiment {name} is missing from `dvc exp show`"
            continue
        rows.append(leaderboard_row(head, name, found[name]))

    out = Path(repo) / out_dir
    chart = out / "compare.png"
    write_chart(chart, rows)
    write_markdown(out / "compare.md", rows, failures, chart)
    best = best_head(rows)
    result = {"heads": heads, "rows": rows, "failed": failures, "best": best}
    with atomic_path(out / "compare.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("leaderboard: %s, %s", out / "compare.md", chart)
    if best:
        logger.info("best head: %s; `dvc exp apply %s` puts its run in the workspace", best, names[best])
    if failures:  # after the report, which shows the heads that finished
        error = first_error or FembError(
            f"{len(failures)} of {len(heads)} heads failed: {'; '.join(failures.values())}"
        )
        return failed(error)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.compare [HEAD ...]`: compare heads locally (a temporary Prefect server)."""
    parser = argparse.ArgumentParser(prog="python -m flows.compare", description=__doc__.split("\n")[0])
    parser.add_argument(
        "headers", nargs="*", help="heads to compare (default: compare.headers in params.yaml)"
    )
    add_run_arguments(parser)
    parser.add_argument("--out", default="reports", help="where compare.md/.png/.json go (default: reports)")
    args = parser.parse_args(argv)
    return run_main(
        parser.prog,
        lambda: compare(
            repo=args.repo,
            headers=args.headers or None,
            out_dir=args.out,
            retries=args.retries,
            retry_delay=args.retry_delay,
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
