# Hard-negative mining from the Gen2 scores (`dhs mine`), excluding known lenses.


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
