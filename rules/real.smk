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
        "dhs cutouts --out_dir {output:q} --cache_dir sky/cache/{wildcards.sample:q} {params.args} > {log:q} 2>&1"


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
        "dhs recall --data {input.lenses:q} --ckpt {input.ckpt:q} --stratified_csv {input.csv:q} --out_csv {output.csv:q}"
        " --scores_out {output.scores:q} --report {output.report:q} --batch_size {params.batch_size} {params.grade}"
        " > {log:q} 2>&1"
