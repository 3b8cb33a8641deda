"""The VQ-VAE-2 pipeline and the pixel model's jobs, by stage. Imports run one way, from the top of
this list down (tests/test_layout.py checks it):

  cli       the scripts' option grammar and their one-line errors
  train/    run settings and state, the loop, one task per model
  eval/     every stage's figures, sample metrics, the report
  infer/    loading a pipeline, generation, completion, scoring, extraction
  device    device, precision and processes
  data/     datasets, hold-out rules
  store/    checkpoints, code databases, run and sample directories, results files
  errors, startup   leaves every module may use
"""
