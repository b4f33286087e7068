"""Learning stage: the classifier, its losses, the streaming parquet reader and its sampling policy, the training
loop, its checkpoints and runtime helpers."""
