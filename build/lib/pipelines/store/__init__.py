"""What lies on disk, and its readers and writers: checkpoints, code databases and what a prior was
trained on, run directories (read side), sample directories, evaluation results. Imports nothing
else of the pipeline."""
