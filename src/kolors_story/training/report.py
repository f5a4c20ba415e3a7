"""Training figures and tables: the loss curve and the validation scores, as CSV and PNG."""

from __future__ import annotations

import csv
from pathlib import Path
from kolors_story.files import write_json


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def moving_mean(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def write_loss_log(losses: list[dict], csv_path: Path, png_path: Path) -> None:
    """Per-step losses as CSV and a PNG curve (raw and a moving mean)."""
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "seconds"])
        writer.writeheader()
        writer.writerows(losses)
    plt = _pyplot()
    steps, values = [r["step"] for r in losses], [r["loss"] for r in losses]
    window = max(1, len(values) // 20)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, alpha=0.35, label="loss")
    ax.plot(steps, moving_mean(values, window), label=f"moving mean ({window})")
    ax.set(xlabel="step", ylabel="MSE (noise prediction)", title="LoRA training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def write_validation_log(validations: list[dict], picked: int, csv_path: Path, png_path: Path) -> None:
    """Validation scores per checkpoint (one column per prompt, and the mean) as CSV and PNG."""
    n = max((len(v["scores"]) for v in validations), default=0)
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "mean", *[f"prompt_{i}" for i in range(n)], "picked"])
        for v in validations:
            writer.writerow([v["step"], v["mean"], *v["scores"], int(v["step"] == picked)])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if validations:
        ax.plot([v["step"] for v in validations], [v["mean"] for v in validations], marker="o", label="mean")
        ax.axvline(picked, linestyle="--", color="grey", label=f"picked step {picked}")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "validation off (train.validation.every: 0)", ha="center", va="center")
    ax.set(xlabel="step", ylabel="aesthetic score", title="Validation (challenge metric)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def write_summary(result, path: Path) -> None:
    summary = {"lora_file": str(result.lora_file), "picked_step": result.picked_step,
               "resumed_from_step": result.resumed_from, "steps": len(result.losses),
               "final_loss": result.losses[-1]["loss"] if result.losses else None,
               "validations": result.validations, "seconds": round(result.seconds, 2)}
    write_json(summary, Path(path))
