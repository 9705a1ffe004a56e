"""Evaluation during training: held-out loss (loss.py), generation samples (generate.py, prompts.py),
task metrics on references (task_metrics.py), and the evaluator the trainer calls at its eval
points, with the best-value / early-stopping tracker (evaluator.py)."""
