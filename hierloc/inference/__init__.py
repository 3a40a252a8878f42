"""Inference: the HierLoc predictor (predictor.py) and its answers (answers.py), tree search (search.py), evaluation
and metrics (evaluate.py, metrics.py), output writers (outputs.py), explanations and maps (explain.py, maps.py)."""
