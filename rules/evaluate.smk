# Stratified FPR table (the user's target file for gen3), AUROC and completeness tables (`dhs eval`, one job
# per model), and the HTML report drawn from them (`dhs report`).


rule evaluate:
    input:
        "scores/{model}_test_scores.parquet",
    output:
        csv="{model}_stratified_fpr.csv",
        auroc="{model}_stratified_fpr_auroc.csv",
        completeness="{model}_stratified_fpr_completeness.csv",
        completeness_snr="{model}_stratified_fpr_completeness_snr.csv",
    params:
        bins=" ".join(flag(k, config["eval"].get(k)) for k in ("theta_bins", "res_bins", "snr_bins", "tpr_targets", "fpr_targets")),
    log:
        "logs/evaluate/{model}.log",
    benchmark:
        "benchmarks/evaluate/{model}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "dhs eval --scores {input:q} --out_csv {output.csv:q} {params.bins} > {log:q} 2>&1"


rule report:
    input:
        scores=expand("scores/{model}_test_scores.parquet", model=MODELS),
        tables=expand("{model}_stratified_fpr.csv", model=MODELS),
        siblings=expand("{model}_stratified_fpr{suffix}.csv", model=MODELS,
                        suffix=["_auroc", "_completeness", "_completeness_snr"]),
        histories=expand("runs/{stage}/history.json", stage=STAGES),
        hard_negs="hard_negs/gen2_top50k.parquet",
        gallery_data=data_files("v4_sota_moffat", ["test"]),
    output:
        report("report/gen3_report.html", caption="../docs/report_caption.rst", category="Gen3"),
    params:
        models=lambda w, input: " ".join(f"{flag('scores', f'{m}={s}')} {flag('tables', f'{m}={t}')}"
                                         for m, s, t in zip(MODELS, input.scores, input.tables)),
        gallery_data=lambda w, input: data_root("v4_sota_moffat", input.gallery_data),
        histories=lambda w, input: " ".join(flag("history", f"{s}={h}") for s, h in zip(STAGES, input.histories)),
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "dhs report --out {output:q} {params.models} {params.histories}"
        " --hard_negs {input.hard_negs:q} --data {params.gallery_data:q} > {log:q} 2>&1"
