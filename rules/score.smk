# Scoring with a checkpoint, and hard-negative mining from the Gen2 scores.


rule score:
    input:
        ckpt=lambda w: SCORES[w.name][0],
        data=lambda w: data_files(SCORES[w.name][1], [SCORES[w.name][2]]),
    output:
        "scores/{name}_scores.parquet",
    params:
        data=lambda w, input: data_root(SCORES[w.name][1], input.data),
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
        "OMP_NUM_THREADS={threads} dhs infer --data {params.data} --ckpt {input.ckpt} --out {output}"
        " --split {params.split} --batch_size {params.batch_size} {params.bf16} > {log} 2>&1"


rule mine:
    input:
        "scores/gen2_parent_scores.parquet",
    output:
        "hard_negs/gen2_top50k.parquet",
    params:
        m=config["mine"],
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
        "dhs mine --scores {input} --out {output} --topk {params.m[topk]} --min_score {params.m[min_score]}"
        " --exclude_radius_arcsec {params.m[exclude_radius_arcsec]} {params.known} > {log} 2>&1"
