# darkhaloscope: Gen2 baseline -> hard-negative mining -> Gen3 curriculum (A1 -> A2) -> stratified FPR.
# The Snakefile only includes; helpers live in rules/common.smk, science in src/darkhaloscope/.
from snakemake.utils import min_version

min_version("9.3")


configfile: "config.yaml"


include: "rules/common.smk"


workdir: RUN_DIR


wildcard_constraints:
    variant="|".join(VARIANTS),
    shard=r"\d{5}",
    stage="|".join(STAGES),
    name="|".join(SCORES),
    model="|".join(MODELS),
    sample="|".join(SKY_SAMPLES),


include: "rules/simulate.smk"
include: "rules/train.smk"
include: "rules/infer.smk"
include: "rules/mine.smk"
include: "rules/evaluate.smk"
include: "rules/real.smk"


rule all:
    default_target: True
    input:
        "gen3_stratified_fpr.csv",
        "report/gen3_report.html",
        real_targets(),
        realcheck_targets(),
