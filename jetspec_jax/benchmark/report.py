"""Aggregates and outputs of a benchmark: results.json, report.md, bench.png.

A *run* is one engine configuration on one prompt set: a dict with `set`, `label`, `engine`
(jetspec, hf or dflash), `mode` (ar, chain, tree, hf, dflash), `budget`, `width`, `depth`, and
`prompts` (one dict per prompt: new_tokens, rounds, seconds, prefill_s, decode_s, ...).
`summarize` adds the totals: tau = tokens per target forward (sum of new tokens / sum of rounds),
tokens/s end to end (prefill included, the measure every engine shares) and, for ours, decode only.
A *batched* run (--batch-sizes) also has `batch_size`; its rows are groups of that many prompts
decoded in one fused loop, with new tokens and rounds summed over the group's real rows.
"""

from __future__ import annotations

import json
from pathlib import Path

ALL = "all"  # the pseudo prompt set that pools every set


def summarize(run: dict) -> dict:
    """Totals over the run's prompts, added to the run dict (which is returned)."""
    rows = run["prompts"]
    tokens = sum(r["new_tokens"] for r in rows)
    rounds = sum(r["rounds"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    run.update(new_tokens=tokens, rounds=rounds, seconds=round(seconds, 4),
               tau=round(sum(r["tau_tokens"] for r in rows) / rounds, 4) if rounds else None,
               tokens_per_second=round(tokens / seconds, 3) if seconds else None)
    if all("decode_s" in r for r in rows):
        decode_s = sum(r["decode_s"] for r in rows)
        run.update(prefill_s=round(sum(r["prefill_s"] for r in rows), 4), decode_s=round(decode_s, 4),
                   decode_tokens_per_second=round(tokens / decode_s, 3) if decode_s else None,
                   compiles_timed=sum(r["compiles"] for r in rows))
    checks = [r["equal_to_ar"] for r in rows if r.get("equal_to_ar") is not None]
    run["equal_to_ar"] = all(checks) if checks else None
    return run


def pooled(runs: list) -> list:
    """One run per label (and batch size) over every prompt set (set = "all")."""
    by_label: dict = {}
    for run in runs:
        base = by_label.setdefault((run["label"], run.get("batch_size")), {
            k: v for k, v in run.items() if k in (
                "label", "engine", "mode", "budget", "width", "depth", "batch_size")}
            | {"set": ALL, "prompts": []})
        base["prompts"] = base["prompts"] + run["prompts"]
    return [summarize(r) for r in by_label.values()]


def vs_batch_1(runs: list, batched: list) -> list:
    """Adds to each batched run `vs_batch_1`: its tok/s over the batch-1 run's of its set and label."""
    base = {(r["set"], r["label"]): r["tokens_per_second"] for r in runs}
    for run in batched:
        b1, tps = base.get((run["set"], run["label"])), run["tokens_per_second"]
        run["vs_batch_1"] = round(tps / b1, 3) if b1 and tps else None
    return batched


def speedups(runs: list) -> dict:
    """{set: {"labels": [...], "ratio": [[row tok/s / column tok/s]]}} (end-to-end tok/s)."""
    out = {}
    for name in dict.fromkeys(r["set"] for r in runs):
        group = [r for r in runs if r["set"] == name and r["tokens_per_second"]]
        labels = [r["label"] for r in group]
        tps = [r["tokens_per_second"] for r in group]
        out[name] = {"labels": labels, "ratio": [[round(a / b, 3) for b in tps] for a in tps]}
    return out


def _headline_labels(runs: list) -> list:
    """ar, chain, the fastest tree, hf, dflash: the columns of the markdown speed-up table."""
    labels = [r["label"] for r in runs if r["mode"] in ("ar", "chain")]
    trees = [r for r in runs if r["mode"] == "tree" and r["tokens_per_second"]]
    if trees:
        labels.append(max(trees, key=lambda r: r["tokens_per_second"])["label"])
    return labels + [r["label"] for r in runs if r["engine"] != "jetspec"]


def _fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(report: dict) -> str:
    meta, m = report["meta"], report["meta"]["machine"]
    lines = [
        "# jetspec-jax benchmark", "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, load average before {m['load_avg']} / after "
        f"{meta['machine_after']['load_avg']} (`{m['uptime']}`), JAX backend {m['jax_backend']}",
        f"- model: {meta['model']}; draft: {meta['draft']}; greedy; max new tokens "
        f"{meta['max_new_tokens']}; prompts: "
        + ", ".join(f"{name} {len(rows)}" for name, rows in report["prompts"].items())
        + f"; float32; torch threads "
        f"(peers): {meta['torch_threads']}",
        "- tau = tokens per target forward; tok/s end to end (prefill included; the peers are timed "
        "the same way); decode tok/s excludes prefill (ours only)",
    ]
    lines += [f"- note: {n}" for n in report["notes"]]
    lines += ["", "## Results", "",
              "| set | engine | N | W | tau | tok/s | decode tok/s | vs ar | equal to ar |",
              "|---|---|---|---|---|---|---|---|---|"]
    several = len(report["prompts"]) > 1  # else the pooled rows repeat the one set's
    for run in report["runs"] + (report["pooled"] if several else []):
        ar = next((r for r in report["runs"] + report["pooled"]
                   if r["set"] == run["set"] and r["mode"] == "ar"), None)
        vs = run["tokens_per_second"] / ar["tokens_per_second"] if ar and run["tokens_per_second"] else None
        equal = {True: "yes", False: "**NO**", None: "-"}[run["equal_to_ar"]]
        lines.append(f"| {run['set']} | {run['label']} | {_fmt(run['budget'])} | {_fmt(run['width'])} "
                     f"| {_fmt(run['tau'])} | {_fmt(run['tokens_per_second'])} "
                     f"| {_fmt(run.get('decode_tokens_per_second'))} | {_fmt(vs)} | {equal} |")
    split_runs = [r for r in report["pooled"] if r.get("split")]
    if split_runs:
        lines += ["", "## Time split per round (instrumented pass, stages jitted separately)", "",
                  "| engine | rounds | draft ms | tree ms | verify ms | commit ms | round ms | "
                  "overhead % | fused round ms | fused overhead % |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for run in split_runs:
            s, ms = run["split"], run["split"]["ms_per_round"]
            lines.append(f"| {run['label']} | {s['rounds']} | {_fmt(ms['draft'], 3)} | {_fmt(ms['tree'], 3)} "
                         f"| {_fmt(ms['verify'], 3)} | {_fmt(ms['commit'], 3)} | {_fmt(s['round_ms'], 3)} "
                         f"| {_fmt(s['overhead_pct'], 1)} | {_fmt(s.get('fused_round_ms'), 3)} "
                         f"| {_fmt(s.get('fused_overhead_pct'), 1)} |")
        lines += ["", "overhead = share of the round outside the two model forwards (head and "
                  "verify): tree build + accept/commit (goal < 10%). The fused columns divide the "
                  "real loop's decode time by its rounds; their overhead subtracts the instrumented "
                  "forwards from that."]
    lines += ["", "## Speed-up (end-to-end tok/s, row / column)", ""]
    keep = _headline_labels(report["pooled"])
    for name, table in report["speedup"].items():
        idx = [table["labels"].index(lab) for lab in keep if lab in table["labels"]]
        if len(idx) < 2 or (name == ALL and not several):
            continue
        lines += [f"**{name}**", "", "| | " + " | ".join(table["labels"][j] for j in idx) + " |",
                  "|---" * (len(idx) + 1) + "|"]
        for i in idx:
            lines.append(f"| {table['labels'][i]} | " + " | ".join(
                _fmt(table["ratio"][i][j]) for j in idx) + " |")
        lines.append("")
    lines += _batch_table(report, ALL if several else next(iter(report["prompts"])))
    eq = report["equality"]
    lines += ["## Equality with greedy AR", "",
              f"{eq['checked']} speculative outputs compared with our greedy AR on the same prompt: "
              + ("all equal." if eq["ok"] else f"**{len(eq['mismatches'])} MISMATCHES**: {eq['mismatches']}")]
    for peer, agree in report["peer_agreement"].items():
        lines.append(f"- {peer}: {agree['equal']}/{agree['checked']} outputs equal to our AR "
                     "(informational: a different float implementation may break near-ties)")
    c = report["compiles"]
    lines += ["", f"Compilations: {c['warmup']} during warm-up, {c['timed']} during timed runs "
              f"(headline), {c['split_timed']} during timed instrumented rounds."]
    return "\n".join(lines) + "\n"


def _batch_table(report: dict, name: str) -> list:
    """Markdown lines: our engines' tok/s per batch size on prompt set `name`, and the ratio to B=1."""
    batched = [r for r in report.get("batched", ()) if r["set"] == name]
    if not batched:
        return []
    sizes = sorted({r["batch_size"] for r in batched})
    lines = ["## Batch size (end-to-end tok/s; vs B=1: ratio to batch 1 of the same engine)", "",
             "| engine | B=1 | " + " | ".join(f"B={b} | vs B=1" for b in sizes) + " |",
             "|---" * (2 + 2 * len(sizes)) + "|"]
    for run in report["runs"] + report["pooled"]:
        if run["set"] != name or run["engine"] != "jetspec":
            continue
        at = {r["batch_size"]: r for r in batched if r["label"] == run["label"]}
        lines.append(f"| {run['label']} | {_fmt(run['tokens_per_second'])} | " + " | ".join(
            f"{_fmt(at[b]['tokens_per_second'])} | {_fmt(at[b]['vs_batch_1'])}" if b in at else "- | -"
            for b in sizes) + " |")
    return lines + ["", "Each group of B consecutive prompts of a set ran in one fused loop; a short "
                    "last group is padded by repeating its prompts, whose tokens are not counted. "
                    "Every counted row was compared with batch-1 greedy AR (mismatches below).", ""]


def _sweep_x(run: dict) -> int:
    """Position in the budget sweep: 1 stands for the chain (which verifies D + 1 nodes)."""
    return 1 if run["mode"] == "chain" else run["budget"]


def plot(report: dict, path: Path) -> bool:
    """tau and tok/s vs budget (1 = chain), one line per prompt set; AR as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_tau, ax_tps) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = report["runs"] + (report["pooled"] if len(report["prompts"]) > 1 else [])
    ticks = sorted({_sweep_x(r) for r in runs if r["mode"] in ("chain", "tree")})
    for k, name in enumerate(dict.fromkeys(r["set"] for r in runs)):
        color = "black" if name == ALL else f"C{k}"
        spec = sorted((r for r in runs if r["set"] == name and r["mode"] in ("chain", "tree")),
                      key=_sweep_x)
        if spec:
            xs = [_sweep_x(r) for r in spec]
            ax_tau.plot(xs, [r["tau"] for r in spec], "o-", color=color, label=name)
            ax_tps.plot(xs, [r["tokens_per_second"] for r in spec], "o-", color=color, label=name)
        for r in runs:
            if r["set"] == name and r["mode"] == "ar":
                ax_tps.axhline(r["tokens_per_second"], color=color, ls="--", lw=1,
                               label=f"{name} ar" if not spec else None)
    for ax, title in ((ax_tau, "tau (tokens per target forward)"), (ax_tps, "tokens/s (end to end)")):
        ax.set_xscale("log", base=2)
        if ticks:
            ax.set_xticks(ticks, ["chain" if x == 1 else str(x) for x in ticks])
            ax.minorticks_off()
        ax.set_xlabel("node budget N (1 = chain)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_tps.legend(fontsize=8)
    fig.suptitle(f"{Path(report['meta']['model']).name}, max new tokens {report['meta']['max_new_tokens']} "
                 "(dashed: AR)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(report: dict, out_dir: Path) -> dict:
    """results.json, report.md and bench.png in out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "report.md", "png": out_dir / "bench.png"}
    if not plot(report, paths["png"]):
        report["notes"].append("matplotlib is not installed: no plot")
        del paths["png"]
    paths["json"].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(report), encoding="utf-8")
    return paths
