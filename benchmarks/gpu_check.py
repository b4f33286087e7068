"""A borrowed GPU turned into figures in one command (about five minutes on one H200, measured):

    python benchmarks/gpu_check.py                 # full check on the NVIDIA GPUs torch sees
    python benchmarks/gpu_check.py --reduced       # the same steps at toy sizes (what the test suite runs on CPU)
    python benchmarks/gpu_check.py --quality       # the seed's headline: full.yaml trained and evaluated (~8 min)
    python benchmarks/gpu_check.py --quality --reduced   # the same at toy sizes (the test suite, on CPU)
    python benchmarks/gpu_check.py --headline_of RUN_DIR # the same headline from any finished run directory

Steps, in this order, each timed and recorded even when a later one fails:
1. end to end: `config/full.yaml` scaled down (20k stamps per variant, 1 epoch per stage, the seed's
   ConvNeXt-Tiny, batch 256, bf16) through the real `snakemake` command; it must produce the five targets.
2. training throughput through the real pipeline (parquet -> StampStream with DataLoader workers ->
   LensClassifier -> focal loss -> AdamW, i.e. `dhs train`'s step) on the stamps step 1 simulated, and the same
   model bare (timm on a fixed tensor): images/s and their ratio.
3. inference throughput: the whole `dhs infer` command against a bare forward pass of the same model; the command
   runs three times in one process (test split twice, then train split) to separate its first-call cost, its fixed
   cost per command and its per-stamp rate.
4. `torchrun --nproc_per_node 2` of `dhs train` (DDP) when two or more GPUs are visible.
5. the projection: measured per-image cost -> hours for 6 epochs over the full recipe's training split, the
   images/s that the planning budget (6 GPU-hours per stage, the figure config/full.yaml carried before it was
   measured) needs, and FLOPs per training image
   (counted by torch.utils.flop_counter on the real model).

Quality mode (``--quality``, instead of steps 1-5): `config/full.yaml` as it stands (the seed's grid_sota sources
in its n ~ 4 hosts, ConvNeXt-Tiny, batch 256, bf16, focal Gen3, the curriculum, 6 epochs per stage, mining at
score >= 0.90) through the real `snakemake` for Gen2's and Gen3's stratified tables, at the largest size that
finishes in about 8 minutes on one GPU, then the seed's headline (Gen3 against Gen2, tpr@fpr1e-4 and
fpr@tpr0.85 with 95% Wilson intervals, beside the matched filter of the same positives and the seed's claim) and
the learning-curve point (training stamps per variant -> Gen3 AUROC). The size, estimated from one H200's figures
(docs/benchmarks.md, "GPU check"; 2026-11-30): every rule's fixed cost (process start, CUDA start, first call)
came to ~250 s in the 20k-stamp end-to-end run; training runs at 6823 images/s (6 epochs x 3 stages x 0.7 N:
~150 s at N = 80k), scoring at ~5700 images/s (~15 s), the simulation at ~1000 stamps/s per core on 16 cores
(~15 s plus shard start-up). So N = 80k tasks per variant, plus 20k extra test controls so that the test split's
~26k controls resolve FPR 1e-4: ~7.5 min.

With no CUDA device it runs the reduced mode by itself (convnext_atto, tiny batches, ~500 stamps, fp32): same
code paths, so the script is known to work before anyone has a GPU. Writes one JSON (default
benchmarks/out/gpu_check.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tools"))  # finder_table: the headline's intervals

from bench_train import bare_loop, pipeline_loop  # noqa: E402
from factory import write_fake_phase4c  # noqa: E402

# What the end-to-end step must produce (relative to its run directory): the evaluate rule's four files and
# the Gen3 model they come from.
TARGETS = ["gen3_stratified_fpr.csv", "gen3_stratified_fpr_auroc.csv", "gen3_stratified_fpr_completeness.csv",
           "report/gen3_report.html", "runs/gen3_stageA2/best.pt"]
# ... and, in quality mode, Gen2's table beside Gen3's (the headline compares them)
QUALITY_TARGETS = ["gen2_stratified_fpr.csv"]

# The budget the projection is held against: 6 GPU-hours per stage on one H100-class GPU, the planning figure
# config/full.yaml's header carried before it was measured (0.24 h per stage on one H200, docs/benchmarks.md).
BUDGET_HOURS_PER_STAGE = 6.0

# The seed's headline (shared/spec/gen3_seed.md, "Expected Performance"): Gen3's target and Gen2's epoch-2 figures.
HEADLINE = (("tpr@fpr", 1e-4, ">", 0.85, 0.778), ("fpr@tpr", 0.85, "<", 0.001, 0.0017))


def sizes(reduced: bool, n_gpus: int, cpus: int) -> dict:
    if reduced:
        return {"reduced": True, "arch": "convnext_atto", "batch": 16, "bf16": False, "workers": 1, "train_steps": 2, "repeat": 1,
                "infer_batch": 64, "e2e_tasks": 480, "e2e_shards": 1, "e2e_batch": 32, "e2e_workers": 0,
                "torchrun_rows": 0, "quality_tasks": 600, "quality_extra_controls": 400, "quality_epochs": 1,
                "quality_shards": 1, "quality_min_score": 0.5}
    return {"reduced": False, "arch": "convnext_tiny", "batch": 256, "bf16": True,
            # quality mode: ~8 min on one GPU (the estimate is in the module docstring); full.yaml's epochs
            "quality_tasks": 80000, "quality_extra_controls": 20000, "quality_epochs": None,
            "quality_shards": max(2, min(32, 2 * cpus)), "quality_min_score": None,
            # ~1 DataLoader worker per ~3000 stamps/s (docs/benchmarks.md), leaving cores to the main process
            "workers": max(2, min(16, cpus // max(1, n_gpus) - 2)), "train_steps": 40, "repeat": 2,
            "infer_batch": 1024, "e2e_tasks": 20000, "e2e_shards": max(2, min(32, cpus)), "e2e_batch": 256,
            "e2e_workers": max(2, min(8, cpus // 2)), "torchrun_rows": 4096}


def machine() -> dict:
    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": []}
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                             "bf16": torch.cuda.is_bf16_supported()})
    return info


def step(results: dict, name: str, fn):
    """Run one step; record its result or its error, and its wall time, without stopping the check."""
    t = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as exc:  # a failed step is a finding; the others still run
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()[-3000:]}
    results[name]["seconds"] = round(time.perf_counter() - t, 1)
    print(f"[gpu_check] {name}: {'ok' if results[name]['ok'] else 'FAILED: ' + results[name]['error']}"
          f" ({results[name]['seconds']} s)", flush=True)


def env_with_repo() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def e2e(work: Path, sz: dict, n_gpus: int, quality: bool = False) -> dict:
    """`config/full.yaml` through the real `snakemake`: scaled to 1 epoch per stage (the smoke), or with its own
    epochs at the quality size (``quality``: Gen2's stratified table too)."""
    cfg = yaml.safe_load((REPO / "config/full.yaml").read_text())
    name = "quality" if quality else "e2e"
    cfg["run_dir"] = str(work / name)
    tasks = sz["quality_tasks"] if quality else sz["e2e_tasks"]
    cfg["simulation"].update(n_tasks=tasks, n_shards=sz["quality_shards"] if quality else sz["e2e_shards"])
    if quality:
        cfg["simulation"]["extra_test_controls"] = sz["quality_extra_controls"]
    cfg["audit"]["max_rows"] = min(cfg["audit"]["max_rows"], sz["e2e_tasks"] // 2)
    cfg["train"].update(arch=sz["arch"], batch_size=sz["e2e_batch"], use_bf16=sz["bf16"],
                        num_workers=sz["e2e_workers"], gpus=min(n_gpus, 1), save_every_steps=50)
    epochs = sz["quality_epochs"] if quality else 1
    for stage in ("gen2", "gen3_a1", "gen3_a2"):
        cfg[stage]["epochs"] = epochs or cfg[stage]["epochs"]
    if quality:
        # the seed mined its top 50k of ~145k parent LRGs; here the parent sample is the training split's controls
        controls = tasks * cfg["simulation"]["split_fracs"][0] * cfg["simulation"]["control_frac"]
        cfg["mine"].update(topk=max(20, round(cfg["mine"]["topk"] * controls / 145_000)),
                           min_score=sz["quality_min_score"] or cfg["mine"]["min_score"])
    else:
        # enough hard negatives to exist at this scale (the full recipe keeps the top 50k at score >= 0.9)
        cfg["mine"].update(topk=max(20, sz["e2e_tasks"] // 40), min_score=0.5)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # reduced mode: one core, so every rule runs single-threaded (OpenMP threads on a busy CPU spin-wait for
    # each other: 85 s per atto step with 2 threads under load average 20, against ~1 s with one)
    cores = "1" if sz["reduced"] else "all"
    targets = TARGETS + (QUALITY_TARGETS if quality else [])
    # the smoke asks for the default target (rule all); quality mode names Gen2's table and Gen3's beside it
    cmd = [str(Path(sys.executable).with_name("snakemake")),
           *(["gen3_stratified_fpr.csv", "report/gen3_report.html", *QUALITY_TARGETS] if quality else []),
           "--configfile", str(path), "--cores", cores]
    if n_gpus:
        cmd += ["--profile", "profiles/local"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env_with_repo(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    run = Path(cfg["run_dir"])
    missing = [t for t in targets if not (run / t).is_file() or (run / t).stat().st_size == 0]
    if proc.returncode != 0 or missing:
        raise RuntimeError(f"snakemake exited {proc.returncode}, missing {missing}; log tail:\n"
                           + (proc.stdout + proc.stderr)[-2000:])
    per_rule = {}
    for tsv in (run / "benchmarks").rglob("*.tsv"):
        rows = tsv.read_text().splitlines()
        if len(rows) > 1:
            rule = tsv.relative_to(run / "benchmarks").with_suffix("").as_posix()
            per_rule[rule] = round(float(rows[1].split("\t")[0]), 1)
    out = {"stamps_per_variant": tasks, "wall_s": round(wall, 1), "targets": targets,
           "rule_seconds": dict(sorted(per_rule.items())), "run_dir": str(run)}
    if quality:
        out.update(epochs_per_stage={s: cfg[s]["epochs"] for s in ("gen2", "gen3_a1", "gen3_a2")},
                   extra_test_controls=sz["quality_extra_controls"], mine=cfg["mine"])
    return out


def headline(run: Path) -> dict:
    """The seed's two headline numbers of Gen3 and Gen2 from a run's stratified tables (the ``all`` stratum):
    value, 95% Wilson interval, the matched-filter reference of the same positives, and the seed's claim. A
    value the test split cannot resolve (fewer than 1/FPR controls) is None, as in the tables."""
    import pandas as pd

    from darkhaloscope.evaluation.strata import STRATUM_ALL

    def num(x):
        return None if pd.isna(x) else float(x)

    out = {}
    for metric, target, sense, gen3_claim, gen2_seed in HEADLINE:
        key = f"{metric}{target:g}"
        row = {"seed_claim_gen3": f"{sense} {gen3_claim:g}", "seed_gen2": gen2_seed}
        for model in ("gen3", "gen2"):
            df = pd.read_csv(run / f"{model}_stratified_fpr.csv")
            hit = df[(df["stratum"] == STRATUM_ALL) & (df["metric"] == metric) & np.isclose(df["target"], target)]
            if len(hit) != 1:
                raise RuntimeError(f"{run / model}_stratified_fpr.csv has no '{STRATUM_ALL}' row for {key}: evaluated "
                                   "without the seed's targets (eval.fpr_targets 1e-4, eval.tpr_targets 0.85)")
            r = hit.iloc[0]
            row[model] = {"value": num(r["value"]), "ci_low": num(r["ci_low"]), "ci_high": num(r["ci_high"]),
                          "n_pos": int(r["n_pos"]), "n_neg": int(r["n_neg"])}
            row["matched_filter"] = num(r["mf_value"])
        g3 = row["gen3"]
        if g3["value"] is None:
            row["gen3_meets_claim"] = None
        else:  # decided only where the whole interval is on one side of the claim
            above, below = g3["ci_low"] > gen3_claim, g3["ci_high"] < gen3_claim
            row["gen3_meets_claim"] = (above if sense == ">" else below) or (None if not (above or below) else False)
        out[key] = row
    return out


def learning_curve_point(run: Path) -> dict:
    """Training stamps per variant (Gen3's data) -> Gen3's AUROC on all positives, with its 95% interval."""
    import pandas as pd

    from darkhaloscope.evaluation.strata import STRATUM_ALL
    from darkhaloscope.stamps.dataset import open_split
    from finder_table import auroc_interval

    df = pd.read_csv(run / "gen3_stratified_fpr_auroc.csv")
    r = df[df["stratum"] == STRATUM_ALL].iloc[0]
    lo, hi = auroc_interval(float(r["auroc"]), int(r["n_pos"]), int(r["n_neg"]))
    return {"train_stamps_per_variant": open_split(str(run / "data/v4_sota_moffat"), "train").num_rows(),
            "gen3_auroc": float(r["auroc"]), "ci_low": lo, "ci_high": hi, "n_pos": int(r["n_pos"]),
            "n_neg": int(r["n_neg"])}


def quality(work: Path, sz: dict, n_gpus: int) -> dict:
    out = e2e(work, sz, n_gpus, quality=True)
    run = Path(out["run_dir"])
    out.update(headline=headline(run), learning_curve=learning_curve_point(run))
    return out


def headline_table(q: dict, title: str | None = None) -> str:
    def fmt(v):
        if v["value"] is None:
            return f"not resolvable ({v['n_neg']} controls)"
        return f"{v['value']:.4g} [{v['ci_low']:.4g}, {v['ci_high']:.4g}]"

    lc = q.get("learning_curve")
    title = title or (f"seed headline: config/full.yaml at {q['stamps_per_variant']} tasks per variant "
                      f"(+{q['extra_test_controls']} test controls), epochs {q['epochs_per_stage']}; simulated "
                      "grid_sota stamps, 95% Wilson intervals")
    lines = [title,
             f"{'metric':14s}{'Gen3':34s}{'Gen2':34s}{'matched filter':16s}seed: Gen3 claim / Gen2"]
    for key, r in q["headline"].items():
        mf = "n/a" if r["matched_filter"] is None else f"{r['matched_filter']:.4g}"
        lines.append(f"{key:14s}{fmt(r['gen3']):34s}{fmt(r['gen2']):34s}{mf:16s}{r['seed_claim_gen3']} / "
                     f"{r['seed_gen2']:g}  (Gen3 meets claim: {r['gen3_meets_claim']})")
    if lc:
        lines.append(f"learning-curve point: {lc['train_stamps_per_variant']} training stamps per variant -> Gen3 AUROC "
                     f"{lc['gen3_auroc']:.4f} [{lc['ci_low']:.4f}, {lc['ci_high']:.4f}] "
                     f"({lc['n_pos']} lenses, {lc['n_neg']} controls)")
    return "\n".join(lines)


def train_throughput(data: Path, sz: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        torch.set_num_threads(1)  # a per-core figure, robust to a shared machine's load (as bench_train.py)
    bare, pipe = [], []
    for _ in range(sz["repeat"]):
        bare.append(bare_loop(sz["arch"], sz["batch"], sz["train_steps"], device, sz["bf16"]))
        pipe.append(pipeline_loop(sz["arch"], sz["batch"], sz["train_steps"], device, sz["bf16"], data,
                                  sz["workers"]))
    return {"arch": sz["arch"], "batch": sz["batch"], "bf16": sz["bf16"], "workers": sz["workers"],
            "steps": sz["train_steps"], "bare_images_per_s": round(max(bare), 1),
            "pipeline_images_per_s": round(max(pipe), 1), "ratio": round(max(pipe) / max(bare), 3)}


def infer_throughput(data: Path, sz: dict, device: torch.device, work: Path) -> dict:
    import timm

    from darkhaloscope import cli
    from darkhaloscope.learning.checkpoint import save_checkpoint
    from darkhaloscope.learning.model import build_model, model_kwargs

    kwargs = model_kwargs(sz["arch"], 2, 0.1)
    ckpt = work / "infer_ckpt.pt"
    save_checkpoint(ckpt, kind="best", arch=sz["arch"], model_kwargs=kwargs,
                    state_dict=build_model(**kwargs).state_dict(), meta_cols=["psfsize_r", "psfdepth_r"],
                    meta_mean=[1.2, 24.3], meta_std=[0.2, 0.4], variant="gpu_check", args={}, epoch=0, metrics={},
                    finished=True)
    from darkhaloscope.stamps.dataset import open_split

    extra = ["--use_bf16"] if sz["bf16"] else []
    extra += ["--num_workers", str(sz["workers"])] if sz["workers"] > 1 else []
    # the whole command on the test split, then again on it and on the (larger) train split: the first call pays
    # the process's one-time costs (lazy torch imports, CUDA kernel loading); the two later sizes separate the
    # command's fixed cost (model load, DataLoader workers' start) from its per-stamp rate
    rows = {split: open_split(str(data), split).num_rows() for split in ("test", "train")}  # as dhs infer lists them
    timed = []
    for split in ("test", "test", "train"):
        n = rows[split]
        t = time.perf_counter()
        rc = cli.main(["infer", "--data", str(data), "--ckpt", str(ckpt), "--out", str(work / f"infer_{split}.parquet"),
                       "--split", split, "--batch_size", str(sz["infer_batch"]), *extra])
        if rc != 0:
            raise RuntimeError(f"dhs infer exited {rc}")
        timed.append((n, time.perf_counter() - t))
    (n0, t0), (n1, t1), (n2, t2) = timed
    marginal = (n2 - n1) / (t2 - t1) if n2 > n1 and t2 > t1 else None
    model = timm.create_model(sz["arch"], pretrained=False, num_classes=1).to(device).eval()
    x = torch.randn(sz["infer_batch"], 3, 64, 64, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=sz["bf16"]):
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, done = time.perf_counter(), 0
        while done < max(n2, 20 * sz["infer_batch"] if device.type == "cuda" else 0):
            model(x)
            done += sz["infer_batch"]
        if device.type == "cuda":
            torch.cuda.synchronize()
    bare = done / (time.perf_counter() - t)
    out = {"stamps": n1, "batch": sz["infer_batch"], "pipeline_images_per_s": round(n1 / t1, 1),
           "bare_images_per_s": round(bare, 1), "ratio": round(n1 / t1 / bare, 3),
           "first_call_s": round(t0, 2), "train_split_stamps": n2, "train_split_s": round(t2, 2),
           "note": "pipeline = the whole dhs infer command on the test split (its second call in the process), model "
                   "load and parquet write included; first_call_s: the first call on the same split; fixed_s and "
                   "marginal_images_per_s: t = fixed_s + n / marginal_images_per_s through the second test-split "
                   "and the train-split timings"}
    if marginal:
        out.update({"marginal_images_per_s": round(marginal, 1), "fixed_s": round(t1 - n1 / marginal, 2),
                    "marginal_ratio": round(marginal / bare, 3)})
    return out


def torchrun_smoke(data: Path, sz: dict, n_gpus: int, work: Path) -> dict:
    if n_gpus < 2:
        return {"skipped": f"{n_gpus} GPU(s) visible; the DDP smoke needs 2"}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
           "-m", "darkhaloscope", "train", "--data", str(data), "--out_dir", str(work / "ddp"), "--arch", sz["arch"],
           "--epochs", "1", "--batch_size", str(sz["batch"]), "--use_bf16", "--augment", "--loss", "focal",
           "--meta_cols", "psfsize_r,psfdepth_r", "--num_workers", str(min(4, sz["workers"]))]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env_with_repo(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not (work / "ddp/best.pt").is_file():
        raise RuntimeError(f"torchrun exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-2000:]}")
    history = json.loads((work / "ddp/history.json").read_text())
    return {"nproc": 2, "wall_s": round(time.perf_counter() - t, 1), "epochs": len(history) if isinstance(history, list)
            else None}


def flops_per_training_image(arch: str) -> float:
    """FLOPs of one training step per 64x64 stamp: the real classifier's forward pass counted by torch's flop
    counter, times 3 (forward + backward ~ 2x forward, the usual estimate). The counter's own backward figure is
    not used: in torch 2.14 it counts the backward of ConvNeXt's depthwise convolutions ~90x above their forward
    (8.5 against 0.1 GFLOP for two stamps), as if they were dense."""
    from torch.utils.flop_counter import FlopCounterMode

    from darkhaloscope.learning.model import build_model

    model = build_model(arch, 2, 0.1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 64, 64), torch.randn(2, 2))
    return 3 * counter.get_total_flops() / 2


def projection(results: dict, sz: dict) -> dict:
    full = yaml.safe_load((REPO / "config/full.yaml").read_text())
    n_train = round(full["simulation"]["n_tasks"] * full["simulation"]["split_fracs"][0])
    epochs = full["gen3_a1"]["epochs"]
    need = epochs * n_train / (BUDGET_HOURS_PER_STAGE * 3600)
    out = {"full_recipe_train_stamps": n_train, "epochs_per_stage": epochs,
           "budget_hours_per_stage": BUDGET_HOURS_PER_STAGE, "images_per_s_needed": round(need, 1),
           "train_flops_per_image_convnext_tiny": flops_per_training_image("convnext_tiny")}
    train = results.get("train", {})
    if train.get("ok"):
        rate = train["pipeline_images_per_s"]
        out.update({"measured_arch": train["arch"], "measured_ms_per_image": round(1000 / rate, 4),
                    "hours_per_stage_at_measured_rate": round(epochs * n_train / rate / 3600, 2),
                    "meets_budget": bool(train["arch"] == "convnext_tiny" and rate >= need)})
    return out


def table(results: dict) -> str:
    rows = [("step", "result")]
    e = results.get("e2e", {})
    rows.append(("end to end (full.yaml scaled)", "skipped" if not e else f"{e['stamps_per_variant']} stamps/variant, "
                 f"{e['wall_s']} s" if e.get("ok") else f"FAILED {e.get('error', '')[:80]}"))
    for key, label in (("train", "train images/s"), ("infer", "infer images/s")):
        r = results.get(key, {})
        rows.append((f"{label} pipeline / bare (ratio)", "skipped" if not r else f"{r['pipeline_images_per_s']} / "
                     f"{r['bare_images_per_s']} ({r['ratio']})" if r.get("ok") else f"FAILED {r.get('error', '')[:80]}"))
    inf = results.get("infer", {})
    if inf.get("marginal_images_per_s"):
        rows.append(("infer per stamp / fixed / first call", f"{inf['marginal_images_per_s']} images/s / "
                     f"{inf['fixed_s']} s / {inf['first_call_s']} s (test and train splits: {inf['stamps']}, "
                     f"{inf['train_split_stamps']} stamps)"))
    t = results.get("torchrun", {})
    if not t or t.get("skipped"):
        rows.append(("torchrun 2 GPUs", t.get("skipped", "skipped")))
    else:
        rows.append(("torchrun 2 GPUs", f"{t['wall_s']} s" if t.get("ok") else f"FAILED {t.get('error', '')[:80]}"))
    p = results.get("projection", {})
    if p.get("ok"):
        rows.append(("needed for the budget", f"{p['images_per_s_needed']} images/s "
                     f"({p['epochs_per_stage']} epochs x {p['full_recipe_train_stamps']} stamps in "
                     f"{p['budget_hours_per_stage']} h)"))
        rows.append(("train GFLOP per image (tiny)", f"{p['train_flops_per_image_convnext_tiny'] / 1e9:.3f}"))
        if "hours_per_stage_at_measured_rate" in p:
            rows.append((f"hours per stage at measured rate ({p['measured_arch']})",
                         f"{p['hours_per_stage_at_measured_rate']}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduced", action="store_true", help="toy sizes (automatic without a CUDA device)")
    ap.add_argument("--quality", action="store_true",
                    help="the seed's headline: config/full.yaml trained, scored and evaluated at ~8 GPU-minutes")
    ap.add_argument("--headline_of", default=None, metavar="RUN_DIR",
                    help="only print the seed's headline of a finished run directory (gen2/gen3_stratified_fpr.csv)")
    ap.add_argument("--out", default=str(HERE / "out/gpu_check.json"))
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--fake_rows", type=int, default=0,
                    help="train-split rows of the test factory's stamps used when the end-to-end step is skipped or "
                         "failed (test and val get a quarter); default 4 batches")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: e2e,train,infer,torchrun")
    args = ap.parse_args(argv)
    if args.headline_of:
        run = Path(args.headline_of)
        lacking = [f"{m}_stratified_fpr.csv" for m in ("gen3", "gen2") if not (run / f"{m}_stratified_fpr.csv").is_file()]
        if lacking:
            print(f"gpu_check: --headline_of {run}: no {' or '.join(lacking)} (run snakemake gen3_stratified_fpr.csv "
                  "gen2_stratified_fpr.csv there first)", file=sys.stderr)
            return 2
        try:
            q = {"headline": headline(run)}
        except RuntimeError as exc:
            print(f"gpu_check: --headline_of: {exc}", file=sys.stderr)
            return 2
        if (run / "data/v4_sota_moffat").is_dir():
            q["learning_curve"] = learning_curve_point(run)
        print(headline_table(q, f"seed headline of {run}, 95% Wilson intervals"))
        return 0
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    reduced = args.reduced or n_gpus == 0
    device = torch.device("cuda" if n_gpus else "cpu")
    sz = sizes(reduced, n_gpus, os.cpu_count() or 1)
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"mode": ("quality " if args.quality else "") + ("reduced" if reduced else "full"),
               "machine": machine(), "sizes": sz}
    start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        results["total_s"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(results, indent=2))

    def run_step(name, fn):
        # the JSON is rewritten after every step, so a check killed at a time limit keeps what it measured
        step(results, name, fn)
        save()

    if args.quality:
        try:
            run_step("quality", lambda: quality(work, sz, n_gpus))
        finally:
            save()
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
        q = results["quality"]
        print(headline_table(q) if q["ok"] else f"[gpu_check] quality FAILED: {q['error']}")
        print(f"[gpu_check] {results['total_s']} s; JSON: {args.out}")
        return 0 if q["ok"] else 1
    try:
        if "e2e" not in skip:
            run_step("e2e", lambda: e2e(work, sz, n_gpus))
        data = Path(results["e2e"]["run_dir"]) / "data/v4_sota_moffat" if results.get("e2e", {}).get("ok") else None
        if data is None:  # no simulated stamps: the test factory's Phase 4c-contract stamps instead
            rows = args.fake_rows or max(4 * sz["batch"], 256)
            data = write_fake_phase4c(work / "fake", {"train": rows, "val": rows // 4, "test": rows // 4},
                                      files_per_split=max(2, rows // 10000))
        results["data"] = str(data)
        if "train" not in skip:
            run_step("train", lambda: train_throughput(data, sz, device))
        if "infer" not in skip:
            run_step("infer", lambda: infer_throughput(data, sz, device, work))
        if "torchrun" not in skip:
            run_step("torchrun", lambda: torchrun_smoke(data, sz, n_gpus, work))
        run_step("projection", lambda: projection(results, sz))
    finally:
        save()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    print(f"[gpu_check] {results['total_s']} s; JSON: {args.out}")
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
