"""Evaluation stage: scoring with a checkpoint (infer), hard-negative mining (mine), the
stratified FPR tables (evaluate) and the HTML report drawn from them (report); what evaluate writes and
report reads (bins, targets, score loading, the operating point, the tables' names) is in strata."""
