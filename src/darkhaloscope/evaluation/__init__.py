"""Evaluation stage: scoring with a checkpoint (infer), hard-negative mining, metrics, the stratified FPR
table and the HTML report."""
