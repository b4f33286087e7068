# Scoring a split with a checkpoint (`dhs infer`).


rule infer:
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
        extra=lambda w: infer_flags(w.name),
    log:
        "logs/infer/{name}.log",
    benchmark:
        "benchmarks/infer/{name}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} dhs infer --data {params.data:q} --ckpt {input.ckpt:q} --out {output:q}"
        " --split {params.split:q} --batch_size {params.batch_size:q} {params.bf16} {params.extra} > {log:q} 2>&1"
