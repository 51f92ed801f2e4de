# kvsweep: at the same KV budget, which eviction method (H2O, KVzap, ...) hurts quality less?
#
#   snakemake -n                                   plan the study in config.yaml
#   snakemake --profile slurm                      run it on a SLURM cluster
#   snakemake --configfile demo/config.yaml -c2    the CPU demo
#   snakemake --report report.html                 one page: figures, tables, config, provenance
#
# A study given with --configfile replaces config.yaml entirely (it is not merged into it).
from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


include: "workflow/rules/config_files.smk"


if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo_assets.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/train_surrogate.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/comparison.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/protocols.smk"
include: "workflow/rules/eviction_map.smk"
include: "workflow/rules/study_config.smk"


# Light steps run where Snakemake runs (on a cluster: the login node, which can reach the hub for
# the dataset and tokenizer); the model work (evaluate, calibrate, eviction_map, train_surrogate)
# is submitted as jobs. Each rule's shell runs `python -m kvsweep <stage>`, the sub-command its
# rule is named after where there is one (prepare_calibration runs prepare, calibrate and
# calibration_probe run calibrate).
localrules:
    all,
    demo_assets,
    prepare,
    document_list,
    prepare_calibration,
    score,
    comparison,
    figures,
    protocols,
    study_config,


rule all:
    input:
        final_outputs(),
        calibrated_targets,
    default_target: True
