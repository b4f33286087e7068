"""Evaluation: scoring, mining, metrics, the stratified tables and the report."""
