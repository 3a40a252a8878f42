"""Inference: the HierLoc predictor (predictor.py) and its answers (answers.py), tree search (search.py), evaluation
and metrics (evaluate.py, metrics.py), output writers (outputs.py), explanations (explain.py), the prediction map
(map_layout.py lays it out, maps.py draws it), the Poincare disk picture (disk_plot.py), and what both pictures
share (pictures.py)."""
