"""PNG chart of a benchmark: output tokens/s and median ITL, per target, per concurrency.

One row of two panels per workload phase; grouped bars (one per target) at each concurrency,
so a comparison reads side by side.  matplotlib comes from the ``bench`` extra
(``pip install -e '.[bench]'``, which installer/setup.sh does); it is imported only here and
only when ``--png`` is given, with the Agg backend (no display on a server).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medserve.benchmarks.results import Row


class ChartUnavailable(RuntimeError):
    """matplotlib is not installed."""


def write_png(rows: Sequence[Row], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ChartUnavailable(
            "--png needs matplotlib: install the bench extra (pip install -e '.[bench]')"
        ) from exc

    labels = list(dict.fromkeys(row.label for row in rows))
    targets = list(dict.fromkeys(row.target for row in rows))
    metrics = (("output tokens/s", "output_tokens_per_s"), ("ITL median (ms)", "itl_median_ms"))
    figure, axes = plt.subplots(
        len(labels), 2, figsize=(11, 3.2 * len(labels) + 0.6), squeeze=False
    )
    width = 0.8 / len(targets)
    for row_index, label in enumerate(labels):
        mine = [row for row in rows if row.label == label]
        concurrencies = sorted({row.concurrency for row in mine})
        for col_index, (metric_title, field_name) in enumerate(metrics):
            ax = axes[row_index][col_index]
            for t_index, target in enumerate(targets):
                values = {
                    row.concurrency: getattr(row.summary, field_name)
                    for row in mine
                    if row.target == target
                }
                positions = [
                    i + (t_index - (len(targets) - 1) / 2) * width
                    for i in range(len(concurrencies))
                ]
                ax.bar(
                    positions,
                    [values.get(c, 0.0) for c in concurrencies],
                    width,
                    label=target,
                )
            ax.set_xticks(range(len(concurrencies)), [str(c) for c in concurrencies])
            ax.set_xlabel("concurrency")
            ax.set_title(f"{label}: {metric_title}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            if row_index == 0 and col_index == 0:
                ax.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
