# Training: Gen2 baseline and the two Gen3 curriculum stages are configurations of one rule.
# Resumable state (last.pt) lives in state/<stage>/, outside the declared outputs, so an interrupted job
# continues where it stopped when the rule is rerun (dhs train --auto_resume).


rule train:
    input:
        unpack(stage_inputs),
    output:
        ckpt="runs/{stage}/best.pt",
        history="runs/{stage}/history.json",
    params:
        data=lambda w, input: data_root(STAGES[w.stage]["variant"], input.data),
        out_dir=lambda w, output: Path(output.ckpt).parent,
        args=lambda w: train_args(w.stage),
        extra=stage_extra,
        launcher=train_launcher(),
    log:
        "logs/train/{stage}.log",
    benchmark:
        "benchmarks/train/{stage}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=16000,
        runtime=24 * 60,
        gpu=config["train"]["gpus"],
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {params.launcher} --data {params.data:q} --out_dir {params.out_dir:q}"
        " --state_dir state/{wildcards.stage:q} --auto_resume {params.args} {params.extra}"
        " > {log:q} 2>&1"


if config["gen2"].get("checkpoint"):

    ruleorder: use_existing_gen2 > train

    rule use_existing_gen2:
        input:
            local(config["gen2"]["checkpoint"]),
        output:
            ckpt="runs/gen2/best.pt",
            history="runs/gen2/history.json",
        log:
            "logs/train/gen2.log",
        conda:
            "../envs/train.yaml"
        shell:
            "cp {input:q} {output.ckpt:q} && echo '{{\"epochs\": []}}' > {output.history:q}"  # the shape dhs train writes
            " && echo using existing Gen2 checkpoint {input:q} > {log:q}"
