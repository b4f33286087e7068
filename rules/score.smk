# Scoring with a checkpoint, and hard-negative mining from the Gen2 scores.


rule score:
    input:
        ckpt=lambda w: SCORES[w.name][0],
        data=lambda w: data_files(SCORES[w.name][1], [SCORES[w.name][2]]),
    output:
        "scores/{name}_scores.parquet",
    params:
        data=lambda w: data_dir(SCORES[w.name][1]),
        split=lambda w: SCORES[w.name][2],
        batch_size=config["infer"]["batch_size"],
        bf16=flag("use_bf16", config["infer"]["use_bf16"]),
    log:
        "logs/score/{name}.log",
    benchmark:
        "benchmarks/score/{name}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} dhs infer --data {params.data:q} --ckpt {input.ckpt:q} --out {output:q}"
        " --split {params.split:q} --batch_size {params.batch_size:q} {params.bf16} > {log:q} 2>&1"


rule mine:
    input:
        "scores/gen2_parent_scores.parquet",
    output:
        "hard_negs/gen2_top50k.parquet",
    params:
        args=" ".join(flag(k, config["mine"][k]) for k in ("topk", "min_score", "exclude_radius_arcsec")),
        known=flag("known_lenses", config["mine"].get("known_lenses")),
    log:
        "logs/mine.log",
    benchmark:
        "benchmarks/mine.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "dhs mine --scores {input:q} --out {output:q} {params.args} {params.known} > {log:q} 2>&1"
