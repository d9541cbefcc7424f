"""The report of an ablation or a leave-one-domain-out run (jobs.ablate), in ``results/<name>/``.

- ``ablation.json``: the rows and, per seed, the evaluation folder and weights (what
  trueface.compare reads; ``python -m jobs.aggregate results/<name>`` rebuilds the table from it);
- ``comparison.md/.csv/.parquet``, ``heatmap.png``, ``forest.png``: trueface.compare's table (mean
  AUC per row and test domain with a 95% interval, the difference to the reference with its
  interval, in plain words);
- ``summary.md``: what was run (command, seeds, stages, rows dropped and why), for
  leave-one-domain-out the held-out table, then the comparison.

Everything here is rebuilt from the evaluation reports, so it can be re-run without training
(``jobs.ablate --resume NAME`` of a finished ablation does exactly that).
"""

from __future__ import annotations

import json
import time

from trueface.ablation import AblationPlan, held_out_domain
from trueface.atomic import atomic_write_text
from trueface.compare import ABLATION_FILE, cell_text, compare, units_from_ablation
from trueface.config import Config, from_dict
from trueface.results import COMBINED, markdown_table
from trueface.storage import Mirror

SUMMARY_FILE = "summary.md"


def job_seeds(job: dict) -> list[int]:
    """The seeds of the job's ``--seeds N`` trials: the config's seed, seed + 1, ..."""
    first = from_dict(job["config"]).seed
    return [first + k for k in range(job["seeds"])]


def trained_text(job: dict) -> str:
    """What the recipe trains, in words."""
    return {(1,): "Stage I", (2,): f"Stage II from {job['init']}", (1, 2): "Stage I then Stage II"}[tuple(job["stages"])]


def ablation_manifest(job: dict, plan: AblationPlan) -> dict:
    """``ablation.json``: the rows and, per seed, the evaluation folder (relative) and weights."""
    rows = []
    for v in plan.variants:
        _, ev = plan.evaluation(v.evaluation)
        rows.append({"name": v.name, "description": v.description,
                     "evaluations": [{"seed": seed, "dir": f"{ev.folder}/seed{k}", "weights": v.weights}
                                     for k, seed in enumerate(job_seeds(job))]})
    return {"name": job["name"], "kind": job["kind"], "reference": plan.reference, "variants": rows,
            "dropped": [{"name": n, "why": why} for n, why in plan.dropped], "command": job["command"]}


def write_ablation_report(job: dict, plan: AblationPlan, minutes: float | None = None) -> str:
    """Write ``ablation.json``, the comparison and ``summary.md`` into the job's results folder
    (pushed when it is a URI) and return summary.md's text. ``minutes``: the wall time to state."""
    cfg = from_dict(job["config"])
    results = Mirror.of(job["results_dir"], cfg.data.cache_dir)
    results.local.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results.local / ABLATION_FILE, json.dumps(ablation_manifest(job, plan), indent=2) + "\n")
    results.push(ABLATION_FILE)
    units = units_from_ablation(job["results_dir"], cfg.data.cache_dir)
    comparison = compare(units.units, results.local, reference=plan.reference, header=_header(job, cfg, plan, minutes))
    parts = [f"# {job['name']}: {'leave-one-domain-out' if job['kind'] == 'leave-one-domain-out' else 'ablation'}", ""]
    if job["kind"] == "leave-one-domain-out":
        parts += [held_out_markdown(comparison.rows, plan.reference), ""]
    parts.append(comparison.markdown.replace("# Cross-domain comparison", "## Every row and domain", 1))
    text = "\n".join(parts)
    atomic_write_text(results.local / SUMMARY_FILE, text)
    results.push()
    return text


def _header(job: dict, cfg: Config, plan: AblationPlan, minutes: float | None) -> dict[str, str]:
    header = {
        "command": f"`{job['command']}`",
        "data root": str(cfg.data.root),
        "trained": trained_text(job) + f"; image size {', '.join(str(cfg.stage(s).image_size) for s in job['stages'])}; "
                   f"epochs {', '.join(str(cfg.stage(s).epochs) for s in job['stages'])}",
        "seeds": ", ".join(map(str, job_seeds(job))),
        "reference": f"{plan.reference} (every difference is AUC(row) - AUC({plan.reference}))",
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if minutes is not None:
        header["wall time"] = f"{minutes:.1f} min"
    for name, why in plan.dropped:
        header[f"not run: {name}"] = why
    return header


def held_out_markdown(rows: list[dict], reference: str) -> str:
    """Per held-out domain: its AUC when Stage II never saw it, the same run's AUC on the domains
    it did train on, the reference's AUC on it (trained on it), and the difference."""
    cell = {(r["unit"], r["domain"]): r for r in rows}
    body = []
    for unit in dict.fromkeys(r["unit"] for r in rows):
        domain = held_out_domain(unit)
        if domain is None:
            continue
        held = cell.get((unit, domain))
        trained = [r for r in rows if r["unit"] == unit and r["domain"] not in (domain, COMBINED)]
        in_domain = "; ".join(f"{r['domain']} ({r['role'] or 'role unknown'}) {cell_text(r, 'auc')}"
                              for r in trained) or "-"
        ref = cell.get((reference, domain))
        body.append([domain, held["role"] if held else "-", cell_text(held, "auc") if held else "-", in_domain,
                     cell_text(ref, "auc") if ref else "-", cell_text(held, "diff", signed=True) if held else "-",
                     held["diff_words"] if held else f"{domain} has no test split"])
    table = markdown_table(["held-out domain", "its role in that run", "AUC on it (left out of Stage II)",
                            "same run, other test domains", f"{reference}: AUC on it (trained on it)",
                            "difference", "in plain words"], body)
    return "\n".join(["## Held-out domains", "",
                      "Each row fine-tuned Stage II without one domain and tested on it; the roles are the "
                      "evaluation's: a domain Stage I trained on is not held out of the whole run, and its role "
                      "says so. Intervals as in the table below.", "", table])
