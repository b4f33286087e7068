# Phase 4a (manifest), Phase 4c (rendering, one job per variant and shard), and the realism gates.


rule manifest:
    input:
        code=SIM_CODE,
        hosts=hosts_input(),
    output:
        "manifest/manifest.parquet",
    params:
        args=manifest_args(),
    log:
        "logs/manifest.log",
    benchmark:
        "benchmarks/manifest.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/simulate.yaml"
    shell:
        "dhs manifest --out {output:q} {params.args} > {log:q} 2>&1"


rule inject:
    input:
        manifest="manifest/manifest.parquet",
        code=SIM_CODE,
        hosts=hosts_input(),
    output:
        expand("data/{{variant}}/region_split={split}/part-{{shard}}.parquet", split=SPLITS),
    params:
        out_dir=lambda w, output: Path(output[0]).parents[1],
        psf_model=lambda w: config["variants"][w.variant]["psf_model"],
        beta=lambda w: config["variants"][w.variant]["moffat_beta"],
        shard=lambda w: int(w.shard),
        n_shards=N_SHARDS,
        batch_size=config["simulation"]["batch_size"],
        write_arc=flag("write_arc", config["simulation"]["write_arc"]),
        hosts=hosts_flag(),
        skip_extra=lambda w: "" if w.variant in TEST_VARIANTS else "--skip_extra_test_controls",
    log:
        "logs/inject/{variant}_{shard}.log",
    benchmark:
        "benchmarks/inject/{variant}_{shard}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../envs/simulate.yaml"
    shell:
        "OMP_NUM_THREADS={threads} dhs inject --manifest {input.manifest:q} --out_dir {params.out_dir:q}"
        " --variant {wildcards.variant:q} --psf-model {params.psf_model:q} --moffat-beta {params.beta:q}"
        " --shard {params.shard:q} --n_shards {params.n_shards:q} --batch_size {params.batch_size:q} {params.write_arc}"
        " {params.hosts} {params.skip_extra}"
        " > {log:q} 2>&1"


rule audit:
    input:
        lambda w: data_files(w.variant),
    output:
        "audit/{variant}.json",
    params:
        data=lambda w, input: data_root(w.variant, input),
        gates=" ".join(flag(k, v) for k, v in config["audit"].items()),
    log:
        "logs/audit/{variant}.log",
    benchmark:
        "benchmarks/audit/{variant}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/simulate.yaml"
    shell:
        "OMP_NUM_THREADS={threads} dhs audit --data {params.data:q} --out {output:q} --split train"
        " {params.gates} > {log:q} 2>&1"
