"""Geometry: the Poincare ball (hyperbolic.py) and great-circle distances on the Earth (geodesy.py). Pure maths."""
