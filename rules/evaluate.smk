# Stratified FPR table (the user's target file), AUROC and completeness tables, and the HTML report.


rule evaluate:
    input:
        scores="scores/gen3_test_scores.parquet",
        gen2_scores="scores/gen2_test_scores.parquet",
        histories=expand("runs/{stage}/history.json", stage=STAGES),
        hard_negs="hard_negs/gen2_top50k.parquet",
        gallery_data=data_files("v4_sota_moffat", ["test"]),
    output:
        csv="gen3_stratified_fpr.csv",
        auroc="gen3_stratified_fpr_auroc.csv",
        completeness="gen3_stratified_fpr_completeness.csv",
        report=report("report/gen3_report.html", caption="../docs/report_caption.rst", category="Gen3"),
    params:
        bins=" ".join(flag(k, config["eval"][k]) for k in ("theta_bins", "res_bins", "tpr_targets", "fpr_targets")),
        gallery_data=lambda w, input: data_root("v4_sota_moffat", input.gallery_data),
        histories=lambda w, input: " ".join(flag("history", f"{s}={h}") for s, h in zip(STAGES, input.histories)),
    log:
        "logs/evaluate.log",
    benchmark:
        "benchmarks/evaluate.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "dhs eval --scores {input.scores:q} --out_csv {output.csv:q}"
        " {params.bins}"
        " --report {output.report:q} --compare gen2={input.gen2_scores:q} {params.histories}"
        " --hard_negs {input.hard_negs:q} --data {params.gallery_data:q} > {log:q} 2>&1"
