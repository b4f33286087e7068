# Hard-negative mining from the Gen2 scores (`dhs mine`), excluding known lenses.


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
