"""Learning stage: the classifier, its losses, the streaming parquet reader and the training loop."""
