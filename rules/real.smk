# The real sky (config `real_sky`): DR10 cutouts of the host and known-lens catalogues, and recall on the
# known lenses at the operating thresholds of the stratified table. The FITS cache lives outside the
# declared outputs (sky/cache/<sample>), so a failed or killed cutout job resumes where it stopped.


rule cutouts:
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
        "dhs cutouts --out_dir {output} --cache_dir sky/cache/{wildcards.sample} {params.args} > {log} 2>&1"


rule recall:
    input:
        lenses="sky/lenses",
        ckpt="runs/gen3_stageA2/best.pt",
        csv="gen3_stratified_fpr.csv",
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
        "dhs recall --data {input.lenses} --ckpt {input.ckpt} --stratified_csv {input.csv} --out_csv {output.csv}"
        " --scores_out {output.scores} --report {output.report} --batch_size {params.batch_size} {params.grade}"
        " > {log} 2>&1"


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
