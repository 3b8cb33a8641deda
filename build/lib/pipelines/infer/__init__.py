"""Using trained models: loading a pipeline, generation, completion, scoring with likelihood maps,
and code extraction."""
