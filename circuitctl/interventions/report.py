"""The files of an intervention: intervention.json, intervention.md (a table), intervention.png (bars)."""

from __future__ import annotations

from pathlib import Path

from circuitctl.io.files import refuse_overwrite, write_atomic, write_json

FORMAT = "circuitctl.intervention"
SCHEMA_VERSION = 1
FILES = ("intervention.json", "intervention.md", "intervention.png")
MAX_LISTED = 20_000  # ablated unit names written in full up to this many


def targets(out_dir: Path, force: bool) -> list[Path]:
    paths = [out_dir / name for name in FILES]
    refuse_overwrite(paths, force)
    return paths


def write(paths: list[Path], record: dict) -> None:
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    write_json(paths[0], record)
    write_atomic(paths[1], markdown(record))
    write_atomic(paths[2], bar_chart(record))


def _md(text) -> str:
    from circuitctl.io.escape import markdown_text

    return markdown_text(text)


def _f(value, digits: int = 3) -> str:
    return "undefined" if value is None else f"{value:.{digits}f}"


def markdown(record: dict) -> str:
    ablated = record["ablated"]
    if ablated is None:  # too many to list
        listed = f"{record['n_ablated']} {record['unit']}"
    else:
        listed = ", ".join(ablated[:30]) + (f", ... ({len(ablated)} in all)" if len(ablated) > 30 else "")
    lines = [
        f"# Intervention: {record['mode']} {_md(record['spec'])}",
        "",
        f"- selected: {_md(record['rule'])}",
        f"- mode: {record['mode']} ({'these units are ablated' if record['mode'] == 'remove' else 'every other unit is ablated'}); "
        f"ablation: {_md(record['ablation']['type'])}",
        f"- ablated ({record['n_ablated']} of {record['n_total']} {record['unit']}): {_md(listed)}",
        "",
        "| task | metric | before | after | f | accuracy before | accuracy after | top-1 before | top-1 after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in record["tasks"].items():
        lines.append(
            f"| {_md(name)} | {_md(t['metric'])} | {t['metric_before']:+.3f} | {t['metric_after']:+.3f} | {_f(t['faithfulness'])} | "
            f"{t['accuracy_before']:.3f} | {t['accuracy_after']:.3f} | {t['top1_accuracy_before']:.3f} | {t['top1_accuracy_after']:.3f} |"
        )
    lines += ["", "f = (m(after) - m(all ablated)) / (m(before) - m(all ablated)); accuracy: " + "; ".join(
        sorted({f"{_md(n)}: {_md(t['accuracy_rule'])}" for n, t in record["tasks"].items()})
    ) + "; top-1: an answer is the model's top token."]
    text = record.get("text")
    if text:
        lines += ["", f"Next-token loss on {_md(text['file'])} ({text['n_predicted_tokens']} tokens, ablation {_md(text['ablation'])}): "
                  f"{text['loss_before']:.4f} before, {text['loss_after']:.4f} after ({text['loss_change']:+.4f})."]
    if record.get("export"):
        lines += ["", f"Edited checkpoint: {_md(record['export']['dir'])} (`model: {{path: ...}}` loads it)."]
    for note in record.get("notes", []):
        lines += ["", f"Note: {_md(note)}"]
    return "\n".join(lines) + "\n"


def bar_chart(record: dict) -> bytes:
    """Accuracy before and after, per task (top-1 beside the metric's rule when they differ)."""
    from circuitctl.report import render_png

    names = list(record["tasks"])
    tasks = [record["tasks"][n] for n in names]

    def draw(ax) -> None:
        width = 0.38
        xs = range(len(names))
        before = [t["accuracy_before"] for t in tasks]
        after = [t["accuracy_after"] for t in tasks]
        ax.bar([x - width / 2 for x in xs], before, width, label="before", color="#4c72b0")
        ax.bar([x + width / 2 for x in xs], after, width, label="after", color="#dd8452")
        labels = [f"{n}\n{t['metric']}: {t['metric_before']:+.2f} -> {t['metric_after']:+.2f}" for n, t in zip(names, tasks)]
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        spec = record["spec"] if len(record["spec"]) <= 60 else record["spec"][:57] + "..."
        ax.set_title(f"{record['mode']} {spec} ({record['ablation']['type']} ablation)", fontsize=9)
        ax.legend(fontsize=8)

    return render_png(draw)
