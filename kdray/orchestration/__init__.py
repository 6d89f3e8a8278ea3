"""Ray, Ray Tune/Optuna and MLflow live here and nowhere else in kdray (DESIGN.md section 2)."""
