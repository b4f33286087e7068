# The real sky (config `real_sky`): the parent sample from DR10 sweep files (when `sweeps` is set), DR10 cutouts
# of the host and known-lens catalogues, recall on the known lenses at the operating thresholds of the stratified
# table, and the parent sample's top-N Gen3 scores as candidates for a person to grade. The FITS cache lives outside the
# declared outputs (sky/cache/<sample>), so a failed or killed cutout job resumes where it stopped.
# The catalogues are inputs of the cutouts rule: new content at the same path (a later mtime) reruns the cutouts and
# everything downstream. A relative catalogue path is read from the repository (where config.yaml is and run_dir
# is resolved), never from the run directory. docs/promises.md.


if REAL:
    check_sky_catalogs()


rule parent:
    output:
        PARENT,
    params:
        args=lambda w: parent_args(),
    log:
        "logs/parent.log",
    benchmark:
        "benchmarks/parent.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=1440,
    conda:
        "../envs/simulate.yaml"
    shell:
        "dhs parent {params.args} --out {output:q} > {log:q} 2>&1"


rule cutouts:
    input:
        catalog=lambda w: sky_catalog_input(w.sample),
    output:
        directory("sky/{sample}"),
    params:
        args=lambda w: cutout_args(w.sample),
    log:
        "logs/cutouts/{sample}.log",
    benchmark:
        "benchmarks/cutouts/{sample}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=1440,
    conda:
        "../envs/simulate.yaml"
    shell:
        "dhs cutouts --out_dir {output:q} --cache_dir sky/cache/{wildcards.sample:q} {params.args} > {log:q} 2>&1"


rule recall:
    input:
        lenses="sky/lenses",
        ckpt="runs/gen3_stageA2/best.pt",
        csv="gen3_stratified_fpr.csv",
        scored_with="scores/gen3_test_scores.parquet",
    output:
        csv="gen3_stratified_fpr_recall.csv",
        scores="scores/known_lenses_scores.parquet",
        report=report("report/recall.html", caption="../docs/report_caption.rst", category="Recall"),
    params:
        grade=lambda w: flag("grade_column", (REAL or {}).get("grade_column")),
        batch_size=config["infer"]["batch_size"],
    log:
        "logs/recall.log",
    benchmark:
        "benchmarks/recall.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "dhs recall --data {input.lenses:q} --ckpt {input.ckpt:q} --stratified_csv {input.csv:q}"
        " --scored_with {input.scored_with:q} --out_csv {output.csv:q} --scores_out {output.scores:q}"
        " --report {output.report:q} --batch_size {params.batch_size} {params.grade} > {log:q} 2>&1"


rule sky_scores:
    input:
        hosts="sky/hosts",
        ckpt="runs/gen3_stageA2/best.pt",
    output:
        "scores/sky_hosts_scores.parquet",
    params:
        tta=flag("tta", config["infer"].get("tta"), default=1),
        batch_size=config["infer"]["batch_size"],
    log:
        "logs/sky_scores.log",
    benchmark:
        "benchmarks/sky_scores.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=600,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "dhs infer --data {input.hosts:q} --ckpt {input.ckpt:q} --out {output:q} --split all"
        " --batch_size {params.batch_size} {params.tta} > {log:q} 2>&1"


rule candidates:
    input:
        scores="scores/sky_hosts_scores.parquet",
        hosts="sky/hosts",
    output:
        csv="candidates/candidates.csv",
        html=report("candidates/candidates.html", caption="../docs/report_caption.rst", category="Candidates"),
    params:
        args=lambda w: candidate_args(),
    log:
        "logs/candidates.log",
    benchmark:
        "benchmarks/candidates.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "dhs candidates --scores {input.scores:q} --data {input.hosts:q} --out_csv {output.csv:q}"
        " --out_html {output.html:q} {params.args} > {log:q} 2>&1"



rule realcheck:
    input:
        data=realcheck_input(),
        ckpts=[SCORES[f"{m}_test"][0] for m in MODELS],
        tables=expand("{model}_stratified_fpr.csv", model=MODELS),
        scores=expand("scores/{model}_test_scores.parquet", model=MODELS),
    output:
        csv="realcheck.csv",
        report=report("report/realcheck.html", caption="../docs/report_caption.rst", category="Real check set"),
    params:
        data=lambda w: str(realcheck_data()),
        models=lambda w, input: " ".join(f"--ckpt {m}={c} --table {m}={t} --sim_scores {m}={s}"
                                         for m, c, t, s in zip(MODELS, input.ckpts, input.tables, input.scores)),
        tta=lambda w: flag("tta", config["infer"].get("tta"), default=1),
        batch_size=config["infer"]["batch_size"],
    log:
        "logs/realcheck.log",
    benchmark:
        "benchmarks/realcheck.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "dhs realcheck --data {params.data:q} {params.models} --out_csv {output.csv:q} --report {output.report:q}"
        " --scores_dir scores/realcheck {params.tta} --batch_size {params.batch_size} > {log:q} 2>&1"
